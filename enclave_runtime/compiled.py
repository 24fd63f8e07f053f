"""Running an enclave stage from its ahead-of-time compiled library (``partitioner.aot``).

Reads a stage's ``.so`` (AOTInductor's C++ runner, in torch) and the constants it was lowered
with; calling it runs the stage. Guarantees: the library's inputs are what it was compiled
for (the stage's inputs, with the sizes and strides it was compiled for, then its constants:
the library's own checks refuse any other, an input with no elements is checked here, a view
is copied); a stage whose lowered graph carries
a check flag raises :class:`InputError` when the flag is false, as the eager kernels raise.
Nothing here compiles: the enclave loads machine code the compiler built and the bundle
measures (``plan.json`` lists each library's sha256, the Gramine manifest as a trusted file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from partitioner.dims import concrete_shape, names_in
from partitioner.errors import ArtifactError, InputError, IntegrityError
from partitioner.plan import CompiledLibrary

# AOTInductor's libraries check their inputs' dtypes, static sizes, size ranges and strides
# only when this is set (read once, at a library's first call): set it before any runs.
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"


def _has_elements(arg: object) -> bool:
    """Whether ``arg`` is a tensor with at least one element (anything else: ``False``, so
    that the full check names it)."""
    return isinstance(arg, torch.Tensor) and arg.numel() > 0


class CompiledCall:
    """One enclave stage's library, callable like the stage's module."""

    def __init__(self, name: str, library: CompiledLibrary) -> None:
        self.name = name
        self.library = library.path
        self.constants = [c.contiguous() for c in library.constants]
        self.checks = library.checks
        self.verifies = library.verifies[0] if library.verifies is not None else None
        self.inputs = [(getattr(torch, dtype), list(shape)) for dtype, shape in library.inputs]
        self._checked: set[tuple[object, ...]] = set()
        try:
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(self.library, 1)
        except RuntimeError as exc:
            raise ArtifactError(
                f"enclave stage {name}: cannot load its compiled library {self.library}: "
                f"{str(exc).splitlines()[0]}"
            ) from None

    def check(self, args: tuple[torch.Tensor, ...]) -> None:
        """Refuse inputs the library was not compiled for, before it reads them: compiled
        code indexes memory by the sizes it is given, so an input whose size disagrees with
        another's (a GPU reply shorter than the correction it is unmasked with) would be read
        past its end instead of raising, as the eager ops do. Raises :class:`IntegrityError`."""
        if len(args) != len(self.inputs):
            raise IntegrityError(
                f"enclave stage {self.name} takes {len(self.inputs)} inputs, got {len(args)}"
            )
        sizes: dict[str, int] = {}
        for i, (arg, (dtype, shape)) in enumerate(zip(args, self.inputs, strict=True)):
            if not isinstance(arg, torch.Tensor) or arg.dtype != dtype or arg.dim() != len(shape):
                raise IntegrityError(
                    f"enclave stage {self.name} input {i}: expected {dtype} of shape {shape}"
                )
            for want, got in zip(shape, arg.shape, strict=True):
                if isinstance(want, str) and want.isidentifier():
                    want = sizes.setdefault(want, got)
                if isinstance(want, int) and want != got:
                    raise IntegrityError(
                        f"enclave stage {self.name} input {i}: shape {list(arg.shape)} does "
                        f"not match {shape} (sizes so far {sizes})"
                    )
        for i, (arg, (_, shape)) in enumerate(zip(args, self.inputs, strict=True)):
            if all(isinstance(d, int) or d.isidentifier() for d in shape):
                continue
            want_shape: list[int] | None = []
            for want, got in zip(shape, arg.shape, strict=True):
                if isinstance(want, int):
                    want_shape.append(want)
                elif names_in(want) <= sizes.keys():  # "past + seq" of sizes bound above
                    try:
                        want_shape.append(concrete_shape([want], sizes)[0])
                    except ValueError:
                        want_shape = None
                        break
                else:  # a size no plain dim names: every input that has it must agree
                    want_shape.append(sizes.setdefault(want, got))
            if want_shape != list(arg.shape):
                raise IntegrityError(
                    f"enclave stage {self.name} input {i}: shape {list(arg.shape)} does not "
                    f"match {shape} (sizes {sizes})"
                )

    def __call__(
        self, *args: torch.Tensor, checks: Sequence[torch.Tensor] = ()
    ) -> list[torch.Tensor]:
        """Run the stage on ``args`` (its inputs, checked as above). A library that verifies
        a GPU reply also takes ``checks``, the check's vectors (the executor's own tensors,
        ``RingCheck.fused_args``), and raises :class:`IntegrityError` when the reply fails
        the check, before (and instead of) any refusal of the values made from it."""
        # The library checks its inputs itself before any kernel reads them (dtypes, static
        # sizes, ranges, one value per size across inputs, strides: AOTI_RUNTIME_CHECK_INPUTS
        # above; without it, an input one position short is read past its end). Its checks
        # miss one case: an input with no elements passes them whatever its sizes (a
        # reviewer's finding: a [1, 0, 129] reply read as [1, 9, 129], SIGSEGV). So a call
        # with an empty input is checked here first, once per distinct signature of inputs;
        # a call without one costs a numel per input (~2 us a call, against ~10 us for the
        # signature and the copies it replaces: 121 calls a decode step).
        if len(args) != len(self.inputs) or not all(map(_has_elements, args)):
            signature = tuple((a.dtype, a.shape) for a in args)
            if signature not in self._checked:
                self.check(args)
                if len(self._checked) > 4096:  # a long-running server's many sizes
                    self._checked.clear()
                self._checked.add(signature)
        return self.run_nonempty(args, checks)

    def run_nonempty(
        self, args: Sequence[torch.Tensor], checks: Sequence[torch.Tensor] = ()
    ) -> list[torch.Tensor]:
        """:meth:`__call__` for a caller that knows no input is empty (the scan above is all
        that differs): ``enclave_runtime.fastpath``, from the call's own inputs and the reply
        shapes it checks, once one call has passed the full scan."""
        try:
            outs = self._runner.run([*args, *checks, *self.constants])
        except RuntimeError as exc:
            # the library refuses strides other than the ones it was compiled for (its
            # checks compare them, dim by dim): a view (a transposed cache a caller passes)
            # runs again as a contiguous copy
            contiguous = torch.Tensor.is_contiguous
            if all(map(contiguous, args)) and all(map(contiguous, checks)):
                self.check(args)  # names the input at fault, where a size is
                raise IntegrityError(
                    f"enclave stage {self.name}: its compiled library refused the inputs: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
            return self(*[a.contiguous() for a in args], checks=[c.contiguous() for c in checks])
        masks_ok = bool(outs.pop()) if self.checks else True
        # the reply's check first: a value that a wrong reply became may also fail a mask's
        # norm limit, and which error is raised must not depend on the enclave's data
        if self.verifies is not None and not bool(outs.pop()):
            raise self.check_failed()
        if not masks_ok:
            raise self.masks_refused()
        return outs

    def check_failed(self) -> IntegrityError:
        """The error of a call whose fused Freivalds check failed."""
        return IntegrityError(
            f"GPU stage {self.verifies} returned results that fail the Freivalds check "
            f"(made in enclave stage {self.name}'s compiled library; exact: an honest "
            "result always passes, a wrong one passes with probability <= 2**-31)"
        )

    def masks_refused(self) -> InputError:
        """The error of a call whose masks' flag is false."""
        return InputError(
            f"enclave stage {self.name}: a value to be masked is NaN or inf, or its "
            "fixed point exceeds its norm limit (refused, rather than sending the GPU "
            "a residue that stands for nothing)"
        )
