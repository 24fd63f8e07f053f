"""The call a whole-step enclave library makes where the split has a GPU stage.

A step library (``partitioner.aot_step``) is every enclave stage of a split program compiled
into one shared object; where the program crosses to the GPU it calls
``teesplit_step::gpu(stage, verdict, sent, like, widths)``, which AOTInductor's proxy executor
dispatches back to Python. This module defines that op for both sides: the compiler traces
it (its fake kernel: output ``i`` has the rows and dtype of ``sent[like[i]]`` and last dim
``widths[i]``, as the compiled code reads it; then the verdict, passed on), the enclave runs
it (its CPU kernel calls the handler of the step call in progress on this thread,
``enclave_runtime.step``).

``verdict`` is the first refusal of the enclave code so far (:data:`GO_ON`;
:data:`REFUSED`: a value it masked was refused; :data:`FAILED` plus a GPU stage's position:
that stage's reply failed the Freivalds check made on it), so that the handler ends the call
before sending anything after a refusal. The verdict a call returns is the next call's
input, so the library makes its GPU calls in program order, each after every check before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

GO_ON = 0
REFUSED = 1
FAILED = 2  # + the position (in the plan's stages) of the GPU stage whose reply failed

Handler = Callable[
    [int, torch.Tensor, list[torch.Tensor], list[int], list[int]], list[torch.Tensor]
]

_LIB = torch.library.Library("teesplit_step", "DEF")
_LIB.define("gpu(int stage, Tensor verdict, Tensor[] sent, int[] like, int[] widths) -> Tensor[]")

_local = threading.local()


def _run(
    stage: int, verdict: torch.Tensor, sent: list[torch.Tensor], like: list[int], widths: list[int]
) -> list[torch.Tensor]:
    handler = getattr(_local, "handler", None)
    if handler is None:
        raise RuntimeError(f"teesplit_step::gpu({stage}) called outside a step call")
    return handler(stage, verdict, list(sent), list(like), list(widths))


def _fake(
    stage: int, verdict: torch.Tensor, sent: list[torch.Tensor], like: list[int], widths: list[int]
) -> list[torch.Tensor]:
    outs = [sent[i].new_empty((*sent[i].shape[:-1], w)) for i, w in zip(like, widths, strict=True)]
    return [*outs, torch.empty_like(verdict)]


_LIB.impl("gpu", _run, "CPU")
torch.library.register_fake("teesplit_step::gpu", _fake, lib=_LIB)

GPU = torch.ops.teesplit_step.gpu.default


@contextmanager
def handling(handler: Handler) -> Iterator[None]:
    """Route this thread's ``teesplit_step::gpu`` calls to ``handler`` while in the block."""
    previous = getattr(_local, "handler", None)
    _local.handler = handler
    try:
        yield
    finally:
        _local.handler = previous
