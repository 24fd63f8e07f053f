"""Per-rule labelling tests on tiny modules (positive and negative), and per-model counts."""

from collections import Counter

import pytest
import torch
from conftest import captured, model_output
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from partitioner.errors import LabelError
from partitioner.label_set import Label
from partitioner.op_table import MATRIX_PRODUCT_OPS, op_name
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


# -- a linear layer however it is spelled ----------------------------------------------------
# Architectures written without nn.Linear multiply by the parameter, or a view of it, directly.
# Each spelling must be found as the weight-linear layer it is and labelled by its module scope
# exactly as F.linear is: before, ``x @ W.T`` in an attention module was labelled ``attention``
# (aten.numpy_T was no shape op, so the product looked like one of two activations) and slalom
# silently kept it in the enclave.
SPELLINGS = {
    "linear": lambda x, w: nn.functional.linear(x, w),
    "x @ W.T": lambda x, w: x @ w.T,
    "x @ W.t()": lambda x, w: x @ w.t(),
    "matmul(x, W.mT)": lambda x, w: torch.matmul(x, w.mT),
    "matmul(x, Wt)": lambda x, wt: torch.matmul(x, wt),  # W stored transposed, (in, out)
    "einsum": lambda x, w: torch.einsum("bsi,oi->bso", x, w),
    "bmm(x, W.T.expand)": lambda x, w: torch.bmm(x, w.T.expand(x.shape[0], -1, -1)),
    "bmm(x, Wt.expand_as)": lambda x, wt: torch.bmm(
        x, wt.expand_as(x.new_empty(x.shape[0], *wt.shape))
    ),
}
STORED_TRANSPOSED = {"matmul(x, Wt)", "bmm(x, Wt.expand_as)"}


class Proj(nn.Module):
    """A linear layer without nn.Linear: ``spelling`` names how its product is written."""

    def __init__(self, d_in: int, d_out: int, spelling: str, buffer: bool = False) -> None:
        super().__init__()
        self.spelling = spelling
        weight = torch.randn(d_out, d_in) / d_in**0.5
        if spelling in STORED_TRANSPOSED:
            weight = weight.T.contiguous()
        if buffer:  # e.g. a frozen, dequantised weight: a buffer is a weight as much
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)

    def forward(self, x):
        return SPELLINGS[self.spelling](x, self.weight)


class SpelledAttention(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.q = Proj(8, 8, spelling)
        self.k = Proj(8, 8, spelling)

    def forward(self, x):
        # a product of two activations, the second transposed: attention, not a weight layer
        return (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1)


class SpelledMLP(nn.Module):
    def __init__(self, spelling: str, buffer: bool = False) -> None:
        super().__init__()
        self.up = Proj(8, 16, spelling, buffer)
        self.down = Proj(16, 8, spelling, buffer)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class SpelledLayer(nn.Module):
    def __init__(self, spelling: str, buffer: bool = False) -> None:
        super().__init__()
        self.attn = SpelledAttention(spelling)
        self.mlp = SpelledMLP(spelling, buffer)
        self.fc = Proj(8, 8, spelling)

    def forward(self, x):
        return x + self.mlp(x) + self.fc(x) + self.attn(x).sum(-1, keepdim=True)


class SpelledLM(nn.Module):
    def __init__(self, spelling: str, buffer: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layer = SpelledLayer(spelling, buffer)
        self.head = Proj(8, 32, spelling)
        self.pool = Proj(8, 5, spelling)

    def forward(self, ids):
        h = self.layer(self.embed(ids))
        return self.head(h), self.pool(h)


def product_labels(module: nn.Module, ids: torch.Tensor, dynamic: bool) -> dict[str, Label]:
    """Label of each matrix product, keyed by the qualified name of its innermost module."""
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=64)
    shapes = {"ids": {0: batch, 1: seq}} if dynamic else None
    program = torch.export.export(module.eval(), (ids,), dynamic_shapes=shapes, strict=False)
    label_program(program)
    found: dict[str, Label] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and op_name(node) in MATRIX_PRODUCT_OPS:
            scope = list(node.meta["nn_module_stack"].values())[-1][0]
            assert scope not in found, f"two products in {scope}"
            found[scope] = label_of(node)
    return found


LINEAR_LABELS = {
    "layer.attn.q": Label.ATTENTION_PROJECTION,
    "layer.attn.k": Label.ATTENTION_PROJECTION,
    "layer.attn": Label.ATTENTION,  # q @ k.transpose: two activations
    "layer.mlp.up": Label.FFN,
    "layer.mlp.down": Label.FFN,
    "layer.fc": Label.FFN,
    "head": Label.LM_HEAD,
    "pool": Label.OTHER,
}


def test_functional_linear_reference_labels():
    ids = torch.randint(0, 32, (2, 4))
    assert product_labels(SpelledLM("linear"), ids, dynamic=False) == LINEAR_LABELS


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("spelling", sorted(set(SPELLINGS) - {"linear"}))
def test_every_spelling_of_a_linear_layer_is_labelled_like_linear(spelling, dynamic):
    # dynamic: the batch a bmm's weight is expanded to is a symbolic size read off x, which
    # must not make the expanded weight look like an activation
    ids = torch.randint(0, 32, (2, 4))
    reference = product_labels(SpelledLM("linear"), ids, dynamic)
    assert product_labels(SpelledLM(spelling), ids, dynamic) == reference


@pytest.mark.parametrize("spelling", ["linear", "x @ W.T", "matmul(x, Wt)"])
def test_a_buffer_weight_is_a_weight(spelling):
    labels = product_labels(SpelledLM(spelling, buffer=True), torch.randint(0, 32, (2, 4)), False)
    assert labels == LINEAR_LABELS


def test_transposed_weight_rules_name_the_weight_product():
    program = torch.export.export(
        SpelledAttention("x @ W.T").eval(), (torch.randn(2, 3, 8),), strict=False
    )
    label_program(program)
    rules = {
        n.name: n.meta["teesplit"]["label_rule"]
        for n in program.graph.nodes
        if n.op == "call_function"
    }
    assert rules["numpy_t"] == "op:numpy_T"  # the transpose of a weight is a shape op
    products = [r for n, r in rules.items() if n.startswith("matmul")]
    assert sorted(products) == [
        "op:matmul-of-activations-in-attention",
        "weight-matmul-in-attention",
        "weight-matmul-in-attention",
    ]


@pytest.mark.parametrize(
    "product",
    [
        lambda q, k: q @ k.transpose(-1, -2),
        lambda q, k: q @ k.mT,
        lambda q, k: torch.einsum("bsd,btd->bst", q, k),
        lambda q, k: torch.bmm(q, k.transpose(1, 2)),
    ],
    ids=["transpose", "mT", "einsum", "bmm"],
)
def test_a_product_of_two_activations_is_not_weight_linear(product):
    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x, y):
            # k is computed from a weight, but it is an activation, not the weight
            return product(x, y @ self.w.T + 1)

    program = torch.export.export(
        Product().eval(), (torch.randn(2, 3, 8), torch.randn(2, 5, 8)), strict=False
    )
    label_program(program)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    weight_product, activation_product = [n for n in nodes if op_name(n) in MATRIX_PRODUCT_OPS]
    assert label_of(weight_product) == Label.OTHER  # a weight product outside any layer
    assert weight_product.meta["teesplit"]["label_rule"].startswith("weight-")
    assert label_of(activation_product) == Label.OTHER
    assert "two activations" in activation_product.meta["teesplit"]["label_rule"]


