"""Protection at cut edges: RNM, masks and unmasks, chosen per edge from a taint analysis.

Reads the labelled program, its stages and edges, and the policy. Returns a
:class:`ProtectResult` with *new* stages, edges and outputs (nothing it is given is edited) and
a :class:`~partitioner.plan.Protection` record. It is the composition of smaller passes, each in
its own module: :mod:`passes.rnm` (the RNM site), :mod:`passes.taint` (what each value depends
on), :mod:`passes.exact` (exact ring arithmetic on GPU stages), :mod:`passes.linearity` (the
enclave's corrections), :mod:`passes.mask` (mask/unmask insertion), :mod:`passes.freivalds`
(integrity checks) and :mod:`passes.cost`. Guarantees:

* every value that crosses enclave -> GPU is classified by what it depends on (its *taint*:
  the request's input, a protected parameter, or only RNM-sanitised tokens) and gets a
  protection: ``exact``/``additive`` masking, ``dp`` (sanitised tokens and public weights only),
  ``public`` (depends on no secret), or ``none`` (left for the audit to reject);
* a masked value is masked at the end of the enclave stage that produces it; every GPU stage it
  reaches has a :class:`~partitioner.plan.Correction` and every GPU value that carries a mask is
  unmasked at the start of the enclave stage that consumes it (or at the program output);
* a GPU op that a mask reaches but that is not affine is never run on plaintext silently: it
  raises :class:`PartitionError`; or, under ``on_unmaskable="enclave"``, the result names it in
  ``move_to_enclave`` (and carries no protection) so that placement can run again; or, for
  products of two activations under ``"cross_terms"``, it gets an online correction whose cost
  is recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from partitioner.plan import (
    ENCLAVE,
    GPU,
    INPUT,
    MASKED_PROTECTIONS,
    OUTPUT,
    Correction,
    Edge,
    Protection,
    Stage,
)
from partitioner.policy import Policy
from partitioner.rnm_tables import TokenPrior
from partitioner.shapes import ShapeContext
from passes import exact as exact_pass
from passes.cost import correction_cost
from passes.freivalds import freivalds_copies
from passes.linearity import StageAnalysis, analyse, build_correction
from passes.mask import rewrite_stage
from passes.rnm import insert_rnm
from passes.taint import MODEL_TAINT, protection_of, taint_of


@dataclass
class ProtectResult:
    """What :func:`protect` returns.

    When ``move_to_enclave`` is not empty (only under ``on_unmaskable="enclave"``) the other
    fields are the unprotected input and must not be used: the caller places again with those
    nodes pinned to the enclave.
    """

    stages: list[Stage]
    edges: list[Edge]
    flat_outputs: list[Any]
    protection: Protection | None
    taint: dict[str, frozenset[str]] = field(default_factory=dict)
    move_to_enclave: dict[str, str] = field(default_factory=dict)


class _MoveToEnclave(Exception):
    def __init__(self, nodes: dict[str, str]) -> None:
        super().__init__(f"{len(nodes)} nodes must move into the enclave")
        self.nodes = nodes


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
        prior: TokenPrior | None = None,
        public: Mapping[str, int] | None = None,
    ) -> None:
        self.program = program
        self.prior = prior
        self.public = dict(public or {})
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

    def run(self) -> ProtectResult:
        inserted = insert_rnm(
            self.program,
            self.policy,
            self.stages,
            self.edges,
            self.flat_outputs,
            self.special_ids,
            self.prior,
            self.public,
        )
        self.stages, self.flat_outputs = inserted.stages, inserted.flat_outputs
        # edges are re-annotated below: work on copies so the caller's are never edited
        self.edges = [dataclasses.replace(e) for e in inserted.edges]
        site = inserted.site
        if site is not None:
            self.vals[site.sanitised] = self.vals[site.token_input]
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
        exact = exact_pass.new_exact_spec() if masking == "exact" else None
        if exact is not None:
            gpu_stages = [s for s in self.stages if s.side == GPU]
            calibrated = set(masked)
            if self.policy.public_base is not None:
                # a scale calibrated on a value a protected parameter shaped (a fine-tune's
                # rotation of a base layer's input) would be published in plan.json, which
                # the GPU host reads; those take the default (a row-scaled value needs none)
                calibrated = {n for n in masked if MODEL_TAINT not in taint.get(n, ())}
            amax = exact_pass.calibrate(self.program, calibrated)
            exact_pass.plan_inputs(gpu_stages, masked, exact, amax, dict(self.shapes.upper))
            for name in masked:  # pads are drawn in the ring, not in the value's float dtype
                shape = list(masked[name][0])
                if name in exact.row_limit:  # and row-scaled values carry their exponents
                    shape[-1] += 1
                masked[name] = (shape, exact.ring[name])
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
            if exact is not None:
                try:
                    module = exact_pass.to_exact(stage, inputs, exact)
                except exact_pass.ExactRefusal as refusal:
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
        stages = [rewrite_stage(s, masked, gpu_masked, modules, exact) for s in self.stages]
        for edge in self.edges:
            if edge.direction == "gpu->enclave" or (
                edge.consumer == OUTPUT and self.side[edge.producer] == GPU
            ):
                edge.protection = "unmask" if edge.name in gpu_masked else "clear"
            elif edge.direction == "gpu->gpu" and edge.name in gpu_masked:
                edge.protection = "masked"
        if exact is not None:
            self.edges = exact_pass.mark_exact_edges(self.edges, exact)
        pooled = self._pooled(corrections)
        freivalds = freivalds_copies(self.policy, stages, corrections, pooled)
        cost = {
            name: correction_cost(modules[name], corr, self.shapes)
            for name, corr in corrections.items()
        }
        protection = Protection(
            masking=masking,
            mask_scale=float(self.policy.mask_scale),
            masked=masked,
            gpu_masked=gpu_masked,
            corrections=corrections,
            pooled=pooled,
            cost=cost,
            rnm=site,
            token_shape=self.shapes.shape(self.vals[site.token_input]) if site else None,
            exact=exact,
            freivalds=freivalds,
        )
        return ProtectResult(stages, self.edges, self.flat_outputs, protection, taint)

    def _users_in(self, stage: Stage, value: str) -> list[str]:
        ph = next(n for n in stage.module.graph.find_nodes(op="placeholder") if n.name == value)
        return [u.name for u in ph.users if u.op == "call_function"]

    def _refuse(self, offenders: dict[str, str], masked_in: dict[str, list[str]]) -> None:
        if self.policy.on_unmaskable == "enclave":
            raise _MoveToEnclave(
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


def protect(
    program: ExportedProgram,
    policy: Policy,
    shapes: ShapeContext,
    stages: list[Stage],
    edges: list[Edge],
    flat_outputs: list[Any],
    special_ids: Iterable[int] = (),
    prior: TokenPrior | None = None,
    public: Mapping[str, int] | None = None,
) -> ProtectResult:
    """Insert RNM, masks, unmasks and corrections; see the module docstring for guarantees.

    Raises :class:`PartitionError` when the policy cannot be met.
    """
    protector = _Protector(
        program,
        policy,
        shapes,
        list(stages),
        list(edges),
        list(flat_outputs),
        special_ids,
        prior,
        public,
    )
    try:
        return protector.run()
    except _MoveToEnclave as move:
        return ProtectResult(list(stages), list(edges), list(flat_outputs), None, {}, move.nodes)
