"""Split: a placed ExportedProgram -> ordered stage GraphModules and the edges between them.

Reads the program, the :class:`Placement` and the shape context; writes new GraphModules (one
per stage; the exported graph itself is not edited); guarantees:

* each placed node is copied into exactly one stage, in the original topological order;
* a stage owns the parameters, buffers and constants it reads (``get_attr`` on its own module),
  so no weight travels on an edge;
* values that are not tensors (symbolic sizes) never cross: a stage recomputes each size it
  needs from a tensor it already holds that has the same symbolic dim, or the split fails
  with a :class:`PartitionError` naming the value;
* side-effect-only nodes (``_assert_*``) run in the stage that holds their operand.

:func:`validate` then checks the result independently of how it was built.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from partitioner.placement import Placement
from partitioner.plan import ENCLAVE, GPU, INPUT, OUTPUT, Edge, Stage, label_counts
from partitioner.shapes import ShapeContext
from passes.base import is_tensor_value, model_weights, teesplit_meta, weight_value
from passes.labels import user_input_names

_SYM_SIZE = torch.ops.aten.sym_size.int


class _StageBuilder:
    """Copies one stage's nodes into a fresh graph.

    ``carrier`` finds, for a symbolic size no local tensor has, a tensor produced earlier on the
    same side that has it; that tensor becomes an extra input (a same-side edge, not a cut).
    """

    def __init__(
        self,
        name: str,
        weights: dict[str, str],
        weight_values: dict[str, torch.Tensor],
        members: list[torch.fx.Node],
        inputs: list[torch.fx.Node],
        carrier: Callable[[Any], torch.fx.Node | None],
    ) -> None:
        self.name = name
        self.weights = weights
        self.weight_values = weight_values
        self.carrier = carrier
        self.graph = torch.fx.Graph()
        self.env: dict[str, Any] = {}
        self.attrs: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.fx.Node] = []
        self.local_tensors: list[torch.fx.Node] = []
        for node in inputs:
            self._add_input(node)
        for node in members:
            if node.op == "call_function" and is_tensor_value(node.meta.get("val")):
                self.env[node.name] = self.graph.node_copy(node, self._arg)
                self.local_tensors.append(node)
            else:
                self._materialize(node)

    def _add_input(self, node: torch.fx.Node) -> torch.fx.Node:
        last = self.env[self.inputs[-1].name] if self.inputs else None
        first = next(iter(self.graph.nodes), None)
        if last is not None:
            ctx = self.graph.inserting_after(last)
        elif first is not None:
            ctx = self.graph.inserting_before(first)
        else:
            ctx = self.graph.inserting_after(None)
        with ctx:
            ph = self.graph.placeholder(node.name)
        ph.meta = dict(node.meta)
        self.env[node.name] = ph
        self.inputs.append(node)
        self.local_tensors.append(node)
        return ph

    def _arg(self, node: torch.fx.Node) -> Any:
        if node.name in self.env:
            return self.env[node.name]
        if node.op == "placeholder" and node.name in self.weights:
            fqn = self.weights[node.name]
            attr = self.graph.get_attr(fqn)
            attr.meta = dict(node.meta)
            self.attrs[fqn] = self.weight_values[fqn]
            self.env[node.name] = attr
            return attr
        if node.op == "call_function" and not is_tensor_value(node.meta.get("val")):
            return self._materialize(node)
        raise PartitionError(
            f"stage {self.name} reads {node.name} ({node.op} {node.target}) that is neither "
            "local, a stage input, a weight, nor recomputable"
        )

    def _materialize(self, node: torch.fx.Node) -> Any:
        """Recompute a non-tensor value (a symbolic size or an assertion) inside this stage."""
        if node.name in self.env:
            return self.env[node.name]
        if node.target is _SYM_SIZE:
            source, dim = node.args
            if source.name in self.env:
                out = self.graph.call_function(_SYM_SIZE, (self.env[source.name], dim))
            else:
                out = self._size_from_local(node, source.meta["val"].shape[dim])
        else:
            for inp in node.all_input_nodes:
                if is_tensor_value(inp.meta.get("val")) and inp.name not in self.env:
                    if inp.op == "placeholder" and inp.name in self.weights:
                        continue
                    raise PartitionError(
                        f"non-tensor value {node.name} ({node.target}) needs tensor {inp.name} "
                        f"in stage {self.name}, which does not hold it; it cannot cross a cut"
                    )
            out = self.graph.node_copy(node, self._arg)
        if isinstance(out, torch.fx.Node):
            out.meta = dict(node.meta)
        self.env[node.name] = out
        return out

    def _size_from_local(self, node: torch.fx.Node, size: int | torch.SymInt) -> Any:
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr
        for tensor in self.local_tensors:
            val = tensor.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for i, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == expr:
                    return self.graph.call_function(_SYM_SIZE, (self.env[tensor.name], i))
        derived = self._solve(expr)
        if derived is not None:
            return derived
        carrier = self.carrier(expr)
        if carrier is not None:
            dim = next(
                i
                for i, s in enumerate(carrier.meta["val"].shape)
                if isinstance(s, torch.SymInt) and s.node.expr == expr
            )
            return self.graph.call_function(_SYM_SIZE, (self._add_input(carrier), dim))
        raise PartitionError(
            f"stage {self.name} needs the symbolic size {expr} ({node.name}) but no tensor on "
            "its side carries that dim; it would have to cross as a non-tensor value"
        )

    def _local_dims(self) -> list[tuple[torch.fx.Node, int, Any]]:
        return [
            (tensor, i, s.node.expr)
            for tensor in self.local_tensors
            if isinstance(val := tensor.meta.get("val"), torch.Tensor)
            for i, s in enumerate(val.shape)
            if isinstance(s, torch.SymInt)
        ]

    def _solve(self, symbol: Any) -> torch.fx.Node | None:
        """``symbol`` as a local dim minus other locally known symbols.

        A KV-cache step needs the cache length ``past`` for positions and masks; the GPU holds
        the concatenated cache (``past + seq``) and the hidden states (``seq``) but no tensor of
        length ``past``. Solving ``past = (past + seq) - seq`` keeps the size from crossing.
        """
        if not symbol.is_Symbol:
            return None
        dims = self._local_dims()
        atoms = {expr: (t, i) for t, i, expr in dims if expr.is_Symbol}
        for tensor, i, expr in dims:
            rest = expr - symbol
            # ``expr`` must be ``symbol`` plus a sum of other local symbols and integers
            if not expr.is_Add or symbol not in expr.free_symbols or symbol in rest.free_symbols:
                continue
            if not (rest.is_Add or rest.is_Symbol) or not rest.free_symbols <= atoms.keys():
                continue
            terms = rest.args if rest.is_Add else (rest,)
            if not all(t.is_Symbol or t.is_Integer for t in terms):
                continue
            out = self.graph.call_function(_SYM_SIZE, (self.env[tensor.name], i))
            for term in terms:
                if term.is_Integer:
                    value: Any = int(term)
                else:
                    owner, dim = atoms[term]
                    value = self.graph.call_function(_SYM_SIZE, (self.env[owner.name], dim))
                out = self.graph.call_function(operator.sub, (out, value))
            return out
        return None

    def finish(self, outputs: list[str]) -> torch.fx.GraphModule:
        self.graph.output(tuple(self.env[name] for name in outputs))
        self.graph.lint()
        return torch.fx.GraphModule(self.attrs, self.graph, class_name=self.name)


def _weights(program: ExportedProgram) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    names = model_weights(program)
    values: dict[str, torch.Tensor] = {}
    for fqn in names.values():
        value = weight_value(program, fqn)
        if value is None:
            raise PartitionError(f"weight {fqn} is in the export signature but has no value")
        values[fqn] = value
    return names, values


def _assign_side_effect_nodes(
    program: ExportedProgram, home: dict[str, int], n_stages: int
) -> dict[str, int]:
    """Stage index for each side-effect-only node: where its first operand lives."""
    first_use: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.name in home:
            for inp in node.all_input_nodes:
                if inp.op == "placeholder":
                    first_use[inp.name] = min(first_use.get(inp.name, n_stages), home[node.name])
    assigned: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.name in home or node.users:
            continue
        stage = 0
        for inp in node.all_input_nodes:
            if inp.name in home:
                stage = home[inp.name]
                break
            if inp.name in first_use:
                stage = first_use[inp.name]
                break
        assigned[node.name] = stage
    return assigned


def build_stages(
    program: ExportedProgram, placement: Placement, shapes: ShapeContext
) -> tuple[list[Stage], list[Edge], list[Any]]:
    """Build stage modules and edges; returns ``(stages, edges, flat_outputs)``.

    ``flat_outputs`` lists, per flat program output, a value name or a literal.
    """
    weights, weight_values = _weights(program)
    user_inputs = user_input_names(program)
    by_name = {n.name: n for n in program.graph.nodes}
    position = {name: i for i, name in enumerate(by_name)}
    names = []
    counts = {ENCLAVE: 0, GPU: 0}
    for plan in placement.stages:
        names.append(f"{plan.side}_{len(names)}")
        counts[plan.side] += 1
    home = {n: i for i, plan in enumerate(placement.stages) for n in plan.nodes}
    side_effects = _assign_side_effect_nodes(program, home, len(names))
    members: list[list[torch.fx.Node]] = [[] for _ in names]
    for node in program.graph.nodes:  # graph order is a topological order within each stage
        idx = home.get(node.name, side_effects.get(node.name))
        if idx is not None:
            members[idx].append(node)

    output_node = next(n for n in program.graph.nodes if n.op == "output")
    flat_outputs = [a.name if isinstance(a, torch.fx.Node) else a for a in output_node.args[0]]
    producer_of = {n: names[i] for n, i in home.items()}
    producer_of.update({n: INPUT for n in user_inputs})
    side_of = {name: plan.side for name, plan in zip(names, placement.stages, strict=True)}
    side_of[INPUT] = side_of[OUTPUT] = ENCLAVE

    needed_later: dict[str, list[str]] = {}  # value -> consumers outside its stage
    stage_inputs: list[list[torch.fx.Node]] = []
    for idx, nodes in enumerate(members):
        seen: dict[str, torch.fx.Node] = {}
        for node in nodes:
            if not is_tensor_value(node.meta.get("val")):
                continue  # non-tensor nodes are recomputed locally, not fed in
            for inp in node.all_input_nodes:
                src = producer_of.get(inp.name)
                if src is not None and src != names[idx] and inp.name not in seen:
                    seen[inp.name] = inp
                    needed_later.setdefault(inp.name, []).append(names[idx])
        stage_inputs.append(sorted(seen.values(), key=lambda n: position[n.name]))
    for value in flat_outputs:
        if isinstance(value, str):
            needed_later.setdefault(value, []).append(OUTPUT)

    def carrier_for(idx: int) -> Callable[[Any], torch.fx.Node | None]:
        side = placement.stages[idx].side
        pool = [by_name[n] for n in user_inputs] if side == ENCLAVE else []
        pool += [
            node
            for j in range(idx)
            if placement.stages[j].side == side
            for node in members[j]
            if node.name in home and isinstance(node.meta.get("val"), torch.Tensor)
        ]

        def find(expr: Any) -> torch.fx.Node | None:
            best = None
            for node in pool:
                val = node.meta["val"]
                if any(isinstance(s, torch.SymInt) and s.node.expr == expr for s in val.shape):
                    if best is None or shapes.nbytes(val) < shapes.nbytes(best.meta["val"]):
                        best = node
            if best is not None:
                needed_later.setdefault(best.name, []).append(names[idx])
            return best

        return find

    builders = [
        _StageBuilder(name, weights, weight_values, nodes, stage_inputs[idx], carrier_for(idx))
        for idx, (name, nodes) in enumerate(zip(names, members, strict=True))
    ]
    stages: list[Stage] = []
    for idx, (name, nodes, builder) in enumerate(zip(names, members, builders, strict=True)):
        outputs = [
            n.name for n in nodes if n.name in needed_later and producer_of.get(n.name) == name
        ]
        module = builder.finish(outputs)
        stages.append(
            Stage(
                name=name,
                side=placement.stages[idx].side,
                module=module,
                inputs=[n.name for n in builder.inputs],
                outputs=outputs,
                nodes=[n.name for n in nodes if n.name in home],
                params=sorted(builder.attrs),
                labels=label_counts(
                    {n.name: teesplit_meta(n)["label"] for n in nodes if n.name in home},
                    [n.name for n in nodes if n.name in home],
                ),
            )
        )

    edges: list[Edge] = []
    for value, consumers in needed_later.items():
        val = by_name[value].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise PartitionError(
                f"value {value} of type {type(val).__name__} crosses from "
                f"{producer_of.get(value)} to {consumers}; only tensors may cross a cut"
            )
        for consumer in consumers:
            producer = producer_of[value]
            edges.append(
                Edge(
                    name=value,
                    producer=producer,
                    consumer=consumer,
                    shape=shapes.shape(val),
                    dtype=str(val.dtype).removeprefix("torch."),
                    nbytes=shapes.nbytes(val),
                    direction=f"{side_of[producer]}->{side_of[consumer]}",
                )
            )
    order = {name: i for i, name in enumerate([INPUT, *names, OUTPUT])}
    edges.sort(key=lambda e: (order[e.consumer], order[e.producer], e.name))
    return stages, edges, flat_outputs


def validate(
    program: ExportedProgram,
    placement: Placement,
    stages: list[Stage],
    edges: list[Edge],
) -> None:
    """Check the split independently of how it was built; raise :class:`PartitionError`."""
    placed: dict[str, str] = {}
    for stage in stages:
        for name in stage.nodes:
            if name in placed:
                raise PartitionError(f"node {name} is in both {placed[name]} and {stage.name}")
            placed[name] = stage.name
    missing = sorted(set(placement.sides) - set(placed))
    if missing:
        raise PartitionError(f"nodes placed but in no stage: {missing[:10]}")
    available = {INPUT}
    for stage in stages:
        for edge in (e for e in edges if e.consumer == stage.name):
            if edge.producer not in available:
                raise PartitionError(
                    f"edge {edge.name}: stage {stage.name} consumes it from {edge.producer}, "
                    "which does not run before it (the stage order would be cyclic)"
                )
        for ph in stage.module.graph.find_nodes(op="placeholder"):
            if not isinstance(ph.meta.get("val"), torch.Tensor):
                raise PartitionError(f"stage {stage.name} input {ph.name} is not a tensor")
        if stage.side == GPU:
            leaked = sorted(set(stage.params) & placement.protected_params)
            if leaked:
                raise PartitionError(
                    f"GPU stage {stage.name} would hold protected parameters {leaked[:5]}"
                )
        available.add(stage.name)
