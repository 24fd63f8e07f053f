"""Report-Noisy-Max token sanitisation (CMIF), and the tables it needs.

The mechanism, per input token ``t`` (special tokens pass through unchanged):

1. the candidate set ``C(t)`` is the group of ``t`` in a *fixed partition* of the vocabulary into
   groups of ``K`` tokens (CusText's disjoint groups), built once per model by greedy clustering on
   the cosine similarity of the model's own embedding rows; with a public token prior, inside
   frequency strata of it (``RNMTables.build``), so a group does not name its likeliest word;
2. each candidate ``c`` scores ``u(t, c) = cos(E_t, E_c)`` min-max normalised over ``C(t)`` to
   ``[0, 1]``, so the sensitivity is ``Δ = 1``;
3. the output is ``argmax_c u(t, c) + Laplace(2Δ/ε)``.

Why this is ε-DP, and for which neighbours: take two tokens ``t, t'`` in the same group. They have
the same candidate set, and ``|u(t, c) - u(t', c)| <= 1`` for every ``c`` because both scores lie
in ``[0, 1]``. Report-Noisy-Max with ``Laplace(2Δ/ε)`` noise over a common candidate set is ε-DP
(Dwork & Roth, Claim 3.9, the non-monotone case), so
``P[out = c | t] <= e^ε · P[out = c | t']``. The candidate set depends on ``t`` only through its
group, a public function of the vocabulary fixed before any request, so it leaks nothing beyond
the group. Tokens in *different* groups are distinguishable (the output reveals the group): the
guarantee is ε-indistinguishability among the ``K`` members of a group, exactly CusText's. A
candidate set chosen per token (the ``K`` nearest neighbours of each ``t``) would break it: two
neighbours would have different supports and no ε bounds the ratio. A request of ``n``
sanitised tokens spends ``n·ε`` by sequential composition; :meth:`RNMTables.request_epsilon`
reports it.

The pass (:func:`insert_rnm`) reads the labelled program, its stages and edges and the policy;
it returns new stages, edges and outputs (its inputs are not edited) and the :class:`RNMSite`;
it guarantees that the token input is sanitised once, at the start of the first stage that
reads it (which must be in the enclave, before the embedding), and that every consumer reads
the sanitised tokens.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from partitioner.op_table import EMBEDDING_OPS, op_name, props
from partitioner.ops import OPS
from partitioner.plan import ENCLAVE, INPUT, Edge, RNMSite, Stage
from partitioner.policy import Policy
from partitioner.rnm_tables import RNMTables, TokenPrior
from passes.base import fake_like
from passes.graph_edit import append_placeholder, copy_graph, graph_module, input_node
from passes.labels import user_input_names


def exact_distribution(
    scores: torch.Tensor, noise_scale: float, grid: int = 200_001
) -> torch.Tensor:
    """``P[argmax(score + Laplace) = j]`` for each candidate, by numerical integration.

    ``P[j] = ∫ f(t - s_j) Π_{i≠j} F(t - s_i) dt`` with Laplace pdf ``f`` and cdf ``F``; an
    independent check of the sampler (no random numbers involved). Padding slots (``-inf``) get 0.
    """
    valid = torch.isfinite(scores)
    s = scores[valid].to(torch.float64)
    b = float(noise_scale)
    t = torch.linspace(float(s.min()) - 40 * b, float(s.max()) + 40 * b, grid, dtype=torch.float64)
    z = t.unsqueeze(1) - s.unsqueeze(0)  # (grid, k)
    pdf = torch.exp(-z.abs() / b) / (2 * b)
    cdf = torch.where(z < 0, 0.5 * torch.exp(z / b), 1 - 0.5 * torch.exp(-z / b))
    log_cdf = torch.log(cdf.clamp_min(1e-300))
    total = log_cdf.sum(dim=1, keepdim=True)
    integrand = pdf * torch.exp(total - log_cdf)
    probs = torch.trapezoid(integrand, t, dim=0)
    out = torch.zeros(scores.shape, dtype=torch.float64)
    out[valid] = probs / probs.sum()
    return out


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
                and props(op_name(indices)).reshape
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


def token_input_of(program: ExportedProgram) -> tuple[str, str] | None:
    """``(token input, embedding weight fqn)``, or None when no lookup reads a user input."""
    try:
        return _token_input(program)
    except PartitionError:
        return None


_TABLES: dict[tuple[Any, ...], tuple[weakref.ref, RNMTables]] = {}


def rnm_tables(
    weight: torch.Tensor,
    k: int,
    epsilon: float,
    special: Iterable[int],
    prior: TokenPrior | None = None,
) -> RNMTables:
    """Tables for one embedding matrix, built once per (weight, k, ε, specials, prior) in a
    process.

    The cache holds the weight weakly: entries die with their model.
    """
    grouping = None if prior is None else tuple(sorted(prior.describe().items()))
    key = (id(weight), weight._version, k, float(epsilon), tuple(sorted(set(special))), grouping)
    for stale in [k_ for k_, (ref, _) in _TABLES.items() if ref() is None]:
        del _TABLES[stale]
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    tables = RNMTables.build(weight, k, epsilon, key[4], prior)
    _TABLES[key] = (weakref.ref(weight), tables)
    return tables


@dataclass
class RNMInsertion:
    """What :func:`insert_rnm` returns: the rewritten program pieces and where RNM runs."""

    stages: list[Stage]
    edges: list[Edge]
    flat_outputs: list[Any]
    site: RNMSite | None


def insert_rnm(
    program: ExportedProgram,
    policy: Policy,
    stages: list[Stage],
    edges: list[Edge],
    flat_outputs: list[Any],
    special_ids: Iterable[int],
    prior: TokenPrior | None = None,
    public: Mapping[str, int] | None = None,
) -> RNMInsertion:
    """Sanitise the token input with RNM in the first enclave stage that reads it; with a
    ``prior``, its groups are frequency strata built against that prior. ``special_ids`` are
    every id passed through; ``public`` counts them per public class, for the plan."""
    cfg = policy.rnm
    if cfg is None:
        return RNMInsertion(list(stages), list(edges), list(flat_outputs), None)
    token, fqn = _token_input(program)
    weight = program.state_dict.get(fqn)
    if weight is None:
        raise PartitionError(f"embedding weight {fqn} has no value to build RNM tables from")
    side = {s.name: s.side for s in stages}
    order = [s.name for s in stages]
    consumers = [e for e in edges if e.name == token and e.producer == INPUT]
    first = min(consumers, key=lambda e: order.index(e.consumer))
    if side[first.consumer] != ENCLAVE:
        raise PartitionError(
            f"rnm: the first stage that reads {token} is {first.consumer}, a GPU stage; the "
            "tokens must be sanitised in the enclave before the embedding"
        )
    if weight.device.type == "meta":  # planning only: shapes without contents
        tables = RNMTables.on_meta(weight.shape[0], cfg.candidates, cfg.epsilon)
        if prior is not None:
            tables.grouping = prior.describe()
        special = None
    else:
        tables = rnm_tables(weight, cfg.candidates, cfg.epsilon, special_ids, prior)
        special = int(tables.keep.sum())
    sanitised = f"{token}_rnm"
    site = RNMSite(
        token, sanitised, first.consumer, tables.epsilon, tables.k, special, tables,
        grouping=dict(tables.grouping), public=dict(public or {}),
    )  # fmt: skip
    new_stages = []
    for stage in stages:
        if stage.name == first.consumer:
            stage = _rnm_stage(stage, site)
        elif token in stage.inputs:
            stage = dataclasses.replace(
                stage, inputs=[sanitised if n == token else n for n in stage.inputs]
            )
        new_stages.append(stage)
    new_edges = []
    for edge in edges:
        if edge.name == token and edge.consumer != first.consumer:
            edge = dataclasses.replace(
                edge,
                name=sanitised,
                producer=first.consumer,
                direction=f"enclave->{side.get(edge.consumer, ENCLAVE)}",
            )
        new_edges.append(edge)
    outputs = [sanitised if v == token else v for v in flat_outputs]
    return RNMInsertion(new_stages, new_edges, outputs, site)


def _rnm_stage(stage: Stage, site: RNMSite) -> Stage:
    graph, nodes = copy_graph(stage.module)
    attrs = {}
    token = input_node(stage, nodes, site.token_input)
    noise = append_placeholder(
        graph,
        f"rnm_noise_{site.token_input}",
        fake_like(token.meta["val"], torch.float64, (site.candidates,)),
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
    out_node = next(iter(graph.find_nodes(op="output")))
    out_node.args = ((*out_node.args[0], sanitised),)
    graph.lint()
    return dataclasses.replace(
        stage,
        module=graph_module(stage.module, graph, attrs, stage.name),
        inputs=list(stage.inputs),
        outputs=[*stage.outputs, site.sanitised],  # also what the request report reads
        extra_inputs=[*stage.extra_inputs, ("noise", site.token_input)],
        masked_outputs=list(stage.masked_outputs),
    )
