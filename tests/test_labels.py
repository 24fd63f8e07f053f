"""Per-rule labelling tests on tiny modules (positive and negative), and per-model counts."""

from collections import Counter

import pytest
import torch
from conftest import captured
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from partitioner.errors import LabelError
from partitioner.label_set import Label
from passes.base import AnalysisPass
from passes.labels import label_of, label_program


def labels_of(module: nn.Module, *args: torch.Tensor) -> dict[str, Label]:
    program = torch.export.export(module.eval(), args, strict=False)
    label_program(program)
    return {n.name: label_of(n) for n in program.graph.nodes if n.op == "call_function"}


def linear_labels_by_module(module: nn.Module, *args: torch.Tensor) -> dict[str, Label]:
    program = torch.export.export(module.eval(), args, strict=False)
    label_program(program)
    return {
        list(n.meta["nn_module_stack"].values())[-1][0]: label_of(n)
        for n in program.graph.nodes
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default
    }


class ToyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        return scores.softmax(-1)


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class ToyRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ToyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = ToyRMSNorm()
        self.attn = ToyAttention()
        self.mlp = ToyMLP()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        return x + self.mlp(h) + self.fc(h) + self.attn(h).sum(-1, keepdim=True)


class ToyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layer = ToyLayer()
        self.head = nn.Linear(8, 32, bias=False)
        self.pool = nn.Linear(8, 5)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.layer(self.embed(ids))
        return self.head(h), self.pool(h)


def by_rule(labels: dict[str, Label]) -> Counter:
    return Counter(labels.values())


def test_embedding_and_lm_head_and_unplaced_linear():
    ids = torch.randint(0, 32, (2, 4))
    assert labels_of(ToyLM(), ids)["embedding"] == Label.EMBEDDING
    assert linear_labels_by_module(ToyLM(), ids) == {
        "layer.attn.q": Label.ATTENTION_PROJECTION,
        "layer.attn.k": Label.ATTENTION_PROJECTION,
        "layer.mlp.up": Label.FFN,
        "layer.mlp.down": Label.FFN,
        "layer.fc": Label.FFN,  # a weight-linear in a *Layer outside attention
        "head": Label.LM_HEAD,  # outside layers, output is vocabulary-sized
        "pool": Label.OTHER,  # outside layers, not vocabulary-sized: reported, not guessed
    }


def test_tied_lm_head_is_recognised_by_weight():
    labels = labels_of(ToyLM(tied=True), torch.randint(0, 32, (2, 4)))
    assert sum(v == Label.LM_HEAD for v in labels.values()) == 1


def test_norm_spelled_out_is_norm_in_every_piece():
    labels = labels_of(ToyRMSNorm(), torch.randn(2, 8))
    assert set(labels.values()) == {Label.NORM}
    assert len(labels) >= 5  # pow, mean, add, rsqrt, mul, mul


def test_norm_op_outside_a_norm_module():
    class F(nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (8,))

    assert set(labels_of(F(), torch.randn(2, 8)).values()) == {Label.NORM}


def test_activation_module_and_op():
    labels = labels_of(ToyMLP(), torch.randn(2, 8))
    assert labels["gelu"] == Label.NONLINEAR

    class F(nn.Module):
        def forward(self, x):
            return torch.tanh(x) + torch.exp(x)

    labels = labels_of(F(), torch.randn(2, 8))
    assert labels["tanh"] == labels["exp"] == Label.NONLINEAR
    assert labels["add"] == Label.ELEMENTWISE


def test_attention_products_only_inside_attention():
    labels = labels_of(ToyAttention(), torch.randn(2, 3, 8))
    assert labels["matmul"] == Label.ATTENTION
    assert labels["softmax"] == Label.NONLINEAR

    class Product(nn.Module):
        def forward(self, a, b):
            return a @ b

    assert labels_of(Product(), torch.randn(2, 3), torch.randn(3, 2))["matmul"] == Label.OTHER


def test_sdpa_is_attention():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 2, 4, 8)
    assert set(labels_of(Attn(), x, x, x).values()) == {Label.ATTENTION}


