"""``SplitProgram``: what ``partition`` returns — a plan, its modules, and how it was made.

The plan (:class:`~partitioner.plan.Plan`, with the callables of its stages, corrections and
Freivalds copies) is all that running the program needs; the rest (the labelled source
program, the placement, shapes, labels, FLOPs and taint) is the compiler's record for reports,
the audit and the golden files. The compiler's object holds no worker, mask pool or request
state: :meth:`SplitProgram.executor` hands the plan to the enclave-side
:class:`~enclave_runtime.executor.Executor`, which owns those. ``plan()`` is canonical JSON-ready
data (sorted, no addresses, no timestamps) so golden files can compare it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.export import ExportedProgram

from enclave_runtime.executor import Executor, StageRunner
from enclave_runtime.signature import CallSignature
from partitioner.label_set import Label
from partitioner.placement import Placement
from partitioner.plan import ENCLAVE, GPU, Edge, Plan, Protection, Stage, StateSpec
from partitioner.policy import Policy
from partitioner.protection import ADDITIVE_LEAK
from partitioner.public_base import ParameterSplit
from partitioner.shapes import ShapeContext


@dataclass
class SplitProgram:
    """Enclave and GPU stages of one model under one policy, with the compiler's record."""

    spec: Plan
    source: ExportedProgram  # the labelled program the stages were cut from
    shapes: ShapeContext
    placement: Placement
    labels: dict[str, Label] = field(default_factory=dict)
    label_rules: dict[str, str] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    param_bytes: dict[str, int] = field(default_factory=dict)
    taint: dict[str, frozenset[str]] = field(default_factory=dict)
    seed: int | None = None  # the executors' CSPRNG seed: tests only
    parameters: ParameterSplit | None = None  # public and protected, under a public_base
    _executors: int = field(default=0, repr=False, compare=False)

    # -- the plan's parts, by name -------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.spec.model

    @property
    def policy(self) -> Policy:
        return self.spec.policy

    @property
    def stages(self) -> list[Stage]:
        return self.spec.stages

    @property
    def edges(self) -> list[Edge]:
        return self.spec.edges

    @property
    def flat_outputs(self) -> list[Any]:
        return self.spec.flat_outputs

    @property
    def protection(self) -> Protection | None:
        return self.spec.protection

    @property
    def state(self) -> dict[str, StateSpec]:
        return self.spec.state

    @property
    def input_dims(self) -> dict[str, list[int | str]]:
        return self.spec.input_dims

    @functools.cached_property
    def signature(self) -> CallSignature:
        return CallSignature(self.spec.signature)

    def save(
        self,
        directory: str | Path,
        *,
        tokenizer: Any = None,
        sign_key: Any = None,
        compile_enclave: bool | str = False,
        enclave_key: Any = None,
    ) -> Path:
        """Write plan.json, enclave/ and gpu/ (see ``partitioner.artifacts``; ``enclave_key``
        seals the enclave's weights, ``partitioner.sealing``)."""
        from partitioner.artifacts import save  # artifacts imports this module's callers

        return save(
            self,
            directory,
            tokenizer=tokenizer,
            sign_key=sign_key,
            compile_enclave=compile_enclave,
            enclave_key=enclave_key,
        )

    # -- execution ---------------------------------------------------------------------------

    def executor(
        self, runner: StageRunner | None = None, *, seed: int | str | None = None
    ) -> Executor:
        """An enclave-side executor of this plan: GPU stages in this process unless ``runner``
        serves them. Hold it to reuse its mask pool and read ``last_request``."""
        if seed is None and self.seed is not None:
            # a seeded program's executors draw different pads (the first one: ``seed``)
            seed = self.seed if self._executors == 0 else f"{self.seed}:{self._executors}"
            self._executors += 1
        return Executor(self.spec, runner, seed=seed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One in-process call with a fresh executor (see :meth:`executor`)."""
        return self.executor()(*args, **kwargs)

    def without_protection(self) -> SplitProgram:
        """The same placement split again with no masks, RNM or checks.

        For measuring what protection costs (``benchmarks/overhead.py``); the result has not
        passed the audit and sends protected values in the clear.
        """
        from partitioner.split import build_stages

        stages, edges, flat_outputs = build_stages(self.source, self.placement, self.shapes)
        spec = dataclasses.replace(
            self.spec, stages=stages, edges=edges, flat_outputs=flat_outputs, protection=None
        )
        return dataclasses.replace(self, spec=spec, taint={})

    # -- description --------------------------------------------------------------------------

    @property
    def cut_edges(self) -> list[Edge]:
        return self.spec.cut_edges

    def bytes_crossing(self) -> dict[str, int]:
        return self.spec.bytes_crossing()

    def share(self) -> dict[str, float]:
        """The enclave's share of FLOPs and of parameter bytes (0..1)."""
        flops = {ENCLAVE: 0, GPU: 0}
        params = {ENCLAVE: 0, GPU: 0}
        for stage in self.stages:
            flops[stage.side] += sum(self.flops.get(n, 0) for n in stage.nodes)
            params[stage.side] += sum(self.param_bytes.get(p, 0) for p in stage.params)

        def ratio(d: dict[str, int]) -> float:
            total = d[ENCLAVE] + d[GPU]
            return d[ENCLAVE] / total if total else 0.0

        return {
            "flops": ratio(flops),
            "params": ratio(params),
            "enclave_flops": flops[ENCLAVE],
            "gpu_flops": flops[GPU],
            "enclave_param_bytes": params[ENCLAVE],
            "gpu_param_bytes": params[GPU],
        }

    def other_nodes(self) -> dict[str, str]:
        """Nodes the labeller could not classify, with the reason: reported, never silent."""
        return dict(self.spec.other_nodes)

    def plan(self) -> dict[str, Any]:
        """Canonical, deterministic description (the golden-file format)."""
        return self.spec.describe()

    def _protection_lines(self) -> list[str]:
        prot = self.protection
        if prot is None:
            return []
        counts = Counter(e.protection for e in self.cut_edges)
        lines = [
            "protection of cut edges: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        ]
        if prot.masked:
            scale = (
                f", pads uniform on [-{prot.mask_scale:g}, {prot.mask_scale:g}] (LEAKS: "
                f"{ADDITIVE_LEAK})"
            )
            if prot.exact is not None:
                rings = sorted(
                    {"2^32" if r == "int32" else "2^64" for r in prot.exact.ring.values()}
                )
                scale = f", pads uniform over Z_{'/'.join(rings)}, int8 weights per channel"
            lines.append(
                f"masking: {prot.masking}{scale}; {len(prot.masked)} masked values, "
                f"{len(prot.pooled)} of {len(prot.corrections)} corrections precomputed"
            )
        online = sum(c["enclave_online_mflop"] for c in prot.cost.values())
        if online:
            offloaded = sum(
                c["gpu_mflop"] for n, c in prot.cost.items() if c["enclave_online_mflop"]
            )
            lines.append(
                f"cross terms: the enclave computes {online:.1f} MFLOP online to unmask "
                f"{offloaded:.1f} MFLOP of products of two activations on the GPU"
            )
        if prot.rnm is not None:
            g = prot.rnm.grouping
            groups = (
                f"groups in frequency strata of the prior {g['prior']} (ratio {g['ratio']:g})"
                if g["method"] == "strata"
                else "cosine groups without a prior (a group may give its most frequent word "
                "away: pass a token prior)"
            )
            public = ", ".join(f"{n} ({c} ids)" for n, c in prot.rnm.public.items())
            lines.append(
                f"RNM: ε={prot.rnm.epsilon:g} per token, {prot.rnm.candidates} candidates, "
                f"in {prot.rnm.stage}; a request's ε is ε x its non-public tokens; {groups}; "
                f"public token classes (passed unchanged, no ε): {public or 'special only'}"
            )
        if prot.freivalds:
            lines.append(f"Freivalds checks on {len(prot.freivalds)} GPU stages")
        return lines

    def _parameter_lines(self) -> list[str]:
        """Under a public base: every protected parameter with its size and why, and the
        public ones in total (each by name with ``plan()``'s ``parameters``)."""
        split = self.parameters
        if split is None:
            return []
        lines = [
            f"public base {split.source}: {len(split.public)} public parameters "
            f"({sum(split.public.values()) / 2**20:.2f} MiB, bit-identical to the base), "
            f"{len(split.protected)} protected ({sum(split.protected.values()) / 2**20:.2f} MiB):"
        ]
        for fqn, nbytes in sorted(split.protected.items()):
            lines.append(f"  protected {fqn}: {nbytes:,} bytes ({split.why.get(fqn, '')})")
        return lines

    def report(self) -> str:
        """Human-readable summary: stages, labels per side, enclave share, bytes crossing."""
        ref = ", ".join(f"{k}={v}" for k, v in sorted(self.spec.reference_dims.items())) or "static"
        lines = [f"teesplit: {self.model_name} under policy {self.policy.name!r}"]
        n_enc = sum(s.side == ENCLAVE for s in self.stages)
        lines.append(
            f"stages: {len(self.stages)} ({n_enc} enclave, {len(self.stages) - n_enc} gpu); "
            f"cut edges: {len(self.cut_edges)}; sizes at {ref}"
        )
        lines.append(
            f"  {'stage':<12}{'side':<9}{'ops':>6}{'params':>9}{'MFLOP':>12}"
            f"{'in KiB':>11}{'out KiB':>11}"
        )
        for stage in self.stages:
            in_b = sum(e.nbytes for e in self.edges if e.consumer == stage.name and e.crossing)
            out_b = sum(e.nbytes for e in self.edges if e.producer == stage.name and e.crossing)
            mflop = sum(self.flops.get(n, 0) for n in stage.nodes) / 1e6
            lines.append(
                f"  {stage.name:<12}{stage.side:<9}{len(stage.nodes):>6}{len(stage.params):>9}"
                f"{mflop:>12.1f}{in_b / 1024:>11.1f}{out_b / 1024:>11.1f}"
            )
        lines.append("nodes per label:")
        lines.append(f"  {'label':<22}{'enclave':>8}{'gpu':>8}")
        per_side: dict[str, Counter[str]] = {ENCLAVE: Counter(), GPU: Counter()}
        for stage in self.stages:
            per_side[stage.side].update(str(self.labels[n]) for n in stage.nodes)
        for label in sorted(set(per_side[ENCLAVE]) | set(per_side[GPU])):
            lines.append(f"  {label:<22}{per_side[ENCLAVE][label]:>8}{per_side[GPU][label]:>8}")
        share = self.share()
        lines.append(
            f"enclave share: {share['flops']:.1%} of FLOPs "
            f"({share['enclave_flops'] / 1e9:.2f} of "
            f"{(share['enclave_flops'] + share['gpu_flops']) / 1e9:.2f} GFLOP), "
            f"{share['params']:.1%} of parameter bytes"
        )
        crossing = self.bytes_crossing()
        lines.append(
            f"bytes crossing: enclave->gpu {crossing['enclave->gpu']:,}, "
            f"gpu->enclave {crossing['gpu->enclave']:,}"
        )
        lines += self._protection_lines()
        protected = [w for w in self.placement.why.values() if w.startswith("reads protected")]
        overrode = sorted(
            {w.split("gpu pin of ")[1].rstrip(")") for w in protected if "gpu pin" in w}
        )
        moved = [w for w in self.placement.why.values() if w.startswith("GPU block")]
        if protected:
            note = f"; overriding gpu pins of {', '.join(overrode)}" if overrode else ""
            lines.append(
                f"kept in the enclave because they read protected parameters: "
                f"{len(protected)} nodes{note}"
            )
        if moved:
            lines.append(f"moved into the enclave by min_gpu_block: {len(moved)} nodes")
        lines += self._parameter_lines()
        others = self.other_nodes()
        if others:
            lines.append(f"unclassified nodes (label 'other'): {len(others)}")
            for node, rule in others.items():
                lines.append(f"  {node}: {rule}")
        else:
            lines.append("unclassified nodes (label 'other'): none")
        return "\n".join(lines)