def test_a_weight_selected_by_an_activation_is_an_embedding_not_a_weight():
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 8))
            self.proj = nn.Parameter(torch.randn(8, 8))

        def forward(self, idx, x):
            rows = self.table.index_select(0, idx)  # rows chosen by an input: an activation
            # a slice of a weight to a symbolic size read off an input is still the weight
            return x @ rows.T, x @ self.proj[: idx.shape[0]].T

    n = torch.export.Dim("n", min=2, max=8)
    program = torch.export.export(
        Lookup().eval(),
        (torch.tensor([1, 2, 3]), torch.randn(4, 8)),
        dynamic_shapes={"idx": {0: n}, "x": None},
        strict=False,
    )
    label_program(program)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "call_function"}
    assert label_of(nodes["index_select"]) == Label.EMBEDDING
    rules = [
        n.meta["teesplit"]["label_rule"] for n in nodes.values() if op_name(n) in MATRIX_PRODUCT_OPS
    ]
    assert rules[0].endswith("of two activations outside an attention module")
    assert rules[1].startswith("weight-")


def test_causal_lm_with_user_inputs_needs_no_use_cache_flag():
    """``partition(model, policy, (ids,))`` on a decoder whose config turns its cache on used
    to fail with "DynamicCache in output" unless the caller passed ``use_cache=False``."""
    from models import tiny_llama

    from partitioner.api import partition
    from partitioner.capturing import capture
    from partitioner.errors import CaptureError

    model = tiny_llama()
    assert model.config.use_cache
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)  # >1: dims stay symbolic
    sp = partition(model, "all_gpu", (ids,))
    counts = Counter(sp.labels.values())  # as test_model_label_counts expects of tiny-llama
    assert counts[Label.ATTENTION_PROJECTION] == 2 * 4 and counts[Label.FFN] == 2 * 3
    assert counts[Label.ATTENTION] == 2 and counts[Label.LM_HEAD] == 1
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        # use_cache=False is a constant of the exported call: the caller need not pass it
        torch.testing.assert_close(model_output(sp(ids)), expected)

    # a tuple of dynamic shapes follows forward's inputs, which now include use_cache
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=64)
    sp = partition(model, "all_gpu", (ids,), dynamic_shapes=({0: batch, 1: seq},))
    longer = torch.randint(0, model.config.vocab_size, (3, 9), generator=gen)
    with torch.no_grad():
        expected = model(longer, use_cache=False).logits
        torch.testing.assert_close(model_output(sp(longer)), expected)

    # a caller who asks for the cache explicitly is not overruled
    with pytest.raises(CaptureError, match="DynamicCache"):
        capture(model, {"input_ids": ids, "use_cache": True})


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


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_of_a_linear_layer_runs_masked_on_the_gpu_under_slalom(spelling):
    """Labelled like F.linear is not enough: the layer must also be *split* like it. Its
    weight view (W.T …) is emitted in the stage of its product, not computed in an earlier
    stage and sent as an input, and the exact pass folds it into a constant: every spelling
    gives the same GPU ring layers as F.linear, bit for bit with the quantised reference."""
    from partitioner.api import partition
    from passes.exact import quantised_reference

    ids = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = SpelledLM(spelling).eval()
    split = partition(model, "slalom", (ids,), seed=1)
    ring = [
        n
        for s in split.stages
        if s.side == "gpu"
        for n in s.module.graph.find_nodes(
            op="call_function", target=torch.ops.teesplit.ring_linear.default
        )
    ]
    assert len(ring) == 6  # q, k, up, down, fc, head: the pool is not pinned to the GPU
    with torch.no_grad():
        got, want = split(ids), quantised_reference(split)(ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
