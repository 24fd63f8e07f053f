"""The layer rule of docs/design.md, enforced: every import runs downward and none closes a circle.

Each module of the four packages belongs to one layer. An import (at module level or inside a
function: a lazy import is still a dependency) may only reach the layers its own layer lists.
The enclave's and the worker's entry points are also imported in a fresh interpreter to show
that the compiler (capture, labelling, placement, protection) and networkx/transformers are not
part of the code those processes run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("partitioner", "passes", "runtime", "enclave_runtime")

DATA = {
    "partitioner.errors",
    "partitioner.label_set",
    "partitioner.policy",
    "partitioner.plan",
    "partitioner.protection",
    "partitioner.schema",
    "partitioner.dims",
    "partitioner.ops",
    "partitioner.op_table",
    "partitioner.rnm_tables",
    "partitioner.shapes",
    "partitioner.step_op",  # the GPU call a step library makes: both sides define it alike
}
READER = {"partitioner.bundle", "partitioner.signing", "partitioner.sealing"}
WIRE = {"runtime.kserve", "runtime.state"}  # the contract both processes apply
CLI = {"partitioner.cli", "partitioner.deploy"}  # the command and the processes it starts


def layer_of(module: str) -> str:
    if module in DATA or module == "partitioner":
        return "data"
    if module in READER:
        return "reader"
    if module in WIRE:
        return "wire"
    if module in CLI:
        return "cli"
    top = module.split(".")[0]
    return {
        "passes": "passes",
        "runtime": "worker",
        "enclave_runtime": "enclave",
        "partitioner": "compiler",
    }[top]


# what each layer may import (besides itself, without circles)
ALLOWED = {
    "data": {"data"},
    "reader": {"data", "reader"},
    "wire": {"data"},
    "passes": {"data", "passes"},
    "worker": {"data", "reader", "wire", "worker"},
    "enclave": {"data", "reader", "wire", "enclave"},
    "compiler": {"data", "reader", "wire", "passes", "worker", "enclave", "compiler"},
    "cli": {"data", "reader", "wire", "passes", "worker", "enclave", "compiler", "cli"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports, anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_downward(module):
    mine = layer_of(module)
    upward = {t: layer_of(t) for t in GRAPH[module] if layer_of(t) not in ALLOWED[mine]}
    assert not upward, f"{module} ({mine}) imports upward: {upward}"


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                circle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail(f"import circle: {' -> '.join(circle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_nothing_imports_the_cli():
    assert not [m for m, targets in GRAPH.items() if "partitioner.cli" in targets]


def test_the_rule_catches_an_upward_import():
    """The checker itself: a data-layer module importing a pass is reported."""
    assert "passes" not in ALLOWED[layer_of("partitioner.plan")]
    assert layer_of("passes.protect") == "passes"
    assert "compiler" not in ALLOWED["enclave"] and "passes" not in ALLOWED["enclave"]


FORBIDDEN_IN_PROCESSES = [
    "passes",
    "partitioner.capturing",
    "partitioner.placement",
    "partitioner.split",
    "partitioner.api",
    "partitioner.program",
    "networkx",
    "transformers",
    "partitioner.aot",  # the enclave loads compiled stages; it never compiles them
    "partitioner.aot_step",
    "partitioner.aot_compiler",
    "torch._inductor",
]


@pytest.mark.parametrize("entry", ["enclave_runtime.__main__", "runtime.__main__"])
def test_process_entry_points_leave_the_compiler_out(entry):
    code = (
        f"import sys, importlib; importlib.import_module({entry!r}); "
        "print('\\n'.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = set(result.stdout.split())
    leaked = sorted(
        m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_PROCESSES)
    )
    assert not leaked, f"{entry} imports {leaked[:10]}"
