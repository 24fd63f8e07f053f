"""Linearity analysis of a GPU stage, and the enclave's correction graph for masked inputs.

Reads one GPU stage (a GraphModule), the names of its inputs that arrive masked, and the names
of its outputs whose plaintext a later correction needs. The stage is not edited.

A masked input arrives as ``x + Δx``; the GPU returns ``f(x + Δx)``; to unmask, the enclave needs
``Δf = f(x + Δx) - f(x)``. This module derives ``Δf`` by a forward *delta transform* of the
stage graph, node by node:

* ops linear in their masked operand (shape ops, ``neg``, ``sum``, ``cat``, adds, products with a
  constant) map ``Δ`` through the op with constants dropped from additive positions, so
  ``Δ(x·W + b) = Δx·W``;
* a product of two values ``P(a, b)`` that both depend on stage inputs (QKᵀ, softmax·V) is
  bilinear: ``ΔP = P(a, Δb) + P(Δa, b + Δb)``, exact, but it needs the plaintext operands, so
  the enclave pays two products of the same size online (the *enclave-side cost* in the plan);
* anything else on a masked value (softmax, exp, comparisons …) is *nonlinear*: no correction
  exists, and the caller must keep that op in the enclave or refuse the policy.

Guarantees: when the analysis reports no nonlinear node, ``stage(x + Δ) - correction(Δ, x)``
equals ``stage(x)`` up to floating-point rounding (exactly in a ring); the correction is
*precomputable* (depends on the masks only, as Slalom's ``W·r``) exactly when the stage is affine
in its masked inputs with constant weights.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from partitioner import ops as _ops  # noqa: F401 - registers teesplit:: ops used in exact stages
from partitioner.op_table import op_name, props
from partitioner.plan import Correction
from passes.base import is_tensor_value

aten = torch.ops.aten


AFFINE, PRODUCT, NONLINEAR = "affine", "product", "nonlinear"


def _is_tensor(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def _is_tensor_like(node: torch.fx.Node) -> bool:
    return is_tensor_value(node.meta.get("val"))


@dataclass
class StageAnalysis:
    """Which nodes of a stage depend on masked inputs, and how."""

    masked: set[str]  # nodes whose value depends on a masked input
    constant: set[str]  # nodes that depend on no stage input at all
    kinds: dict[str, str] = field(default_factory=dict)  # masked node -> affine/product/nonlinear
    reasons: dict[str, str] = field(default_factory=dict)  # non-affine node -> why

    @property
    def products(self) -> list[str]:
        return [n for n, k in self.kinds.items() if k == PRODUCT]

    @property
    def nonlinear(self) -> list[str]:
        return [n for n, k in self.kinds.items() if k == NONLINEAR]


def analyse(module: torch.fx.GraphModule, masked_inputs: Iterable[str]) -> StageAnalysis:
    """Classify every node of ``module`` that depends on one of ``masked_inputs``."""
    masked_inputs = set(masked_inputs)
    masked: set[str] = set()
    constant: set[str] = set()
    result = StageAnalysis(masked, constant)
    for node in module.graph.nodes:
        if node.op == "placeholder":
            if node.name in masked_inputs:
                masked.add(node.name)
            continue
        if node.op == "get_attr":
            constant.add(node.name)
            continue
        if node.op != "call_function":
            continue
        tensor_inputs = [a for a in node.all_input_nodes if _is_tensor_like(a)]
        if all(a.name in constant for a in tensor_inputs):
            constant.add(node.name)
        if not _is_tensor_like(node):
            continue  # sizes are public: the same for a value and its masked version
        varying = [a for a in tensor_inputs if a.name in masked]
        if not varying:
            continue
        masked.add(node.name)
        kind, why = _classify(node, varying, constant)
        result.kinds[node.name] = kind
        if kind != AFFINE:
            result.reasons[node.name] = why
    return result


def _operands(node: torch.fx.Node) -> tuple[Any, Any]:
    name = op_name(node)
    if name == "addmm":
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def _classify(
    node: torch.fx.Node, varying: list[torch.fx.Node], constant: set[str]
) -> tuple[str, str]:
    name = op_name(node)

    def is_const(a: Any) -> bool:
        return not isinstance(a, torch.fx.Node) or a.name in constant or not _is_tensor(a)

    op = props(name)
    first = node.args[0] if node.args else None
    if op.linear_in_first:
        if varying != [first]:
            return NONLINEAR, f"{name} is linear only in its first operand"
        if name == "_to_copy":
            dtype = node.kwargs.get("dtype")
            if dtype is not None and not dtype.is_floating_point:
                return NONLINEAR, f"_to_copy to {dtype} rounds"
        if name == "constant_pad_nd" and len(node.args) > 2 and node.args[2] not in (0, 0.0):
            return NONLINEAR, "constant_pad_nd with a nonzero pad value is affine, not linear"
        return AFFINE, ""
    if op.concat or name in ("add", "sub", "rsub") or op.ring:
        if name in ("add", "sub") and node.kwargs.get("alpha", 1) != 1:
            return NONLINEAR, f"{name} with alpha is not supported"
        return AFFINE, ""
    if name == "masked_fill":
        return (AFFINE, "") if varying == [first] else (NONLINEAR, "masked_fill on a masked mask")
    if name == "div":
        if varying != [first]:
            return NONLINEAR, "division by a masked value"
        return (AFFINE, "") if is_const(node.args[1]) else (PRODUCT, "divides by an activation")
    if op.bilinear or op.weight_linear:
        if name == "linear" and len(node.args) > 2 and node.args[2] is not None:
            if node.args[2] in varying:
                return NONLINEAR, "linear with a masked bias"
        if name == "addmm":
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return NONLINEAR, "addmm with beta/alpha is not supported"
        a, b = _operands(node)
        if is_const(a) or is_const(b):
            return AFFINE, ""
        return PRODUCT, f"{name} of two activations ({a.name}, {b.name})"
    return NONLINEAR, f"{name} is not linear in its masked input"


class _DeltaBuilder:
    """Emits the correction graph; ``primal`` and ``delta`` map stage nodes to new nodes."""

    def __init__(self, module: torch.fx.GraphModule, analysis: StageAnalysis) -> None:
        self.source = module
        self.analysis = analysis
        self.graph = torch.fx.Graph()
        self.attrs: dict[str, Any] = {}
        self._primal: dict[str, torch.fx.Node] = {}
        self._delta: dict[str, torch.fx.Node] = {}
        self.primal_inputs: list[str] = []

    # -- emission helpers ------------------------------------------------------------------

    def _call(self, target: Callable[..., Any], args: tuple, like: torch.fx.Node) -> torch.fx.Node:
        out = self.graph.call_function(target, args)
        out.meta["val"] = like.meta.get("val")
        return out

    def placeholder(self, name: str, like: torch.fx.Node) -> torch.fx.Node:
        """A new input, kept ahead of every computation so the signature reads in order."""
        first_op = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        if first_op is None:
            ph = self.graph.placeholder(name)
        else:
            with self.graph.inserting_before(first_op):
                ph = self.graph.placeholder(name)
        ph.meta["val"] = like.meta.get("val")
        return ph

    def any_version(self, node: torch.fx.Node) -> torch.fx.Node:
        """A new-graph node with the same shape as ``node`` (its delta, else its plaintext)."""
        return self._delta.get(node.name) or self.primal(node)

    def _shape_arg(self, arg: torch.fx.Node) -> torch.fx.Node:
        if _is_tensor_like(arg):
            return self.any_version(arg)
        return self.shape_value(arg)

    def shape_value(self, node: torch.fx.Node) -> torch.fx.Node:
        """Copy a non-tensor node (a size) once: its tensor operands only provide shapes."""
        key = f"shape:{node.name}"
        if key not in self._primal:
            self._primal[key] = self.graph.node_copy(node, self._shape_arg)
        return self._primal[key]

    def primal(self, node: torch.fx.Node) -> torch.fx.Node:
        """The plaintext value of ``node``, computed in the enclave (emitted once, on demand)."""
        if node.name in self._primal:
            return self._primal[node.name]
        if node.op == "placeholder":
            out = self.placeholder(f"primal_{node.name}", node)
            self.primal_inputs.append(node.name)
        elif node.op == "get_attr":
            out = self.graph.get_attr(node.target)
            out.meta = dict(node.meta)
            self.attrs[node.target] = operator.attrgetter(node.target)(self.source)
        elif not _is_tensor_like(node):
            out = self.shape_value(node)
        else:
            out = self.graph.node_copy(node, self._primal_arg)
        self._primal[node.name] = out
        return out

    def _primal_arg(self, arg: torch.fx.Node) -> torch.fx.Node:
        return self.primal(arg) if _is_tensor_like(arg) else self.shape_value(arg)

    def delta(self, node: Any) -> torch.fx.Node | None:
        if not isinstance(node, torch.fx.Node):
            return None
        return self._delta.get(node.name)

    def value(self, node: Any) -> Any:
        """An operand that is not masked: its plaintext (or the literal itself)."""
        if isinstance(node, torch.fx.Node):
            return self._primal_arg(node)
        if isinstance(node, (list, tuple)):
            return type(node)(self.value(a) for a in node)
        return node

    # -- the transform -----------------------------------------------------------------------

    def run(self, delta_inputs: list[str]) -> None:
        nodes = {n.name: n for n in self.source.graph.nodes}
        for name in delta_inputs:
            self._delta[name] = self.placeholder(f"delta_{name}", nodes[name])
        for node in self.source.graph.nodes:
            if node.op == "call_function" and node.name in self.analysis.kinds:
                self._delta[node.name] = self._delta_of(node)

    def _product(
        self, target: Callable[..., Any], a: Any, b: Any, like: torch.fx.Node
    ) -> torch.fx.Node:
        da, db = self.delta(a), self.delta(b)
        if da is not None and db is not None:  # P(a+Δa, b+Δb) - P(a, b) = P(a, Δb) + P(Δa, b+Δb)
            masked_b = self._call(aten.add.Tensor, (self.value(b), db), b)
            left = self._call(target, (self.value(a), db), like)
            right = self._call(target, (da, masked_b), like)
            return self._call(aten.add.Tensor, (left, right), like)
        if da is not None:
            return self._call(target, (da, self.value(b)), like)
        return self._call(target, (self.value(a), db), like)

    def _delta_of(self, node: torch.fx.Node) -> torch.fx.Node:
        name = op_name(node)
        op = props(name)
        if op.linear_in_first:
            first = node.args[0]
            args = (self.delta(first), *(self.value(a) for a in node.args[1:]))
            kwargs = {k: self.value(v) for k, v in node.kwargs.items()}
            out = self.graph.call_function(node.target, args, kwargs)
            out.meta["val"] = node.meta.get("val")
            return out
        if op.concat:
            parts = [
                self.delta(p)
                if self.delta(p) is not None
                else self._call(aten.zeros_like.default, (self.value(p),), p)
                for p in node.args[0]
            ]
            out = self.graph.call_function(node.target, (parts, *node.args[1:]), node.kwargs)
            out.meta["val"] = node.meta.get("val")
            return out
        if name in ("add", "sub", "rsub"):
            return self._additive(node, name)
        if name == "masked_fill":
            return self._call(
                aten.masked_fill.Scalar,
                (self.delta(node.args[0]), self.value(node.args[1]), 0.0),
                node,
            )
        if name == "div":
            return self._call(
                node.target, (self.delta(node.args[0]), self.value(node.args[1])), node
            )
        if name == "ring_linear":  # affine: the bias drops out of the difference
            x, w, _b, *carry = node.args
            out = self.graph.call_function(
                node.target, (self.delta(x), self.value(w), None, *carry)
            )
            out.meta["val"] = node.meta.get("val")
            return out
        if name == "linear":
            return self._product(aten.linear.default, node.args[0], node.args[1], node)
        if name == "addmm":
            prod = self._product(aten.mm.default, node.args[1], node.args[2], node)
            bias_delta = self.delta(node.args[0])
            if bias_delta is not None:
                prod = self._call(aten.add.Tensor, (prod, bias_delta), node)
            return prod
        if op.bilinear:
            target = aten.mul.Tensor if name == "mul" else node.target
            return self._product(target, node.args[0], node.args[1], node)
        raise AssertionError(f"no delta rule for {node.name} ({name})")  # analyse() excluded it

    def _additive(self, node: torch.fx.Node, name: str) -> torch.fx.Node:
        a, b = node.args[0], node.args[1]
        da, db = self.delta(a), self.delta(b)
        shape = list(node.meta["val"].shape)
        for d, src in ((da, a), (db, b)):
            if d is not None and list(src.meta["val"].shape) != shape:
                raise _Unsupported(node.name, f"{name} broadcasts the masked operand {src.name}")
        if name == "rsub":  # other - x
            a, b, da, db = b, a, db, da
            name = "sub"
        if da is not None and db is not None:
            target = aten.add.Tensor if name == "add" else aten.sub.Tensor
            return self._call(target, (da, db), node)
        if da is not None:
            return da
        return db if name == "add" else self._call(aten.neg.default, (db,), node)


class _Unsupported(Exception):
    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"{node}: {reason}")
        self.node = node
        self.reason = reason


def build_correction(
    stage: str,
    module: torch.fx.GraphModule,
    outputs: list[str],
    masked_inputs: list[str],
    primal_outputs: Iterable[str] = (),
    analysis: StageAnalysis | None = None,
) -> Correction:
    """The correction graph of a stage that :func:`analyse` found free of nonlinear nodes."""
    analysis = analysis or analyse(module, masked_inputs)
    if analysis.nonlinear:
        raise ValueError(f"stage {stage} has nonlinear masked nodes {analysis.nonlinear}")
    builder = _DeltaBuilder(module, analysis)
    delta_inputs = list(masked_inputs)
    builder.run(delta_inputs)
    nodes = {n.name: n for n in module.graph.nodes}
    delta_outputs = [o for o in outputs if o in analysis.masked]
    primal_outputs = [o for o in outputs if o in set(primal_outputs)]
    results = [builder._delta[o] for o in delta_outputs]
    results += [builder.primal(nodes[o]) for o in primal_outputs]
    builder.graph.output(tuple(results))
    _drop_dead(builder.graph)
    builder.graph.lint()
    gm = torch.fx.GraphModule(builder.attrs, builder.graph, class_name=f"{stage}_correction")
    used = {n.target for n in gm.graph.find_nodes(op="placeholder")}
    return Correction(
        stage=stage,
        module=gm,
        delta_inputs=[n for n in delta_inputs if f"delta_{n}" in used],
        primal_inputs=[n for n in builder.primal_inputs if f"primal_{n}" in used],
        delta_outputs=delta_outputs,
        primal_outputs=primal_outputs,
        products=analysis.products,
    )


def _drop_dead(graph: torch.fx.Graph) -> None:
    """Remove unused nodes, placeholders included (a masked input may not reach any output)."""
    for node in reversed(list(graph.nodes)):
        if node.op != "output" and not node.users:
            graph.erase_node(node)
