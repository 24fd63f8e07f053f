"""Running a split program's whole enclave side from its step library (``partitioner.aot_step``).

Reads a :class:`~partitioner.plan.StepLibrary` (one ``.so``, and the ``.json`` that lists its
``teesplit_step::gpu`` calls for AOTInductor's proxy executor); calling it runs every enclave
stage in order, and each GPU stage through ``handler`` (the executor's: it sends the request,
checks the reply and returns it). Guarantees:

* **Inputs it was compiled for.** The call's inputs are checked before the library reads
  them: their dtypes here, their sizes and strides by the library's own checks
  (``AOTI_RUNTIME_CHECK_INPUTS``), an input with no elements here against its plan shape
  (the library's checks pass any empty tensor), a view copied (a library call cannot be
  retried: it has made GPU calls).
* **The handler's error, as it was raised.** An error in the handler (a reply that fails a
  check, a refused value) ends the library's run; it is raised here as the handler raised
  it, not as AOTInductor's ``RuntimeError``.

:func:`run_step` is the executor's call through it: the library's inputs from the call and its
mask set, and the handler that sends each GPU stage's request and checks its reply (the
executor's own loop does the same per stage: ``Executor.execute``, ``enclave_runtime.fastpath``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from enclave_runtime import compiled  # noqa: F401  (sets AOTI_RUNTIME_CHECK_INPUTS first)
from enclave_runtime.pool import MaskSet
from enclave_runtime.replies import Expected, check_reply, snapshot
from partitioner import step_op
from partitioner.dims import concrete_shape
from partitioner.errors import ArtifactError, InputError, IntegrityError
from partitioner.plan import StepLibrary


class StepCall:
    """A step library, callable with its inputs (without its constants)."""

    def __init__(self, library: StepLibrary) -> None:
        self.library = library
        self.checked = self.checked_stages(library)
        self.constants = [c.contiguous() for c in library.constants]
        self.dtypes = {name: getattr(torch, d) for name, d in library.dtypes.items()}
        self._lock = threading.Lock()
        self._inside = threading.local()
        try:
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(library.path, 1)
        except RuntimeError as exc:
            raise ArtifactError(
                f"cannot load the step library {library.path}: {str(exc).splitlines()[0]}"
            ) from None

    @staticmethod
    def checked_stages(library: StepLibrary) -> frozenset[str]:
        """The GPU stages whose replies the library checks (a check vector is its input)."""
        return frozenset(name for kind, name in library.sources if kind == "check")

    def check(
        self,
        env: Mapping[str, object],
        dims: Mapping[str, list[int | str]],
        binding: Mapping[str, int],
    ) -> None:
        """Refuse a call input of the wrong dtype, or with no elements and the wrong shape
        (:class:`InputError` naming it)."""
        for name, dtype in self.dtypes.items():
            value = env.get(name)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(f"input {name}: expected {dtype}, got {got}")
            if value.numel() == 0 and name in dims:
                try:
                    want = concrete_shape(dims[name], binding)
                except ValueError:
                    want = None
                if want != list(value.shape):
                    raise InputError(
                        f"input {name}: shape {list(value.shape)}, the plan says {dims[name]}"
                    )

    def __call__(
        self, args: list[torch.Tensor], handler: Callable[..., list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        raised: list[BaseException] = []

        def handle(*call: object) -> list[torch.Tensor]:
            try:
                return handler(*call)
            except BaseException as exc:  # kept: AOTInductor turns it into a RuntimeError
                raised.append(exc)
                raise

        args = [a if a.is_contiguous() else a.contiguous() for a in args]
        if getattr(self._inside, "active", False):
            # the library holds one model: a call from inside its own GPU call would wait
            # for itself, holding the GIL
            raise IntegrityError("the step library was called again from inside its GPU call")
        # another thread waits here without the GIL (the library's run holds it, and the
        # GPU call inside needs it back)
        with self._lock:
            self._inside.active = True
            try:
                with step_op.handling(handle):
                    return self._runner.run([*args, *self.constants])
            except RuntimeError as exc:
                if raised:
                    raise raised[0] from None
                raise IntegrityError(
                    f"the step library refused its inputs: {str(exc).splitlines()[0]}"
                ) from None
            finally:
                self._inside.active = False


def reply_as_read(
    stage: str,
    outs: list[torch.Tensor],
    sent: list[torch.Tensor],
    like: list[int],
    widths: list[int],
    fresh: bool,
) -> list[torch.Tensor]:
    """A GPU reply as a step library reads it (``partitioner.step_op``): output ``i`` with
    the dtype and rows of ``sent[like[i]]`` and ``widths[i]`` columns (refused otherwise:
    compiled code indexes it by that shape, whatever the plan says), contiguous, and not
    starting where another reply or a request does (copied where it does). ``fresh``: a
    runner in this process, whose replies are always copied (it may keep a reply and write
    to it later). ``outs`` must have passed ``check_reply`` (memory of their own, a storage
    as large as their shape and strides reach)."""
    if len(outs) != len(like):
        raise IntegrityError(f"GPU stage {stage} returned {len(outs)} outputs, not {len(like)}")
    seen = [t.data_ptr() for t in sent]
    out = []
    for i, (o, source, width) in enumerate(zip(outs, like, widths, strict=True)):
        model = sent[source]
        shape = o.shape
        if o.dtype != model.dtype or shape[-1] != width or shape[:-1] != model.shape[:-1]:
            raise IntegrityError(
                f"GPU stage {stage} output {i}: {o.dtype} {list(shape)}, the step library "
                f"reads {model.dtype} {[*model.shape[:-1], width]}"
            )
        if fresh:
            # a tensor made in this process may be kept and written to later: copied (its
            # storage has passed check_reply). A serialising runner's replies are new
            # tensors decoded from bytes here.
            o = o.clone(memory_format=torch.contiguous_format)
        elif o.data_ptr() in seen or not o.is_contiguous():
            o = o.clone(memory_format=torch.contiguous_format)
        seen.append(o.data_ptr())
        out.append(o)
    return out


# the verdict a step starts from (step_op.GO_ON): made once, the library only reads it
_STARTING_VERDICT = torch.zeros((), dtype=torch.int64)


def _rows_of(shape: list[int] | None) -> int:
    """How many rows a tensor of ``shape`` holds (``fastpath.request_rows``, from its shape)."""
    return math.prod((shape or [1])[:-1])


def run_step(
    executor: Any,
    step: StepCall,
    env: dict[str, Any],
    masks: MaskSet,
    delta: dict[str, Any],
    binding: Mapping[str, int],
    replies: dict[str, Expected],
) -> list[Any]:
    """One call of ``executor``'s program through the step library: ``Executor.execute``'s
    work, with every enclave stage in the library and each GPU stage's request, reply and
    check in ``handler``. ``masks``: the call's mask set; ``delta``: its corrections."""
    library = step.library
    step.check(env, executor.spec.input_dims, binding)
    checks = executor.ring_checks
    stages = executor.spec.stages
    arrays = masks.arrays
    copies = bool(getattr(executor.runner, "copies_inputs", False))
    run = executor.runner.run
    # the GPU stages whose replies the library checks (a request of few rows); the executor
    # checks the others in numpy as they come, as its own loop does
    here = {
        name
        for name in step.checked
        if _rows_of(replies[name][0][1]) <= executor.library_check_rows
    }
    args = []
    for kind, name in library.sources:
        if kind == "input":
            args.append(env[name])
        elif kind == "pad":
            args.append(masks.pads[name])
        elif kind == "delta":
            args.append(delta[name])
        elif kind == "check":
            args.append(checks[name].fused_vector(name in here))
        else:
            args.append(_STARTING_VERDICT)

    def handler(
        position: int,
        verdict: torch.Tensor,
        sent: list[torch.Tensor],
        like: list[int],
        widths: list[int],
    ) -> list[torch.Tensor]:
        code = int(verdict)
        if code != step_op.GO_ON:
            _refuse(checks, stages, code)
        stage = stages[position]
        name = stage.name
        expected = replies[name]
        check = checks.get(name)
        in_library = name in here
        sums = None
        if check is not None and not in_library:
            pads = [arrays[n] if n in arrays else delta.get(n) for n in stage.inputs]
            sums = check.expect(sent, pads)
        # the library checks the reply against the tensors it sent: a runner that could
        # edit what it is handed gets copies, whatever it says
        handed = sent if copies and not in_library else [t.clone() for t in sent]
        outs = snapshot(run(name, handed, expected))
        check_reply(name, outs, expected)
        outs = reply_as_read(name, outs, sent, like, widths, fresh=not copies)
        if check is not None and not in_library:
            deltas = [arrays[n] if n in arrays else delta.get(n) for n in stage.outputs]
            check.verify(sums, outs, deltas)
        return [*outs, torch.zeros((), dtype=torch.int64)]

    outs = step(args, handler)
    if len(outs) != len(library.outputs) + 1:
        raise IntegrityError(
            f"the step library returned {len(outs)} values, its index lists "
            f"{len(library.outputs)} and a verdict"
        )
    code = int(outs.pop())
    if code != step_op.GO_ON:
        _refuse(checks, stages, code)
    env = dict(env)
    gpu: dict[str, Any] = {}
    for (where, name), value in zip(library.outputs, outs, strict=True):
        (env if where == "env" else gpu)[name] = value
    return [executor._output(v, env, gpu, delta) for v in executor.spec.flat_outputs]


def _refuse(checks: Mapping[str, Any], stages: list[Any], code: int) -> None:
    """Raise what the stages' libraries would have raised for the verdict ``code``."""
    position = code - step_op.FAILED
    verified = stages[position].name if 0 <= position < len(stages) else None
    if verified in checks:
        checks[verified].draw()  # a failed check told the GPU something about s
        raise IntegrityError(
            f"GPU stage {verified} returned results that fail the Freivalds check "
            "(made in the step library; exact: an honest result always passes, a wrong "
            "one passes with probability <= 2**-31)"
        )
    if code == step_op.REFUSED:
        raise InputError(
            "a value to be masked is NaN or inf, or its fixed point exceeds its norm "
            "limit (refused, rather than sending the GPU a residue that stands for nothing)"
        )
    raise IntegrityError(f"the step library returned verdict {code}")
