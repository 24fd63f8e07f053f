"""Negative tests: each failure gives its specific, typed error naming what is at fault."""

import pytest
import torch
from conftest import captured
from torch import nn

from partitioner.api import partition
from partitioner.capturing import capture
from partitioner.errors import CaptureError, PartitionError, PolicyError, TeesplitError
from partitioner.placement import Placement, StagePlan
from partitioner.plan import Edge
from partitioner.split import validate


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be exported
            return x * 2
        return x - 1


class MutatesBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


def test_unexportable_model_gives_capture_error_with_torch_reason():
    with pytest.raises(CaptureError, match=r"torch\.export could not capture DataDependent"):
        capture(DataDependent(), (torch.randn(3),))


def test_buffer_mutation_is_refused_naming_the_buffer():
    with pytest.raises(CaptureError, match=r"mutates \['count'\]"):
        capture(MutatesBuffer(), (torch.randn(3),))


def test_plain_module_needs_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs are required"):
        capture(nn.Linear(2, 2))
    with pytest.raises(CaptureError, match="must be a tuple or a mapping"):
        capture(nn.Linear(2, 2), [torch.randn(2)])
    with pytest.raises(CaptureError, match=r"expected an nn\.Module"):
        capture("not a model")


def test_bad_policy_argument():
    with pytest.raises(PolicyError, match="neither a Policy"):
        partition(captured("tiny-llama"), "turbo")


def test_validate_catches_a_protected_parameter_on_the_gpu():
    sp = partition(captured("tiny-llama"), "secureinfer")
    gpu_stage = next(s for s in sp.stages if s.side == "gpu")
    gpu_stage.params.append("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(PartitionError, match=f"GPU stage {gpu_stage.name} would hold protected"):
        validate(None, sp.placement, sp.stages, sp.edges)


def test_validate_catches_a_cycle_and_a_double_placement():
    sp = partition(captured("tiny-llama"), "cmif")
    late = sp.stages[-1].name
    bad_edge = Edge("x", late, sp.stages[0].name, [1], "float32", 4, "gpu->enclave")
    with pytest.raises(
        PartitionError, match=f"edge x: stage {sp.stages[0].name} consumes it from {late}"
    ):
        validate(None, sp.placement, sp.stages, [*sp.edges, bad_edge])
    sp.stages[1].nodes.append(sp.stages[0].nodes[0])
    with pytest.raises(PartitionError, match=f"node {sp.stages[0].nodes[0]} is in both"):
        validate(None, sp.placement, sp.stages, sp.edges)


def test_validate_catches_an_unplaced_node():
    sp = partition(captured("tiny-llama"), "cmif")
    placement = Placement({**sp.placement.sides, "ghost": "gpu"}, {}, [StagePlan("gpu")], set(), 0)
    with pytest.raises(PartitionError, match=r"nodes placed but in no stage: \['ghost'\]"):
        validate(None, placement, sp.stages, sp.edges)


def test_all_errors_share_a_base_class():
    for error in (CaptureError, PartitionError, PolicyError):
        assert issubclass(error, TeesplitError)
