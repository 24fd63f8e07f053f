"""What the enclave accepts as a GPU stage's reply, before anything reads it.

Reads a reply (a list of tensors) and what the plan says it must be; writes nothing.
Guarantees: a reply that passes :func:`check_reply` has the plan's count of outputs, each a
plain dense CPU tensor with memory of its own (no zero tensor, functionalisation or functorch
wrapper), of the plan's dtype and (where the call binds every size) shape, finite where it is
float, and with a storage as large as its shape and strides reach, so compiled code indexing
it by its shape stays inside it.

A reply passes first through :data:`native_accepts` where it is built (``native/reply_check.cpp``,
by ``python -m partitioner.native``): the same checks in one C++ call, which accepts only what
the checks here accept; whatever it does not accept (or everything, where it is not built) is
checked here, which accepts it or names what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from enclave_runtime import native_modules
from partitioner.errors import IntegrityError

_native = native_modules.load("teesplit_reply_check")
native_accepts: Callable[[object, object], bool] | None = (
    _native.accepts if _native is not None else None
)

# What a GPU stage's reply must be: per output, its dtype and (when the call binds every
# size) its concrete shape. Tuples: it is handed to the runner, and shared by the calls of a
# binding, so a runner that edits it would change what its own and later replies are checked
# against (a reviewer's finding).
Expected = tuple[tuple[torch.dtype, tuple[int, ...] | None], ...]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types: neither overrides numpy()


def snapshot(outputs: object) -> object:
    """A runner's reply as the enclave reads it from now on: a list as a tuple, read once.
    The runner may keep the list it returned, and code of its own (a finaliser the cyclic GC
    runs at one of the enclave's allocations) could put another tensor in it after it is
    checked and before, or while, it is read (a reviewer's finding: a forged result passed
    the check made as it came). Anything else is returned as it is (:func:`check_reply`
    refuses all but a tuple).

    Copied as a list first: ``tuple(a_list)`` reads the list's item array, then allocates the
    tuple, and that allocation can run the cyclic GC, whose finaliser could empty the list:
    the tuple was filled from freed memory (a reviewer's finding, SIGSEGV). ``list(a_list)``
    allocates before it reads, then copies with no allocation the GC runs at; the copy is
    this function's alone."""
    return tuple(list(outputs)) if type(outputs) is list else outputs


def check_reply(stage: str, outputs: Sequence[torch.Tensor], expected: Expected) -> None:
    """Refuse a GPU reply that is not what the plan says: the count, each output's dtype and
    shape, and (floats, complex) finite values. Raises :class:`IntegrityError` naming the output."""
    if native_accepts is not None and native_accepts(outputs, expected):
        return
    # exactly a list or tuple: a subclass could yield other tensors on the next pass over it
    if type(outputs) not in (list, tuple):
        raise IntegrityError(f"GPU stage {stage} returned {type(outputs).__name__}, not outputs")
    if len(outputs) != len(expected):
        raise IntegrityError(
            f"GPU stage {stage} returned {len(outputs)} outputs, the plan has {len(expected)}"
        )
    for i, (out, (dtype, shape)) in enumerate(zip(outputs, expected, strict=True)):
        # a plain dense tensor only: a subclass could show the check (which reads .numpy())
        # other values than the stages read; a sparse, negated or conjugated view has no
        # numpy view, and compiled code would read its memory without the bit; a nested
        # tensor's layout says strided, and a quantized tensor's values are its scales' too
        plain = type(out) in _PLAIN
        if (
            not plain
            or out.layout != torch.strided
            or out.is_neg()
            or out.is_conj()
            or out.is_nested
            or out.is_quantized
        ):
            raise IntegrityError(
                f"GPU stage {stage} output {i}: {type(out).__name__}"
                + (
                    f" ({out.layout}, negated {out.is_neg()}, conjugated {out.is_conj()}, "
                    f"nested {out.is_nested}, quantized {out.is_quantized})"
                    if plain
                    else ""
                )
                + ", not a plain dense tensor (refused)"
            )
        if out.dtype != dtype:
            raise IntegrityError(
                f"GPU stage {stage} output {i}: {out.dtype}, the plan says {dtype}"
            )
        if not out.is_cpu:  # the enclave's own tensors: nothing else is its memory
            raise IntegrityError(f"GPU stage {stage} output {i} is on {out.device}, not the CPU")
        if shape is not None and list(out.shape) != list(shape):
            raise IntegrityError(
                f"GPU stage {stage} output {i}: shape {list(out.shape)}, the plan says {shape}"
            )
        _check_memory(stage, i, out)
        if not _finite(out):
            raise IntegrityError(f"GPU stage {stage} output {i} holds NaN or inf (refused)")


# torch's isfinite reads these directly and rightly; the 8-bit floats it either lacks
# (NotImplementedError) or gets wrong (float8_e8m0fnu's NaN passes it), so they are widened
_ISFINITE_READS = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
}
# no encoding of these stands for NaN or inf (and torch cannot widen the packed pairs)
_ALWAYS_FINITE = {torch.float4_e2m1fn_x2}


def _finite(out: torch.Tensor) -> bool:
    """Whether every value of ``out`` is finite (an integer tensor's always are)."""
    dtype = out.dtype
    if dtype in _ISFINITE_READS:
        return bool(torch.isfinite(out).all())
    if dtype.is_complex:  # complex32
        return bool(torch.isfinite(out.to(torch.complex64)).all())
    if dtype.is_floating_point and dtype not in _ALWAYS_FINITE:
        return bool(torch.isfinite(out.to(torch.float32)).all())
    return True


_functional = torch._is_functional_tensor
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _check_memory(stage: str, i: int, out: torch.Tensor) -> None:
    """Refuse an output with no memory of its own, or a storage smaller than its shape and
    strides reach. Each of these is an exact ``torch.Tensor`` that the checks above pass: a
    zero tensor and a functionalisation wrapper have a data pointer of 0, a functorch batched
    tensor no storage, and a tensor made in this process (a runner's reply, however it says
    it handles requests) can have a storage cut short; compiled code indexing any of them by
    its shape reads memory that is not the reply's."""
    if out._is_zerotensor() or _functional(out) or _functorch_wrapped(out):
        raise IntegrityError(
            f"GPU stage {stage} output {i}: a tensor with no memory of its own (refused)"
        )
    if not out.numel():
        return
    try:
        storage = out.untyped_storage().nbytes()
        pointer = out.data_ptr()
    except (RuntimeError, NotImplementedError) as exc:
        raise IntegrityError(
            f"GPU stage {stage} output {i}: its storage cannot be read ({exc}) (refused)"
        ) from None
    if out.is_contiguous():
        reach = out.storage_offset() + out.numel()
    else:
        reach = out.storage_offset() + 1
        reach += sum((n - 1) * step for n, step in zip(out.shape, out.stride(), strict=True))
    if not pointer or storage < reach * out.itemsize:
        raise IntegrityError(f"GPU stage {stage} output {i}: storage too small for its shape")