def test_shape_ops_and_unknown_ops():
    class F(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x.view(4, 2).permute(1, 0)).real

    labels = labels_of(F(), torch.randn(8))
    assert labels["view"] == labels["permute"] == Label.SHAPE
    others = [n for n, v in labels.items() if v == Label.OTHER]
    assert others, "an op with no rule must be labelled other, not guessed"


def test_gather_from_weight_is_embedding():
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))

        def forward(self, idx):
            return self.table.index_select(0, idx)

    assert labels_of(Lookup(), torch.tensor([1, 2]))["index_select"] == Label.EMBEDDING


def test_lora_adapter_and_base_layer():
    pytest.importorskip("peft")
    labels = captured("tiny-llama-lora").program
    label_program(labels)
    found = Counter()
    for node in labels.graph.nodes:
        if node.op != "call_function":
            continue
        stack = " ".join(q for q, _ in (node.meta.get("nn_module_stack") or {}).values())
        if ".lora_A." in stack or ".lora_B." in stack:
            found["adapter", label_of(node)] += 1
        elif stack.endswith("q_proj.base_layer"):
            found["base", label_of(node)] += 1
    assert found["adapter", Label.LORA] > 0 and not [
        k for k in found if k[0] == "adapter" and k[1] != Label.LORA
    ]
    assert found["base", Label.ATTENTION_PROJECTION] == 2  # one q_proj base linear per layer


def test_analysis_pass_may_not_edit_the_graph():
    class Vandal(AnalysisPass):
        def call(self, graph_module):
            node = next(n for n in graph_module.graph.nodes if n.op == "call_function")
            node.target = torch.ops.aten.sub.Tensor
            return PassResult(graph_module, False)

    class F(nn.Module):
        def forward(self, x):
            return x + 1

    program = torch.export.export(F(), (torch.randn(2),), strict=False)
    with pytest.raises(LabelError, match="Vandal edited the graph"):
        Vandal()(program.graph_module)


# Expected per-model counts follow from each architecture's structure, not from the labeller.
@pytest.mark.parametrize(
    ("name", "layers", "proj_per_layer", "ffn_per_layer", "attention_per_layer", "lm_head"),
    [
        ("tiny-llama", 2, 4, 3, 1, 1),
        ("tiny-gpt2", 2, 2, 2, 1, 1),  # fused c_attn + c_proj; c_fc + c_proj (Conv1D addmm)
        ("tiny-qwen2", 2, 4, 3, 1, 1),
        ("tiny-opt", 2, 4, 2, 1, 1),  # fc1/fc2 sit directly in the decoder layer
        ("tiny-phi3", 2, 2, 2, 1, 1),  # fused qkv_proj and gate_up_proj
        ("minilm", 6, 4, 2, 1, 0),  # query/key/value + attention.output.dense
        ("tiny-llama-lora", 2, 4, 3, 1, 1),
    ],
)
def test_model_label_counts(
    name, layers, proj_per_layer, ffn_per_layer, attention_per_layer, lm_head
):
    program = captured(name).program
    label_program(program)
    counts = Counter(label_of(n) for n in program.graph.nodes if n.op == "call_function")
    assert counts[Label.ATTENTION_PROJECTION] == layers * proj_per_layer
    assert counts[Label.FFN] == layers * ffn_per_layer
    assert counts[Label.ATTENTION] == layers * attention_per_layer
    assert counts[Label.LM_HEAD] == lm_head
    assert counts[Label.EMBEDDING] >= 1
    assert counts[Label.NORM] >= layers
    assert counts[Label.NONLINEAR] >= layers


@pytest.mark.slow
def test_smollm2_label_counts():
    program = captured("smollm2-135m").program
    label_program(program)
    counts = Counter(label_of(n) for n in program.graph.nodes if n.op == "call_function")
    assert counts[Label.ATTENTION_PROJECTION] == 30 * 4
    assert counts[Label.FFN] == 30 * 3
    assert counts[Label.ATTENTION] == 30
    assert counts[Label.LM_HEAD] == 1
    assert counts[Label.OTHER] == 0
