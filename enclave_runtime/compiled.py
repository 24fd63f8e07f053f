"""Running an enclave stage from its ahead-of-time compiled library (``partitioner.aot``).

Reads a stage's ``.so`` (AOTInductor's C++ runner, in torch) and the constants it was lowered
with; calling it runs the stage. Guarantees: the library's inputs are what it was compiled
for (the stage's inputs, contiguous, then its constants); a stage whose lowered graph carries
a check flag raises :class:`InputError` when the flag is false, as the eager kernels raise.
Nothing here compiles: the enclave loads machine code the compiler built and the bundle
measures (``plan.json`` lists each library's sha256, the Gramine manifest as a trusted file).
"""

from __future__ import annotations

import torch

from partitioner.errors import ArtifactError, InputError
from partitioner.plan import CompiledLibrary


class CompiledCall:
    """One enclave stage's library, callable like the stage's module."""

    def __init__(self, name: str, library: CompiledLibrary) -> None:
        self.name = name
        self.library = library.path
        self.constants = [c.contiguous() for c in library.constants]
        self.checks = library.checks
        try:
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(self.library, 1)
        except RuntimeError as exc:
            raise ArtifactError(
                f"enclave stage {name}: cannot load its compiled library {self.library}: "
                f"{str(exc).splitlines()[0]}"
            ) from None

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        outs = self._runner.run([a.contiguous() for a in args] + self.constants)
        if self.checks:
            if not bool(outs.pop()):
                raise InputError(
                    f"enclave stage {self.name}: a value to be masked is NaN or inf, or its "
                    "fixed point exceeds its norm limit (refused, rather than sending the GPU "
                    "a residue that stands for nothing)"
                )
        return outs
