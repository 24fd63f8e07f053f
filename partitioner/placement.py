"""Placement: a side (``enclave`` or ``gpu``) for every compute node, then ordered stages.

Reads labelled nodes (``node.meta["teesplit"]["label"]``) and the policy; writes
``node.meta["teesplit"]["side"]`` and ``["why"]`` (pinned by label, forced by a protected
parameter, chosen by min-cut, or moved by ``min_gpu_block``); guarantees:

* every tensor-producing compute node gets exactly one side, a multi-output op and its
  ``getitem``s share one;
* a node that reads a protected parameter (or a reshaped/cast view of one) is in the enclave;
* free nodes minimise the bytes crossing the cut, counting each value once per direction
  (:func:`min_cut_sides`, checked against brute force in the tests);
* stages are maximal same-side groups taken in a topological order, so every stage depends
  only on earlier stages: the stage graph is acyclic by construction.

Nodes that produce no tensor (symbolic sizes, ``_assert_*``) are not placed: the split step
recomputes them in each stage that needs them, so no non-tensor value ever crosses.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from partitioner.label_set import Label
from partitioner.op_table import SHAPE_OPS, op_name
from partitioner.plan import ENCLAVE, GPU
from partitioner.policy import Policy
from partitioner.shapes import ShapeContext
from passes.base import is_public, is_tensor_value, model_weights, teesplit_meta
from passes.labels import label_of, user_input_names

_SOURCE, _SINK = "\x00enclave", "\x00gpu"


def min_cut_sides(
    nodes: Sequence[str],
    values: Iterable[tuple[str, Sequence[str], int]],
    pinned: Mapping[str, str],
) -> tuple[dict[str, str], int]:
    """Assign each node a side so that the bytes of values crossing the cut are minimal.

    ``values`` are ``(producer, consumers, nbytes)``: a value costs ``nbytes`` if any consumer
    sits on the other side from its producer, whichever direction, and only once. Each value
    gets two auxiliary vertices, one per direction (producer -> aux -> consumers for
    enclave->gpu, consumers -> aux -> producer for gpu->enclave), so a single s-t min-cut in
    networkx computes the exact optimum. ``pinned`` maps nodes to ``"enclave"``/``"gpu"``.
    Nodes without any edge go to the enclave (the conservative side).
    """
    graph = nx.DiGraph()
    graph.add_nodes_from([_SOURCE, _SINK])
    graph.add_nodes_from(nodes)
    for node, side in pinned.items():
        if side == ENCLAVE:
            graph.add_edge(_SOURCE, node)  # no capacity attribute: infinite
        else:
            graph.add_edge(node, _SINK)
    connected: set[str] = set()
    for i, (producer, consumers, nbytes) in enumerate(values):
        others = [c for c in consumers if c != producer]
        if not others:
            continue
        out_aux, in_aux = f"\x01out{i}", f"\x01in{i}"
        graph.add_edge(producer, out_aux, capacity=nbytes)
        graph.add_edge(in_aux, producer, capacity=nbytes)
        for consumer in others:
            graph.add_edge(out_aux, consumer)
            graph.add_edge(consumer, in_aux)
        connected.add(producer)
        connected.update(others)
    cost, (reachable, _) = nx.minimum_cut(graph, _SOURCE, _SINK)
    sides = {}
    for node in nodes:
        if node in pinned:
            sides[node] = pinned[node]
        elif node not in connected:
            sides[node] = ENCLAVE
        else:
            sides[node] = ENCLAVE if node in reachable else GPU
    return sides, int(cost)


@dataclass
class StagePlan:
    side: str
    nodes: list[str] = field(default_factory=list)  # topological order


@dataclass
class Placement:
    """Sides of the placed nodes and the stage order."""

    sides: dict[str, str]
    why: dict[str, str]
    stages: list[StagePlan]
    protected_params: set[str]
    cut_bytes: int


class Placer:
    """Computes a :class:`Placement` for one labelled program under one policy."""

    def __init__(
        self,
        program: ExportedProgram,
        policy: Policy,
        shapes: ShapeContext,
        force_enclave: Mapping[str, str] | None = None,
        held: Collection[str] = (),
    ) -> None:
        self.program = program
        self.force_enclave = dict(force_enclave or {})
        self.held = set(held)
        self.policy = policy
        self.shapes = shapes
        self.graph = program.graph
        self.params = model_weights(program)  # buffers and lifted constants too
        self.user_inputs = set(user_input_names(program))
        self.order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        self._nodes_by_name = {n.name: n for n in self.graph.nodes}
        self.units: dict[str, str] = {}  # node name -> unit head name
        for node in self.graph.nodes:
            if node.op != "call_function" or not is_tensor_value(node.meta.get("val")):
                continue
            head = node.name
            if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
                head = self.units.get(node.args[0].name, node.args[0].name)
            self.units[node.name] = head

    # -- pins --------------------------------------------------------------------------------

    def _protected_values(self) -> tuple[set[str], dict[str, str]]:
        """Protected parameters (all of them, less those tagged public) and the
        weight-derived values (views/casts) of them."""
        if "model" not in self.policy.protects:
            return set(), {}
        origin: dict[str, str] = {}  # value name -> protected parameter fqn it exposes
        protected: set[str] = set()
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.params:
                if not is_public(node):
                    origin[node.name] = self.params[node.name]
                    protected.add(self.params[node.name])
            elif node.op == "call_function" and op_name(node) in SHAPE_OPS:
                inputs = node.all_input_nodes
                if inputs and all(i.name in origin for i in inputs):
                    origin[node.name] = origin[inputs[0].name]
        return protected, origin

    def pins(self) -> tuple[dict[str, str], dict[str, str], set[str]]:
        pinned: dict[str, str] = {}
        why: dict[str, str] = {}
        protected, origin = self._protected_values()
        nodes = self._nodes_by_name
        for name, head in self.units.items():
            node = nodes[name]
            label = label_of(node)
            exposed = next(
                (origin[i.name] for i in node.all_input_nodes if i.name in origin), None
            ) or origin.get(name)
            if exposed is not None:
                side, reason = ENCLAVE, f"reads protected parameter {exposed}"
                if self.policy.pinned_side(label) == GPU:
                    reason += f" (overrides the gpu pin of label {label})"
            elif (pin := self.policy.pinned_side(label)) is not None:
                side, reason = pin, f"label {label} pinned to {pin}"
            else:
                continue
            prior = pinned.get(head)
            if prior is not None and prior != side:
                # A multi-output op and its getitems must share a side; the enclave is safe.
                side, reason = ENCLAVE, f"{reason}; shares a unit with {head}, pinned enclave"
            pinned[head] = side
            why[name] = reason
        for name, reason in self.force_enclave.items():
            pinned[self.units.get(name, name)] = ENCLAVE
            why[name] = reason
        return pinned, why, protected

    # -- placement -----------------------------------------------------------------------------

    def _values(self) -> list[tuple[str, list[str], int]]:
        """(producer unit, consumer units, bytes) for every tensor value that has consumers."""
        values = []
        for node in self.graph.nodes:
            if node.name in self.units:
                producer = self.units[node.name]
            elif node.op == "placeholder" and node.name in self.user_inputs:
                producer = node.name
            else:
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue  # tuple-valued heads are consumed through their getitems
            consumers: list[str] = []
            for user in node.users:
                target = "output" if user.op == "output" else self.units.get(user.name)
                if target is not None and target not in consumers:
                    consumers.append(target)
            if consumers:
                values.append((producer, consumers, self.shapes.nbytes(val)))
        return values

    def place(self) -> Placement:
        pinned, why, protected = self.pins()
        heads = sorted(set(self.units.values()), key=self.order.__getitem__)
        for name in self.user_inputs:
            # a state the GPU holds is produced there (it computed it), so its readers lean
            # to the GPU like any other value's
            pinned[name] = GPU if name in self.held else ENCLAVE
        pinned["output"] = ENCLAVE
        nodes = heads + sorted(self.user_inputs) + ["output"]
        unit_sides, cost = min_cut_sides(nodes, self._values(), pinned)
        sides = {name: unit_sides[head] for name, head in self.units.items()}
        self._follow_users(sides, pinned, why)
        for name, _head in self.units.items():
            why.setdefault(name, f"min-cut (free label {label_of(self._node(name))})")
        stages = self.schedule(sides)
        stages = self._apply_min_gpu_block(stages, sides, why)
        for node in self.graph.nodes:
            if node.name in sides:
                meta = teesplit_meta(node)
                meta["side"] = sides[node.name]
                meta["why"] = why[node.name]
        return Placement(sides, why, stages, protected, cost)

    def _follow_users(
        self, sides: dict[str, str], pinned: Mapping[str, str], why: dict[str, str]
    ) -> None:
        """A free node computed from constants alone (an empty cache's ``torch.tensor([])``)
        goes to its users' side when they share one: the min-cut is indifferent (it carries no
        request data and often no bytes), but sent across it would be a stage input of its own,
        an empty one that a serving engine refuses (Triton: dims must be >= 1)."""
        weight_only = self._weight_only(sides)
        for name in sorted(weight_only, key=self.order.__getitem__, reverse=True):
            if self.units.get(name) != name or name in pinned:
                continue
            users = {sides[u.name] for u in self._node(name).users if u.name in sides}
            if len(users) == 1 and sides[name] not in users:
                sides[name] = users.pop()
                why[name] = f"computed from constants only: follows its users to the {sides[name]}"

    def _node(self, name: str) -> torch.fx.Node:
        return self._nodes_by_name[name]

    def _weight_only(self, sides: Mapping[str, str]) -> set[str]:
        """Nodes computed from weights, buffers and constants alone (``W.T``, ``W.t()``, a
        permuted or cast weight): no request data reaches them."""
        state = {
            n.name
            for n in self.graph.find_nodes(op="placeholder")
            if n.name not in self.user_inputs
        }
        found: set[str] = set()
        for node in self.graph.nodes:
            if (
                node.name in sides
                and node.all_input_nodes
                and all(a.name in state or a.name in found for a in node.all_input_nodes)
            ):
                found.add(node.name)
        return found

    def schedule(self, sides: Mapping[str, str]) -> list[StagePlan]:
        """Group nodes into stages: a topological order that stays on one side while it can.

        A weight-only node whose users are all on its side is not scheduled on its own (it would
        land in the first stage of its side and reach its user as a stage input, where the
        masking passes see an activation, not a weight): it is emitted with its first user."""
        by_name = self._nodes_by_name
        weight_only = self._weight_only(sides)
        inline: dict[str, list[str]] = {}  # user -> weight-only producers emitted with it
        deps: dict[str, set[str]] = {}
        users: dict[str, list[str]] = {name: [] for name in sides}
        for name in sides:
            producers = set()
            for inp in by_name[name].all_input_nodes:
                if inp.name in sides:
                    producers.add(inp.name)
            deps[name] = producers
            for p in producers:
                users[p].append(name)
        deferred: set[str] = set()
        for name in weight_only:  # only where every user can emit it in its own stage
            if users[name] and all(sides[u] == sides[name] for u in users[name]):
                deferred.add(name)
        for name in sides:
            for p in sorted(deps[name] & deferred, key=self.order.__getitem__):
                inline.setdefault(name, []).append(p)
            deps[name] = deps[name] - deferred
        ready: dict[str, list[tuple[int, str]]] = {ENCLAVE: [], GPU: []}
        waiting = {name: len(p) for name, p in deps.items()}
        for name, count in waiting.items():
            if count == 0 and name not in deferred:
                heapq.heappush(ready[sides[name]], (self.order[name], name))
        emitted: set[str] = set()

        def emit(name: str, stage: StagePlan) -> None:
            for producer in inline.get(name, []):
                if producer not in emitted:
                    emit(producer, stage)
            emitted.add(name)
            stage.nodes.append(name)

        stages: list[StagePlan] = []
        current: str | None = None
        while ready[ENCLAVE] or ready[GPU]:
            if current is None or not ready[current]:
                if current is None:
                    # the enclave first: what the GPU could start without it (a held cache's
                    # readers) waits to join the GPU work that follows, in one stage
                    current = ENCLAVE if ready[ENCLAVE] else GPU
                else:
                    current = GPU if current == ENCLAVE else ENCLAVE
                stages.append(StagePlan(current))
            _, name = heapq.heappop(ready[current])
            emit(name, stages[-1])
            for user in users[name]:
                waiting[user] -= 1
                if waiting[user] == 0 and user not in deferred:
                    heapq.heappush(ready[sides[user]], (self.order[user], user))
        placed = sum(len(s.nodes) for s in stages)
        if placed != len(sides):
            stuck = sorted(n for n, c in waiting.items() if c > 0)[:5]
            raise PartitionError(f"placement graph has a cycle through {stuck}")
        return stages

    def _apply_min_gpu_block(
        self, stages: list[StagePlan], sides: dict[str, str], why: dict[str, str]
    ) -> list[StagePlan]:
        """Move GPU stages with fewer than ``min_gpu_block`` compute ops into the enclave.

        Moving work into the enclave never weakens protection, so this is always allowed; each
        moved node records why (the Torch-TensorRT ``min_block_size`` idea).
        """
        limit = self.policy.min_gpu_block
        if limit <= 1:
            return stages
        by_name = self._nodes_by_name
        while True:
            small = [
                s
                for s in stages
                if s.side == GPU
                and sum(label_of(by_name[n]) != Label.SHAPE for n in s.nodes) < limit
            ]
            if not small:
                return stages
            for stage in small:
                ops = sum(label_of(by_name[n]) != Label.SHAPE for n in stage.nodes)
                for name in stage.nodes:
                    sides[name] = ENCLAVE
                    why[name] = f"GPU block of {ops} ops is below min_gpu_block={limit}"
            stages = self.schedule(sides)


def place(
    program: ExportedProgram,
    policy: Policy,
    shapes: ShapeContext,
    force_enclave: Mapping[str, str] | None = None,
    held: Collection[str] = (),
) -> Placement:
    """Place every compute node of a labelled ``program`` under ``policy``.

    ``force_enclave`` maps node names to the reason they must run in the enclave (protection
    moves ops it cannot mask there under ``on_unmaskable="enclave"``). Under ``protects:
    [model]`` every parameter is protected but those whose placeholder is tagged ``public``
    (bit-identical to a public base's: ``partitioner.public_base``). ``held`` names state inputs
    the GPU keeps (``StateSpec.holder``): the min-cut counts them as produced on the GPU.
    """
    return Placer(program, policy, shapes, force_enclave, held).place()
