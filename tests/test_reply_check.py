"""The reply check's native fast path (``enclave_runtime/native/reply_check.cpp``): built by
``make``, it accepts an honest reply in one call, and it accepts nothing the Python check
refuses. Every hostile reply below is run through both: the fast path must refuse each, and
``check_reply`` (the fast path, then the Python check) must raise the Python check's error.
The end-to-end attacks (``tests/test_exact_attacks.py``, ``tests/test_fastpath.py``) run with
the fast path in place, as the enclave does."""

from __future__ import annotations

import warnings

import pytest
import torch
from adversary import shrunk_storage, transposed_copy
from conftest import partition_step_for_tests

from enclave_runtime import replies
from enclave_runtime.executor import Executor, InProcessRunner
from partitioner.errors import IntegrityError

REPLY = torch.arange(2 * 3 * 7, dtype=torch.int32).reshape(2, 3, 7)
EXPECTED = [(torch.int32, [2, 3, 7])]


def _python_check(outputs, expected):
    saved, replies.native_accepts = replies.native_accepts, None
    try:
        replies.check_reply("s", outputs, expected)
    finally:
        replies.native_accepts = saved


class _Sub(torch.Tensor):
    pass


def _storage_offset_past_end(t):
    """``t`` two elements into a storage then cut one element short of its end."""
    whole = torch.zeros(t.numel() + 2, dtype=t.dtype)
    view = whole[2:].view(t.shape)
    whole.untyped_storage().resize_((t.numel() + 1) * t.element_size())
    return view


def _offset_that_wraps(t):
    """8 int64 elements at an offset of 2**61 - 4 into a 32-byte storage: (offset + 8) * 8
    bytes wraps to 32, the storage's size (a reviewer's attack on the first fast path: it
    accepted the tensor, which reads the 32 bytes before its storage).
    ``aten._reshape_alias`` skips the bounds check that ``as_strided`` and ``set_`` make."""
    base = torch.zeros(4, dtype=torch.int64)
    empty = torch.empty(0, dtype=torch.int64).set_(base.untyped_storage(), 2**61 - 4, [0], [1])
    return torch.ops.aten._reshape_alias(empty, [8], [1])


def _count_that_wraps(t):
    """An int64 reply of 2**61 elements over a 32-byte storage."""
    return torch.ops.aten._reshape_alias(torch.zeros(4, dtype=torch.int64), [2**61], [1])


def _pointer_that_throws(t):
    """A tensor whose writable data pointer cannot be taken (the Python check refuses it as
    unreadable; a reviewer's finding: the first fast path read its const pointer instead)."""
    out = t.clone()
    torch._C._set_throw_on_mutable_data_ptr(out)
    return out


HOSTILE = {
    "int64 residues": lambda t: [t.to(torch.int64)],
    "uint32 view": lambda t: [t.view(torch.uint32)],
    "a column short": lambda t: [t[..., :-1].clone()],
    "a flat tensor": lambda t: [t.reshape(-1)],
    "a 0-dim tensor": lambda t: [t.sum().to(torch.int32)],
    "a numpy array": lambda t: [t.numpy()],
    "a list of ints": lambda t: [t.tolist()],
    "None": lambda t: [None],
    "too few": lambda t: [],
    "too many": lambda t: [t, t],
    "a subclass": lambda t: [t.clone().as_subclass(_Sub)],
    "a sparse tensor": lambda t: [t.to_sparse()],
    "a negated view": lambda t: [torch._neg_view(-t)],
    "a zero tensor": lambda t: [torch._efficientzerotensor(tuple(t.shape), dtype=t.dtype)],
    "a functionalisation wrapper": lambda t: [torch._to_functional_tensor(t.clone())],
    "a functorch batched tensor": lambda t: [
        torch._C._functorch._add_batch_dim(torch.stack([t, t]), 0, 1)
    ],
    "a meta tensor": lambda t: [torch.empty_like(t, device="meta")],
    "a storage cut short": lambda t: [shrunk_storage(t)],
    "an offset past the storage's end": lambda t: [_storage_offset_past_end(t)],
    "an offset whose byte count wraps": lambda t: [_offset_that_wraps(t)],
    "an element count whose byte count wraps": lambda t: [_count_that_wraps(t)],
    "a data pointer that throws": lambda t: [_pointer_that_throws(t)],
    "a generator, not a list": lambda t: (x for x in [t]),
    "a list subclass": lambda t: type("L", (list,), {})([t]),
}


