"""Property tests: random DAG modules -> acyclic stages, every node placed once, same outputs."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from partitioner.api import partition
from partitioner.capturing import capture
from partitioner.label_set import ALL_LABELS
from partitioner.policy import Policy

OPS = ["linear", "relu", "add", "mul", "norm", "softmax", "matmul_t", "reshape", "tanh"]
WIDTH = 8


class RandomDag(nn.Module):
    """Each step applies an op to one or two earlier values; the last value is returned."""

    def __init__(self, steps: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.steps = steps
        self.linears = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in steps)
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = [x]
        for i, (op, a, b) in enumerate(self.steps):
            u, v = values[a % len(values)], values[b % len(values)]
            if op == "linear":
                out = self.linears[i](u)
            elif op == "relu":
                out = torch.relu(u)
            elif op == "add":
                out = u + v
            elif op == "mul":
                out = u * v
            elif op == "norm":
                out = self.norms[i](u)
            elif op == "softmax":
                out = u.softmax(-1)
            elif op == "matmul_t":
                out = (u @ v.transpose(0, 1)) @ v / WIDTH
            elif op == "reshape":
                out = u.reshape(-1, 2, WIDTH // 2).flatten(1)
            else:
                out = torch.tanh(u)
            values.append(out)
        return values[-1], values[len(values) // 2]


labels = st.sampled_from(sorted(ALL_LABELS))


@st.composite
def dag_and_policy(draw):
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50)),
            min_size=1,
            max_size=12,
        )
    )
    chosen = draw(st.lists(labels, unique=True))
    split = draw(st.integers(0, len(chosen)))
    policy = Policy(
        name="random",
        enclave=chosen[:split],
        gpu=chosen[split:],
        min_gpu_block=draw(st.integers(1, 3)),
    )
    return steps, policy


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_and_policy())
def test_random_dags_split_correctly(case):
    steps, policy = case
    torch.manual_seed(0)
    module = RandomDag(steps).eval()
    x = torch.randn(4, WIDTH)
    sp = partition(capture(module, (x,)), policy)

    # every compute node placed exactly once
    placed = [n for s in sp.stages for n in s.nodes]
    assert len(placed) == len(set(placed)) == len(sp.placement.sides)
    # acyclic: each stage consumes only what earlier stages (or the input) produced
    seen = {"input"}
    for stage in sp.stages:
        assert {e.producer for e in sp.edges if e.consumer == stage.name} <= seen
        seen.add(stage.name)
    # pinned labels are honoured (no protection is asked for, so nothing overrides them)
    for stage in sp.stages:
        for name in stage.nodes:
            pin = policy.pinned_side(sp.labels[name])
            if pin and not sp.placement.why[name].startswith("GPU block"):
                assert stage.side == pin
    # same outputs as the module
    with torch.no_grad():
        expected = module(x)
        got = sp(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
