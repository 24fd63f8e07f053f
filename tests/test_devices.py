"""GPU stages captured on the CPU run on another device (found on an H200, where none did).

``prepare_ring_weights(module, device)`` is how the worker and in-process runners put a GPU
stage on its device. The meta device stands in for CUDA here: a stage that names the
capture's ``cpu`` anywhere in its graph (positions, masks, ``.to`` calls, metadata asserts)
fails on it as it failed on CUDA, and a stage that moved parameters in place moved the ones
the enclave's stages share (a tied embedding) with them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import captured

from enclave_runtime.executor import InProcessRunner
from partitioner.api import partition
from partitioner.ops import prepare_ring_weights

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


class Recording:
    def __init__(self, inner):
        self.inner = inner
        self.sent = {}

    def run(self, stage, tensors, expected=None, **kw):
        self.sent.setdefault(stage, tensors)
        return self.inner.run(stage, tensors, expected, **kw)

    def release(self, stage, rows):
        self.inner.release(stage, rows)


@pytest.mark.parametrize("preset", ["cmif", "all_gpu", "slalom"])
def test_every_gpu_stage_runs_on_another_device(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(captured("tiny-llama"), preset, seed=3)
    runner = Recording(InProcessRunner(split.spec))
    with torch.no_grad():
        split.executor(runner, seed=1)(input_ids=IDS)
    before = {name: t.device for s in split.stages for name, t in s.module.state_dict().items()}
    for stage in split.stages:
        if stage.side != "gpu":
            continue
        moved = prepare_ring_weights(stage.module, torch.device("meta"))
        with torch.no_grad():
            outs = moved(*(t.to("meta") for t in runner.sent[stage.name]))
        assert all(o.device.type == "meta" for o in outs), stage.name
    after = {name: t.device for s in split.stages for name, t in s.module.state_dict().items()}
    assert after == before  # nothing the enclave's stages hold moved with them