WRAPS = ("an offset whose byte count wraps", "an element count whose byte count wraps")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_fast_path_refuses_every_reply_the_python_check_refuses(case):
    reply = HOSTILE[case](REPLY.clone())
    # the plan's dtype and shape for the wrapping cases, so only their storage is wrong
    expected = [(torch.int64, list(reply[0].shape))] if case in WRAPS else EXPECTED
    with pytest.raises(IntegrityError):
        _python_check(reply, expected)
    assert replies.native_accepts is not None
    assert not replies.native_accepts(reply, expected)
    with pytest.raises(IntegrityError, match="GPU stage s"):
        replies.check_reply("s", reply, expected)


def test_under_a_python_dispatch_mode_the_fast_path_leaves_the_reply_to_the_python_check():
    """A mode runs Python inside the fast path's own tensor calls, where it could empty the
    list being read (a reviewer's attack: the first fast path crashed the process)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    outs = [torch.ones(4), torch.ones(4)]
    expected = [(torch.float32, [4])] * 2

    class Emptying(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            outs.clear()
            return func(*args, **(kwargs or {}))

    with Emptying():
        assert not replies.native_accepts(outs, expected)
    assert len(outs) == 2  # nothing of the fast path ran under the mode
    assert replies.native_accepts(outs, expected)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_float_reply_that_is_not_finite_is_refused_by_both(poison):
    reply = torch.ones(1, 4)
    reply[0, 2] = poison
    expected = [(torch.float32, [1, 4])]
    assert not replies.native_accepts([reply], expected)
    with pytest.raises(IntegrityError, match="NaN or inf"):
        replies.check_reply("s", [reply], expected)


# torch warns on making complex32, nested and quantized tensors (prototype or deprecated)
QUIET = pytest.mark.filterwarnings("ignore::UserWarning")


def _poisoned(dtype):
    """A reply of ``dtype`` holding a non-finite value, for each dtype that has one."""
    if dtype.is_complex:
        reply = torch.ones(1, 4, dtype=dtype)
        reply[0, 1] = complex(1.0, float("inf"))  # finite real part, infinite imaginary
        return reply
    if dtype == torch.float8_e8m0fnu:  # no inf, and 0xFF is its NaN
        return torch.tensor([[127, 127, 255, 127]], dtype=torch.uint8).view(dtype)
    return torch.tensor([[1.0, float("nan"), 1.0, 1.0]]).to(dtype)


OTHER_FLOATS = [
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


@QUIET
@pytest.mark.parametrize("dtype", OTHER_FLOATS, ids=str)
def test_a_non_finite_reply_of_any_float_or_complex_dtype_is_refused_by_both(dtype):
    """Not only float32/64: a plan expecting a complex or 8-bit float output is refused a
    non-finite one by name (not accepted, and not a NotImplementedError from ``isfinite``,
    which torch lacks for some 8-bit floats)."""
    reply = _poisoned(dtype)
    expected = [(dtype, [1, 4])]
    assert not replies.native_accepts([reply], expected)
    with pytest.raises(IntegrityError, match="NaN or inf"):
        replies.check_reply("s", [reply], expected)


@QUIET
@pytest.mark.parametrize("dtype", OTHER_FLOATS, ids=str)
def test_a_finite_reply_of_any_float_or_complex_dtype_is_accepted(dtype):
    reply = torch.ones(1, 4, dtype=torch.float32).to(dtype)
    replies.check_reply("s", [reply], [(dtype, [1, 4])])


def test_a_conjugated_view_is_refused_by_both():
    """A complex reply with the conjugate bit: compiled code reads its memory unconjugated,
    where a check that resolves the bit reads the conjugate (refused as the negated view is)."""
    reply = (torch.ones(1, 4, dtype=torch.complex64) * (1 + 2j)).conj()
    assert reply.is_conj()
    expected = [(torch.complex64, [1, 4])]
    assert not replies.native_accepts([reply], expected)
    with pytest.raises(IntegrityError, match="not a plain dense tensor"):
        replies.check_reply("s", [reply], expected)


def test_a_packed_float4_reply_is_accepted_whatever_its_bytes():
    """float4_e2m1fn_x2 has no NaN or inf (and torch cannot widen it to look): every byte
    is two finite values, so the finiteness check passes it rather than raising."""
    reply = torch.tensor([[0x00, 0x7F, 0x88, 0xFF]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    replies.check_reply("s", [reply], [(torch.float4_e2m1fn_x2, [1, 4])])


def _nested(dtype):
    return torch.nested.nested_tensor([torch.ones(2, dtype=dtype), torch.ones(3, dtype=dtype)])


def _quantized_nan_scale(_dtype):
    return torch._make_per_tensor_quantized_tensor(
        torch.ones(1, 4, dtype=torch.int8), float("nan"), 0
    )


@QUIET
@pytest.mark.parametrize(
    ("make", "dtype", "shape"),
    [
        (_nested, torch.int64, None),
        (_nested, torch.float32, None),
        (_nested, torch.float32, [2, 3]),
        (_quantized_nan_scale, torch.qint8, [1, 4]),
        (_quantized_nan_scale, torch.qint8, None),
    ],
    ids=["nested int", "nested float", "nested float, a shape", "quantized", "quantized, open"],
)
def test_a_nested_or_quantized_reply_is_refused_by_both(make, dtype, shape):
    """A reviewer's finding: a nested tensor is an exact ``torch.Tensor`` with a strided
    layout (the Python check accepted an int one, and raised untyped errors for a float one),
    and a quantized tensor's values are its scale's too (one of NaN passed as integers)."""
    reply = make(dtype)
    expected = [(dtype, shape)]
    assert not replies.native_accepts([reply], expected)
    with pytest.raises(IntegrityError, match="not a plain dense tensor"):
        replies.check_reply("s", [reply], expected)


def test_an_honest_reply_is_accepted_by_the_fast_path_itself():
    # the plan's forms: a list of (dtype, shape) pairs, shape a list or None (open sizes)
    assert replies.native_accepts([REPLY.clone()], EXPECTED)
    assert replies.native_accepts((REPLY.clone(),), [(torch.int32, None)])
    float_reply = torch.randn(1, 1, 5)
    assert replies.native_accepts([float_reply, REPLY], [(torch.float32, [1, 1, 5]), *EXPECTED])
    assert replies.native_accepts([torch.empty(0, 7, dtype=torch.int64)], [(torch.int64, [0, 7])])


def test_what_the_fast_path_passes_on_is_judged_by_the_python_check():
    """A reply the Python check accepts in a form the fast path does not (here a transposed
    layout): accepted all the same, by the Python check."""
    other_layout = transposed_copy(REPLY)
    assert not replies.native_accepts([other_layout], EXPECTED)
    replies.check_reply("s", [other_layout], EXPECTED)


def test_the_executors_expected_replies_take_the_fast_path(monkeypatch):
    """What the executor passes as ``expected`` is in the form the fast path reads: were it
    not, every reply would silently fall back to the Python check."""
    calls = []
    accepts = replies.native_accepts

    def counting(outputs, expected):
        verdict = accepts(outputs, expected)
        calls.append(verdict)
        return verdict

    monkeypatch.setattr(replies, "native_accepts", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition_step_for_tests("slalom")
    executor = Executor(split.spec, runner=InProcessRunner(split.spec), seed=3)
    dims = split.spec.input_dims
    cache = [torch.zeros(1, dims[n][1], 0, dims[n][3]) for n in dims if n.startswith("past_")]
    with torch.no_grad():
        executor(torch.tensor([[5, 17, 99, 3]]), torch.zeros(1, 1, dtype=torch.long), cache)
    assert len(calls) == len([s for s in split.spec.stages if s.side == "gpu"])
    assert all(calls)
