"""The op table: its invariants, and that every pass reads the same rows."""

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import captured

from partitioner import op_table
from partitioner.op_table import TABLE, op_name, ops_with, props

ROOT = Path(__file__).parent.parent


def test_op_table_imports_only_torch_and_the_standard_library():
    tree = ast.parse((ROOT / "partitioner" / "op_table.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "op_table may not import relatively"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "dataclasses", "torch"}, imported


def test_importing_op_table_loads_no_pass():
    code = (
        "import sys, partitioner.op_table; "
        "print(sorted(m for m in sys.modules if m == 'passes' or m.startswith('passes.')"
        " or (m.startswith('partitioner.') and m != 'partitioner.op_table')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_op_name_has_one_definition():
    import passes.labels

    assert not hasattr(passes.labels, "op_name") or passes.labels.op_name is op_name
    defining = [
        path.relative_to(ROOT)
        for folder in ("partitioner", "passes")
        for path in (ROOT / folder).rglob("*.py")
        if "def op_name(" in path.read_text()
    ]
    assert defining == [Path("partitioner/op_table.py")]


def test_op_name():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    lin = graph.call_function(torch.ops.aten.linear.default, (x, x))
    item = graph.call_function(__import__("operator").getitem, (x, 0))
    assert op_name(lin) == "linear"
    assert op_name(item) == "getitem"
    assert props(op_name(item)).shape_only


def test_unknown_op_has_no_property():
    assert props("no_such_op") == op_table.OpProps()
    with pytest.raises(KeyError):
        ops_with("no_such_property")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("weight_linear", "shape_only"),
        ("matrix_product", "shape_only"),
        ("nonlinear", "linear_in_first"),
        ("nonlinear", "shape_only"),
        ("nonlinear", "elementwise"),
        ("factory", "linear_in_first"),
        ("concat", "linear_in_first"),
        ("norm", "shape_only"),
        ("sdpa", "matrix_product"),
    ],
)
def test_exclusive_properties(a, b):
    assert not ops_with(a) & ops_with(b)


@pytest.mark.parametrize(
    ("sub", "sup"),
    [
        ("weight_linear", "matrix_product"),
        ("reshape", "linear_in_first"),
        ("reshape", "shape_only"),
        ("cast", "shape_only"),
        ("factory", "shape_only"),
        ("gather", "linear_in_first"),
    ],
)
def test_implied_properties(sub, sup):
    assert ops_with(sub) <= ops_with(sup)


def test_every_op_has_a_property():
    assert [n for n, p in TABLE.items() if p == op_table.OpProps()] == []


def test_the_disagreements_are_resolved():
    # one answer per op where the hand-kept lists used to differ
    for name in ("gather", "index", "take", "index_select"):
        assert props(name).linear_in_first and props(name).shape_only
    assert props("getitem").shape_only
    for name in ("neg", "sum", "mean"):  # linear, but arithmetic: not for residues or weights
        assert props(name).linear_in_first and not props(name).shape_only
        assert not props(name).passes_values
    assert props("_to_copy").linear_in_first and not props("_to_copy").passes_values
    for name in ("to", "type_as", "pad", "as_strided", "one_hot", "zeros_like", "arange"):
        assert props(name).shape_only and not props(name).linear_in_first


def test_views_match_the_table():
    assert op_table.SHAPE_OPS == {n for n, p in TABLE.items() if p.shape_only}
    assert op_table.MATRIX_PRODUCT_OPS >= {"linear", "addmm", "mm", "matmul", "bmm"}
    assert {"add", "mul", "sum"} <= op_table.ELEMENTWISE_OPS
    assert "softmax" in op_table.NONLINEAR_OPS


def test_exact_masking_and_the_analysis_read_the_table():
    from passes import exact, linearity

    assert exact._SHAPE_ONLY == {n for n, p in TABLE.items() if p.passes_values}
    assert not hasattr(linearity, "_LINEAR_IN_FIRST")


_GEN = torch.Generator().manual_seed(0)
ROWS = torch.tensor([2, 0, 1])
COLS = torch.randint(0, 4, (3, 4), generator=_GEN)
FLAT = torch.randint(0, 12, (3, 4), generator=_GEN)
SELECTIONS = {  # linear in the source once the index is public (they used to count as nonlinear)
    "index_select": lambda x, y: torch.index_select(x, 0, ROWS) + y,
    "index": lambda x, y: x[ROWS] + y,
    "gather": lambda x, y: torch.gather(x, 1, COLS) - y,
    "take": lambda x, y: torch.take(x, FLAT) * 2.0 + y,
}


@pytest.mark.parametrize("case", sorted(SELECTIONS))
def test_selections_by_a_public_index_have_exact_corrections(case):
    from torch.fx.experimental.proxy_tensor import make_fx

    from passes.linearity import AFFINE, analyse, build_correction

    gm = make_fx(SELECTIONS[case], tracing_mode="real")(torch.randn(3, 4), torch.randn(3, 4))
    for ph, name in zip(gm.graph.find_nodes(op="placeholder"), "xy", strict=True):
        ph.name = ph.target = name
    gm.recompile()
    assert case in {op_name(n) for n in gm.graph.nodes}
    outputs = [next(iter(gm.graph.find_nodes(op="output"))).args[0].name]
    analysis = analyse(gm, ["x", "y"])
    assert set(analysis.kinds.values()) == {AFFINE}, analysis.reasons
    corr = build_correction("s", gm, outputs, ["x", "y"], analysis=analysis)
    assert corr.precomputable
    x, y, rx, ry = (torch.randn(3, 4, generator=_GEN) for _ in range(4))
    (delta,) = corr.module(*({"x": rx, "y": ry}[n] for n in corr.delta_inputs))
    torch.testing.assert_close(gm(x + rx, y + ry) - delta, gm(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "minilm"])
def test_every_op_labelled_shape_by_its_op_is_shape_only(name):
    from passes.labels import label_program

    program = copy.deepcopy(captured(name).program)
    label_program(program)
    by_op = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            meta = node.meta["teesplit"]
            by_op.setdefault(str(meta["label"]), set()).add((op_name(node), meta["label_rule"]))
    shape = {op for op, rule in by_op["shape"] if rule.startswith("op:")}
    assert shape
    assert {op for op in shape if not props(op).shape_only} == set()
    # and no op the table calls a weight product or a nonlinearity is labelled shape
    wrong = {op for op, _ in by_op["shape"] if props(op).weight_linear or props(op).nonlinear}
    assert wrong == set()
