"""Protection at cut edges: RNM, masks and unmasks, chosen per edge from a taint analysis.

Reads the labelled program, its stages and edges, and the policy. Returns *new* stages (the
input stages are not edited) and a :class:`Protection` record; guarantees:

* every value that crosses enclave -> GPU is classified by what it depends on (its *taint*:
  the request's input, a protected parameter, or only RNM-sanitised tokens) and gets a
  protection: ``additive``/``field`` masking, ``dp`` (sanitised tokens and public weights only),
  ``public`` (depends on no secret), or ``none`` (left for the audit to reject);
* a masked value is masked by ``teesplit::mask`` at the end of the enclave stage that produces
  it; every GPU stage it reaches has a :class:`~passes.linearity.Correction` and every GPU value
  that carries a mask is unmasked by ``teesplit::unmask`` at the start of the enclave stage that
  consumes it (or at the program output);
* a GPU op that a mask reaches but that is not affine is never run on plaintext silently: it
  raises :class:`PartitionError`, or is handed back for the enclave (``on_unmaskable``), or, for
  products of two activations under ``"cross_terms"``, gets an online correction whose cost is
  recorded;
* with RNM, the token input is sanitised once, at the start of the first stage that reads it
  (which must be in the enclave, before the embedding), and every consumer reads the sanitised
  tokens.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from partitioner.placement import ENCLAVE, GPU
from partitioner.policy import Policy
from partitioner.shapes import ShapeContext, node_flops
from partitioner.split import INPUT, OUTPUT, Edge, Stage
from passes import field as field_pass
from passes.base import fake_like
from passes.labels import EMBEDDING_OPS, op_name, user_input_names
from passes.linearity import Correction, StageAnalysis, analyse, build_correction
from passes.ops import OPS
from passes.rnm import RNMTables

INPUT_TAINT, MODEL_TAINT, DP_TAINT = "input", "model", "dp"
MASKED_PROTECTIONS = ("additive", "field")


class MoveToEnclave(Exception):
    """Nodes that a mask reaches but cannot pass; ``on_unmaskable="enclave"`` re-places them."""

    def __init__(self, nodes: Mapping[str, str]) -> None:
        super().__init__(f"{len(nodes)} nodes must move into the enclave")
        self.nodes = dict(nodes)


@dataclass
class RNMSite:
    """Where RNM runs: the token input it sanitises and the name of the sanitised value."""

    tables: RNMTables
    token_input: str
    sanitised: str
    stage: str


@dataclass
class Protection:
    """What protection inserted, for the executor, the pool, the audit and the plan."""

    masking: str
    mask_scale: float
    taint: dict[str, frozenset[str]]
    # enclave-produced value masked on its way out -> (plan shape, dtype) of its pads
    masked: dict[str, tuple[list[int | str], str]]
    gpu_masked: set[str]  # GPU-produced values that carry a mask
    corrections: dict[str, Correction]  # GPU stage -> its enclave correction
    pooled: list[str]  # stages whose correction the pool precomputes, in stage order
    cost: dict[str, dict[str, Any]]  # GPU stage -> offloaded vs enclave online MFLOP
    rnm: RNMSite | None = None
    token_shape: list[int | str] | None = None  # the token input's shape (RNM noise per token)
    field_plan: field_pass.FieldPlan | None = None
    # GPU stage -> (the enclave's own copy of its module, its outputs): checked per request
    freivalds: dict[str, tuple[torch.fx.GraphModule, list[str]]] = field(default_factory=dict)

    @property
    def needs_pool(self) -> bool:
        return bool(self.masked) or self.rnm is not None

    def summary(self) -> dict[str, Any]:
        """Canonical JSON-ready description for ``plan()``."""
        out: dict[str, Any] = {
            "masking": self.masking,
            "mask_scale": self.mask_scale if self.masking == "additive" else None,
            "masked_values": sorted(self.masked),
            "gpu_masked_values": sorted(self.gpu_masked),
            "corrections": {
                stage: {
                    "precomputed": stage in self.pooled,
                    "products": corr.products,
                    "delta_inputs": corr.delta_inputs,
                    "primal_inputs": corr.primal_inputs,
                    **self.cost[stage],
                }
                for stage, corr in self.corrections.items()
            },
        }
        if self.rnm is not None:
            out["rnm"] = {
                "token_input": self.rnm.token_input,
                "stage": self.rnm.stage,
                "epsilon_per_token": self.rnm.tables.epsilon,
                "candidates": self.rnm.tables.k,
                "noise": f"Laplace(scale={self.rnm.tables.noise_scale:g})",
                "special_tokens": None
                if self.rnm.tables.keep.device.type == "meta"
                else int(self.rnm.tables.keep.sum()),
            }
        if self.field_plan is not None:
            out["field"] = self.field_plan.summary()
        return out


# -- taint ------------------------------------------------------------------------------------


def taint_of(
    program: ExportedProgram, policy: Policy, sanitised_input: str | None = None
) -> dict[str, frozenset[str]]:
    """For every value: which secrets it depends on (``input``, ``model``, ``dp``).

    Sizes are public (shapes are not hidden by any scheme here), so non-tensor values carry no
    taint. A token input sanitised by RNM carries ``dp`` instead of ``input``. A state input
    (a KV cache: placeholder tagged ``state_of`` by capture) is what an earlier call returned
    for the output it names, so it carries that output's taint: the analysis is repeated until
    the taints of state inputs stop changing (once per chain of state, in practice twice).
    """
    sig = program.graph_signature
    params = set(sig.inputs_to_parameters)
    users = set(user_input_names(program))
    state = {
        n.name: n.meta["teesplit"]["state_of"]
        for n in program.graph.nodes
        if n.op == "placeholder" and "state_of" in n.meta.get("teesplit", {})
    }
    carried: dict[str, frozenset[str]] = dict.fromkeys(state, frozenset())
    while True:
        taint: dict[str, frozenset[str]] = {}
        for node in program.graph.nodes:
            tags: set[str] = set()
            if node.op == "placeholder":
                if node.name in state:
                    tags |= carried[node.name]
                elif node.name in users and "input" in policy.protects:
                    tags.add(DP_TAINT if node.name == sanitised_input else INPUT_TAINT)
                elif node.name in params and "model" in policy.protects:
                    tags.add(MODEL_TAINT)
            elif node.op == "call_function" and isinstance(
                node.meta.get("val"), (torch.Tensor, list, tuple)
            ):
                for inp in node.all_input_nodes:
                    tags |= taint.get(inp.name, frozenset())
            taint[node.name] = frozenset(tags)
        update = {name: taint[out] for name, out in state.items()}
        if update == carried:
            return taint
        carried = update


def protection_of(tags: frozenset[str], masking: str) -> str:
    """The protection an enclave -> GPU edge with these taints gets under ``masking``."""
    if not tags:
        return "public"
    if masking != "none":
        return masking
    if tags == {DP_TAINT}:
        return "dp"
    return "none"


# -- RNM insertion -----------------------------------------------------------------------------


def _token_input(program: ExportedProgram) -> tuple[str, str]:
    """(token input placeholder, embedding weight fqn) of the lookup that reads user tokens.

    The indices may reach the lookup through shape ops (GPT-2 views ``input_ids`` first);
    sanitising the input itself is the same as sanitising its reshaped view.
    """
    users = set(user_input_names(program))
    sig = program.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    for node in program.graph.nodes:
        if node.op == "call_function" and op_name(node) in EMBEDDING_OPS:
            weight, indices = node.args[0], node.args[1]
            while (
                isinstance(indices, torch.fx.Node)
                and indices.op == "call_function"
                and op_name(indices) in _VIEW_OPS
            ):
                indices = indices.args[0]
            if (
                isinstance(indices, torch.fx.Node)
                and indices.name in users
                and (weight.name in weights)
            ):
                return indices.name, weights[weight.name]
    raise PartitionError(
        "rnm is set but no embedding lookup reads a user input; RNM sanitises the token ids "
        "before the embedding, so the model must take token ids"
    )


_VIEW_OPS = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "flatten",
        "unsqueeze",
        "squeeze",
        "contiguous",
        "clone",
        "alias",
    }
)


_TABLES: dict[tuple[Any, ...], tuple[weakref.ref, RNMTables]] = {}


def rnm_tables(weight: torch.Tensor, k: int, epsilon: float, special: Iterable[int]) -> RNMTables:
    """Tables for one embedding matrix, built once per (weight, k, ε, specials) in a process.

    The cache holds the weight weakly: entries die with their model.
    """
    key = (id(weight), weight._version, k, float(epsilon), tuple(sorted(set(special))))
    for stale in [k_ for k_, (ref, _) in _TABLES.items() if ref() is None]:
        del _TABLES[stale]
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    tables = RNMTables.build(weight, k, epsilon, key[4])
    _TABLES[key] = (weakref.ref(weight), tables)
    return tables


# -- the pass ------------------------------------------------------------------------------


def _copy_module(module: torch.fx.GraphModule) -> tuple[torch.fx.Graph, dict[str, torch.fx.Node]]:
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(module.graph, value_map)
    graph.output(out)
    return graph, {old.name: new for old, new in value_map.items()}


def _append_placeholder(graph: torch.fx.Graph, name: str, like: Any) -> torch.fx.Node:
    last = list(graph.find_nodes(op="placeholder"))
    ctx = (
        graph.inserting_after(last[-1]) if last else graph.inserting_before(next(iter(graph.nodes)))
    )
    with ctx:
        ph = graph.placeholder(name)
    ph.meta["val"] = like
    return ph


class _Protector:
    def __init__(
        self,
        program: ExportedProgram,
        policy: Policy,
        shapes: ShapeContext,
        stages: list[Stage],
        edges: list[Edge],
        flat_outputs: list[Any],
        special_ids: Iterable[int],
    ) -> None:
        self.program = program
        self.policy = policy
        self.shapes = shapes
        self.stages = stages
        self.edges = edges
        self.flat_outputs = flat_outputs
        self.special_ids = list(special_ids)
        self.side = {s.name: s.side for s in stages}
        self.side[INPUT] = self.side[OUTPUT] = ENCLAVE
        self.producer = {e.name: e.producer for e in edges}
        self.vals = {n.name: n.meta.get("val") for n in program.graph.nodes}

    # -- RNM -----------------------------------------------------------------------------

    def insert_rnm(self) -> RNMSite | None:
        cfg = self.policy.rnm
        if cfg is None:
            return None
        token, fqn = _token_input(self.program)
        weight = self.program.state_dict.get(fqn)
        if weight is None:
            raise PartitionError(f"embedding weight {fqn} has no value to build RNM tables from")
        consumers = [e for e in self.edges if e.name == token and e.producer == INPUT]
        first = min(consumers, key=lambda e: [s.name for s in self.stages].index(e.consumer))
        if self.side[first.consumer] != ENCLAVE:
            raise PartitionError(
                f"rnm: the first stage that reads {token} is {first.consumer}, a GPU stage; the "
                "tokens must be sanitised in the enclave before the embedding"
            )
        if weight.device.type == "meta":  # planning only: shapes without contents
            tables = RNMTables.on_meta(weight.shape[0], cfg.candidates, cfg.epsilon)
        else:
            tables = rnm_tables(weight, cfg.candidates, cfg.epsilon, self.special_ids)
        sanitised = f"{token}_rnm"
        self.vals[sanitised] = self.vals[token]
        site = RNMSite(tables, token, sanitised, first.consumer)
        for i, stage in enumerate(self.stages):
            if stage.name == first.consumer:
                self.stages[i] = self._rnm_stage(stage, site)
            elif token in stage.inputs:
                stage.inputs = [sanitised if n == token else n for n in stage.inputs]
        for edge in self.edges:
            if edge.name == token and edge.consumer != first.consumer:
                edge.name, edge.producer = sanitised, first.consumer
                edge.direction = f"enclave->{self.side[edge.consumer]}"
        self.flat_outputs[:] = [sanitised if v == token else v for v in self.flat_outputs]
        return site

    def _rnm_stage(self, stage: Stage, site: RNMSite) -> Stage:
        graph, nodes = _copy_module(stage.module)
        attrs = {}
        token = _input_node(stage, nodes, site.token_input)
        noise = _append_placeholder(
            graph,
            f"rnm_noise_{site.token_input}",
            fake_like(token.meta["val"], torch.float64, (site.tables.k,)),
        )
        tables = {}
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            for name in ("candidates", "scores", "keep"):
                attr = f"_rnm_{name}"
                tables[name] = graph.get_attr(attr)
                attrs[attr] = getattr(site.tables, name)
            sanitised = graph.call_function(
                OPS.rnm.default,
                (token, tables["candidates"], tables["scores"], tables["keep"], noise),
            )
        sanitised.meta["val"] = token.meta.get("val")
        token.replace_all_uses_with(sanitised, delete_user_cb=lambda n: n is not sanitised)
        outputs = [*stage.outputs, site.sanitised]  # also what the request report reads
        out_node = next(iter(graph.find_nodes(op="output")))
        out_node.args = ((*out_node.args[0], sanitised),)
        graph.lint()
        module = _graph_module(stage.module, graph, attrs, stage.name)
        return Stage(
            stage.name,
            stage.side,
            module,
            list(stage.inputs),
            outputs,
            stage.nodes,
            stage.params,
            extra_inputs=[*stage.extra_inputs, ("noise", site.token_input)],
            masked_outputs=list(stage.masked_outputs),
        )

    # -- masks ---------------------------------------------------------------------------

    def run(self) -> tuple[list[Stage], list[Edge], Protection]:
        site = self.insert_rnm()
        taint = taint_of(self.program, self.policy, site.token_input if site else None)
        if site is not None:
            taint[site.sanitised] = taint[site.token_input]
        masking = self.policy.masking
        masked: dict[str, tuple[list[int | str], str]] = {}
        for edge in self.edges:
            if edge.direction != "enclave->gpu":
                continue
            edge.protection = protection_of(taint.get(edge.name, frozenset()), masking)
            if edge.protection in MASKED_PROTECTIONS:
                if edge.producer == INPUT:
                    raise PartitionError(
                        f"user input {edge.name} goes straight to GPU stage {edge.consumer}; "
                        "masks are applied by enclave stages, so pin its first consumer to the "
                        "enclave"
                    )
                val = self.vals[edge.name]
                masked[edge.name] = (self.shapes.shape(val), str(val.dtype).removeprefix("torch."))
        field_plan = field_pass.FieldPlan() if masking == "field" else None
        modules: dict[str, torch.fx.GraphModule] = {}
        analyses: dict[str, StageAnalysis] = {}
        masked_in: dict[str, list[str]] = {}
        gpu_masked: set[str] = set()
        offenders: dict[str, str] = {}
        for stage in self.stages:
            if stage.side != GPU:
                continue
            inputs = [n for n in stage.inputs if n in masked or n in gpu_masked]
            for n in inputs:
                val = self.vals.get(n)
                if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
                    for user in self._users_in(stage, n):
                        offenders[user] = f"reads {n}, a secret {val.dtype} value, on the GPU"
            module = stage.module
            if field_plan is not None:
                try:
                    module = field_pass.to_field(stage, inputs, field_plan, self.shapes)
                except field_pass.FieldRefusal as refusal:
                    if self.policy.on_unmaskable != "enclave":
                        raise
                    offenders[refusal.node] = str(refusal)
                    continue
            analysis = analyse(module, inputs)
            for node in analysis.nonlinear:
                offenders[node] = analysis.reasons[node]
            if self.policy.on_unmaskable != "cross_terms":
                for node in analysis.products:
                    offenders[node] = analysis.reasons[node]
            modules[stage.name] = module
            analyses[stage.name] = analysis
            masked_in[stage.name] = inputs
            gpu_masked |= {o for o in stage.outputs if o in analysis.masked}
        if offenders:
            self._refuse(offenders, masked_in)
        corrections = self._corrections(modules, analyses, masked_in)
        stages = [self._rewrite(s, masked, gpu_masked, modules, field_plan) for s in self.stages]
        for edge in self.edges:
            if edge.direction == "gpu->enclave" or (
                edge.consumer == OUTPUT and self.side[edge.producer] == GPU
            ):
                edge.protection = "unmask" if edge.name in gpu_masked else "clear"
            elif edge.direction == "gpu->gpu" and edge.name in gpu_masked:
                edge.protection = "masked"
        if field_plan is not None:
            field_plan.mark_edges(self.edges, masked, gpu_masked, self.shapes)
        pooled = self._pooled(corrections)
        freivalds = self._freivalds(stages, corrections, pooled)
        cost = {name: self._cost(name, modules[name], corr) for name, corr in corrections.items()}
        protection = Protection(
            masking=masking,
            mask_scale=float(self.policy.mask_scale),
            taint=taint,
            masked=masked,
            gpu_masked=gpu_masked,
            corrections=corrections,
            pooled=pooled,
            cost=cost,
            rnm=site,
            token_shape=self.shapes.shape(self.vals[site.token_input]) if site else None,
            field_plan=field_plan,
            freivalds=freivalds,
        )
        return stages, self.edges, protection

    def _freivalds(
        self, stages: list[Stage], corrections: dict[str, Correction], pooled: list[str]
    ) -> dict[str, tuple[torch.fx.GraphModule, list[str]]]:
        if self.policy.integrity != "freivalds":
            return {}
        checked: dict[str, tuple[torch.fx.GraphModule, list[str]]] = {}
        for stage in stages:
            if stage.side != GPU:
                continue
            corr = corrections.get(stage.name)
            why = None
            if corr is None:
                why = "none of its inputs is masked, so there is no linear map to check"
            elif stage.name not in pooled:
                why = f"it is not affine in its inputs (products {corr.products})"
            elif corr.delta_inputs != stage.inputs:
                unmasked = sorted(set(stage.inputs) - set(corr.delta_inputs))
                why = f"its inputs {unmasked} are not masked"
            elif corr.delta_outputs != stage.outputs:
                why = "some of its outputs do not depend on its inputs"
            if why is not None:
                raise PartitionError(
                    f"integrity='freivalds' cannot check GPU stage {stage.name}: {why}; use "
                    "integrity='none' or pin its ops to the enclave"
                )
            # The enclave computes the bias term f(0) with its own module object (weights are
            # shared: they multiply zeros), never by asking the GPU.
            own = torch.fx.GraphModule(stage.module, copy.deepcopy(stage.module.graph))
            checked[stage.name] = (own, list(stage.outputs))
        return checked

    def _users_in(self, stage: Stage, value: str) -> list[str]:
        ph = next(n for n in stage.module.graph.find_nodes(op="placeholder") if n.name == value)
        return [u.name for u in ph.users if u.op == "call_function"]

    def _refuse(self, offenders: dict[str, str], masked_in: dict[str, list[str]]) -> None:
        if self.policy.on_unmaskable == "enclave":
            raise MoveToEnclave(
                {
                    n: f"on_unmaskable='enclave': {why}, and a masked value reaches it"
                    for n, why in offenders.items()
                }
            )
        node, why = next(iter(offenders.items()))
        stage = next(
            s
            for s in self.stages
            if node in s.nodes or node in {n.name for n in s.module.graph.nodes}
        )
        edges = [
            e
            for e in self.edges
            if e.consumer == stage.name and e.name in masked_in.get(stage.name, [])
        ]
        edge = edges[0] if edges else None
        via = f" masked edge {edge.name} ({edge.producer} -> {edge.consumer})" if edge else ""
        raise PartitionError(
            f"GPU stage {stage.name} receives{via}, but {node} cannot run on masked data: {why}. "
            f"Policy {self.policy.name!r} has on_unmaskable={self.policy.on_unmaskable!r}; set "
            "'enclave' to run such ops in the enclave, 'cross_terms' to let the enclave correct "
            "products of two activations online, or pin their label to the enclave "
            f"({len(offenders)} such ops in all)"
        )

    def _corrections(
        self,
        modules: dict[str, torch.fx.GraphModule],
        analyses: dict[str, StageAnalysis],
        masked_in: dict[str, list[str]],
    ) -> dict[str, Correction]:
        requests: dict[str, set[str]] = {name: set() for name in modules}
        corrections: dict[str, Correction] = {}
        for stage in reversed(self.stages):
            if stage.name not in modules or not (
                analyses[stage.name].masked or requests[stage.name]
            ):
                continue
            corr = build_correction(
                stage.name,
                modules[stage.name],
                stage.outputs,
                masked_in[stage.name],
                requests[stage.name],
                analyses[stage.name],
            )
            corrections[stage.name] = corr
            for name in corr.primal_inputs:
                producer = self.producer.get(name)
                if producer in requests:
                    requests[producer].add(name)
        return dict(sorted(corrections.items(), key=lambda kv: self._index(kv[0])))

    def _index(self, stage: str) -> int:
        return next(i for i, s in enumerate(self.stages) if s.name == stage)

    def _pooled(self, corrections: dict[str, Correction]) -> list[str]:
        pooled: list[str] = []
        for name, corr in corrections.items():
            if corr.precomputable and all(
                self.side.get(self.producer.get(n, INPUT)) == ENCLAVE
                or self.producer.get(n) in pooled
                for n in corr.delta_inputs
            ):
                pooled.append(name)
        return pooled

    def _cost(self, name: str, module: torch.fx.GraphModule, corr: Correction) -> dict[str, Any]:
        def flops(gm: torch.fx.GraphModule) -> int:
            total = 0
            for node in gm.graph.nodes:
                if node.op != "call_function":
                    continue
                if op_name(node) == "field_linear":  # not in torch's FLOP counter
                    w = node.args[1]
                    out = node.meta["val"]
                    numel = 1
                    for s in out.shape:
                        numel *= self.shapes.evaluate(s)
                    total += 2 * numel * int(w.meta["val"].shape[1])
                elif isinstance(node.meta.get("val"), torch.Tensor):
                    total += node_flops(node, self.shapes)
            return total

        return {
            "gpu_mflop": round(flops(module) / 1e6, 3),
            "enclave_online_mflop": 0.0
            if corr.precomputable
            else round(flops(corr.module) / 1e6, 3),
            "enclave_offline_mflop": round(flops(corr.module) / 1e6, 3)
            if corr.precomputable
            else 0.0,
        }

    def _rewrite(
        self,
        stage: Stage,
        masked: dict[str, Any],
        gpu_masked: set[str],
        modules: dict[str, torch.fx.GraphModule],
        field_plan: field_pass.FieldPlan | None,
    ) -> Stage:
        if stage.side == GPU:
            if modules.get(stage.name, stage.module) is stage.module:
                return stage
            return Stage(
                stage.name,
                stage.side,
                modules[stage.name],
                stage.inputs,
                stage.outputs,
                stage.nodes,
                stage.params,
            )
        mask_out = [o for o in stage.outputs if o in masked]
        unmask_in = [i for i in stage.inputs if i in gpu_masked]
        if not mask_out and not unmask_in:
            return stage
        graph, nodes = _copy_module(stage.module)
        extras = list(stage.extra_inputs)
        for name in unmask_in:
            ph = _input_node(stage, nodes, name)
            plain_val = ph.meta["val"]
            if field_plan is not None:  # residues arrive as int64
                ph.meta["val"] = fake_like(plain_val, torch.int64)
            delta = _append_placeholder(graph, f"delta_{name}", ph.meta["val"])
            extras.append(("delta", name))
            first_op = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first_op):
                if field_plan is None:
                    plain = graph.call_function(OPS.unmask.default, (ph, delta))
                else:
                    bits = field_plan.output_bits[name]
                    plain = graph.call_function(
                        OPS.field_unmask.default, (ph, delta, bits, field_plan.prime)
                    )
            plain.meta = {**ph.meta, "val": plain_val}
            ph.replace_all_uses_with(plain, delete_user_cb=lambda n, p=plain: n is not p)
        out_node = next(iter(graph.find_nodes(op="output")))
        results = list(out_node.args[0])
        for name in mask_out:
            value = results[stage.outputs.index(name)]
            val = value.meta["val"]
            r = _append_placeholder(
                graph, f"mask_{name}", val if field_plan is None else fake_like(val, torch.int64)
            )
            extras.append(("mask", name))
            with graph.inserting_before(out_node):
                if field_plan is None:
                    hidden = graph.call_function(OPS.mask.default, (value, r))
                else:
                    hidden = graph.call_function(
                        OPS.field_mask.default,
                        (value, r, field_plan.frac_bits, field_plan.prime),
                    )
            hidden.meta["val"] = r.meta["val"]
            results.append(hidden)
        out_node.args = (tuple(results),)
        graph.lint()
        module = _graph_module(stage.module, graph, {}, stage.name)
        return Stage(
            stage.name,
            stage.side,
            module,
            list(stage.inputs),
            list(stage.outputs),
            stage.nodes,
            stage.params,
            extra_inputs=extras,
            masked_outputs=[*stage.masked_outputs, *mask_out],
        )


def _input_node(stage: Stage, nodes: dict[str, torch.fx.Node], value: str) -> torch.fx.Node:
    """The copied placeholder through which ``stage`` reads ``value``."""
    old = list(stage.module.graph.find_nodes(op="placeholder"))[stage.inputs.index(value)]
    return nodes[old.name]


def _graph_module(
    root: torch.fx.GraphModule, graph: torch.fx.Graph, extra: dict[str, torch.Tensor], name: str
) -> torch.fx.GraphModule:
    attrs: dict[str, Any] = dict(extra)
    for node in graph.find_nodes(op="get_attr"):
        if node.target not in attrs:
            attrs[node.target] = operator.attrgetter(node.target)(root)
    return torch.fx.GraphModule(attrs, graph, class_name=name)


def protect(
    program: ExportedProgram,
    policy: Policy,
    shapes: ShapeContext,
    stages: list[Stage],
    edges: list[Edge],
    flat_outputs: list[Any],
    special_ids: Iterable[int] = (),
) -> tuple[list[Stage], list[Edge], Protection]:
    """Insert RNM, masks, unmasks and corrections; see the module docstring for guarantees.

    Raises :class:`MoveToEnclave` under ``on_unmaskable="enclave"`` when ops must move, and
    :class:`PartitionError` when the policy cannot be met.
    """
    return _Protector(program, policy, shapes, stages, edges, flat_outputs, special_ids).run()
