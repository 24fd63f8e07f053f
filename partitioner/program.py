"""``SplitProgram``: ordered stages, the edges between them, and an in-process executor.

Calling a SplitProgram runs every stage in order in this process (the reference executor the
runtime is checked against) and returns what the model returns. ``report()`` and ``plan()``
describe the split; ``plan()`` is canonical JSON-ready data (sorted, no addresses, no
timestamps) so golden files can compare it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind

from partitioner.errors import PartitionError
from partitioner.placement import ENCLAVE, GPU, Placement
from partitioner.policy import Policy
from partitioner.shapes import ShapeContext
from partitioner.split import Edge, Stage
from passes import integrity
from passes.label_set import Label
from passes.ops import OPS
from passes.pool import MaskPool, MaskSet
from passes.protect import Protection

PLAN_SCHEMA_VERSION = 2


@dataclass
class _Signature:
    """How to turn a call's ``(args, kwargs)`` into the exported graph's flat user inputs."""

    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    inputs: list[tuple[str | None, Any]]  # (placeholder name, None) or (None, constant value)

    @classmethod
    def of(cls, program: ExportedProgram) -> _Signature:
        inputs: list[tuple[str | None, Any]] = []
        for spec in program.graph_signature.input_specs:
            if spec.kind != InputKind.USER_INPUT:
                continue
            if isinstance(spec.arg, ConstantArgument):
                inputs.append((None, spec.arg.value))
            else:
                inputs.append((spec.arg.name, None))
        return cls(program.call_spec.in_spec, program.call_spec.out_spec, inputs)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map a call to ``{placeholder name: value}``, filling export-time constants."""
        args_spec, kwargs_spec = self.in_spec.children()
        names = list(kwargs_spec.context or [])
        n_positional = args_spec.num_children
        if len(args) > n_positional:  # extra positionals fill keyword inputs in export order
            extra = args[n_positional:]
            args = args[:n_positional]
            for name, value in zip(names, extra, strict=False):
                if name in kwargs:
                    raise TypeError(f"argument {name!r} given twice")
                kwargs[name] = value
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the program takes {names}")
        defaults = _constants_by_kwarg(self, names)
        full = {
            name: kwargs[name] if name in kwargs else defaults.get(name, _MISSING) for name in names
        }
        missing = sorted(n for n, v in full.items() if v is _MISSING)
        if missing:
            raise TypeError(f"missing arguments {missing}")
        flat_leaves, spec = pytree.tree_flatten((args, full))
        if spec != self.in_spec:
            raise TypeError(f"inputs do not match the exported signature {self.in_spec}")
        bound: dict[str, Any] = {}
        for (name, constant), leaf in zip(self.inputs, flat_leaves, strict=True):
            if name is not None:
                bound[name] = leaf
            elif leaf != constant:
                raise TypeError(
                    f"the program was exported with a constant {constant!r}, got {leaf!r}"
                )
        return bound


_MISSING = object()


def _constants_by_kwarg(signature: _Signature, names: list[str]) -> dict[str, Any]:
    n_positional = signature.in_spec.child(0).num_children
    keyword_inputs = signature.inputs[n_positional:]
    return {
        name: constant
        for name, (placeholder, constant) in zip(names, keyword_inputs, strict=False)
        if placeholder is None
    }


@dataclass
class SplitProgram:
    """Enclave and GPU stages of one model under one policy."""

    model_name: str
    policy: Policy
    stages: list[Stage]
    edges: list[Edge]
    flat_outputs: list[Any]
    signature: _Signature
    shapes: ShapeContext | None  # None for a loaded program: its plan is stored instead
    placement: Placement | None
    labels: dict[str, Label] = field(default_factory=dict)
    label_rules: dict[str, str] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    param_bytes: dict[str, int] = field(default_factory=dict)
    input_dims: dict[str, list[int | str]] = field(default_factory=dict)  # user input shapes
    protection: Protection | None = None
    pool: MaskPool | None = None
    source: ExportedProgram | None = None  # the labelled program the stages were cut from
    # With RNM: the last request's sanitised tokens and its total ε (sequential composition).
    last_request: dict[str, Any] = field(default_factory=dict)
    saved_plan: dict[str, Any] | None = None  # set by ``load``
    worker: Any = None  # the GPU worker connection, when the enclave driver runs it
    # KV-cache inputs -> generation.StateSpec (how each is refilled from an output)
    state: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Write plan.json, enclave/ and gpu/ (see ``partitioner.artifacts``)."""
        from partitioner.artifacts import save

        return save(self, directory)

    # -- execution ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(args, kwargs)

    def run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        public_tokens: bool | torch.Tensor = False,
    ) -> Any:
        """One call; ``public_tokens`` (all, or a bool mask over the token input) marks token
        positions that RNM passes through unchanged and that spend no ε.

        Public positions are those the GPU knows anyway or that carry nothing private: a
        generated token (the arg-max of logits the GPU computed in the clear; under RNM
        placements the lm_head runs there) and the chat template around a user's text.
        ``last_request["epsilon"]`` counts the sanitised positions only.
        """
        env = self.signature.bind(args, dict(kwargs))
        masks = self.pool.take(self.binding(env)) if self.pool is not None else None
        site = self.protection.rnm if self.protection is not None else None
        public = None
        if site is not None and masks is not None and public_tokens is not False:
            ids = env[site.token_input]
            public = (
                torch.ones_like(ids, dtype=torch.bool)
                if public_tokens is True
                else public_tokens.to(torch.bool)
            )
            if public.shape != ids.shape:
                raise PartitionError(
                    f"public_tokens has shape {list(public.shape)}, but the token input "
                    f"{site.token_input} has {list(ids.shape)}"
                )
            noise = masks.noise[site.token_input]
            identity = site.tables.identity_noise(ids, noise.dtype)
            masks.noise[site.token_input] = torch.where(public[..., None], identity, noise)
        flat = self.execute(env, masks)
        if public is not None:
            sanitised = ~site.tables.keep[env[site.token_input]] & ~public
            self.last_request["epsilon"] = float(site.tables.epsilon * int(sanitised.sum()))
        return pytree.tree_unflatten(flat, self.signature.out_spec)

    def binding(self, env: dict[str, Any]) -> dict[str, int]:
        """The named dims' values for one call (``{"batch": 1, "seq": 12}``), from the inputs."""
        out: dict[str, int] = {}
        for name, dims in self.input_dims.items():
            value = env.get(name)
            if not isinstance(value, torch.Tensor):
                continue
            for dim, actual in zip(dims, value.shape, strict=False):
                if isinstance(dim, str) and dim.isidentifier():
                    out[dim] = int(actual)
        return out

    def execute(self, env: dict[str, Any], masks: MaskSet | None) -> list[Any]:
        """Run the stages in order, keeping what the enclave and the GPU each hold apart.

        ``env`` is the enclave's plaintext; ``gpu`` what the GPU holds (masked where the plan
        masks); ``delta`` the corrections the enclave knows for masked GPU values; ``shadow``
        plaintext of GPU values that a product correction needs.
        """
        prot = self.protection
        gpu: dict[str, Any] = {}
        delta: dict[str, Any] = {}
        shadow: dict[str, Any] = {}
        if masks is not None:
            delta.update(masks.pads)
            delta.update(masks.deltas)
        clear = self._sent_clear
        for stage in self.stages:
            if stage.side == ENCLAVE:
                args = [env[n] if n in env else gpu[n] for n in stage.inputs]
                for kind, name in stage.extra_inputs:
                    if kind == "mask":
                        args.append(masks.pads[name])
                    elif kind == "delta":
                        args.append(delta[name])
                    else:
                        args.append(masks.noise[name])
                outs = stage.module(*args)
                n = len(stage.outputs)
                env.update(zip(stage.outputs, outs[:n], strict=True))
                gpu.update(zip(stage.masked_outputs, outs[n:], strict=True))
                for name in stage.outputs:
                    if name in clear:
                        gpu[name] = env[name]
                continue
            outs = stage.module(*(gpu[n] if n in gpu else env[n] for n in stage.inputs))
            gpu.update(zip(stage.outputs, outs, strict=True))
            if masks is not None and stage.name in masks.freivalds:
                integrity.check(
                    stage.name,
                    masks.freivalds[stage.name],
                    [gpu[n] for n in stage.inputs],
                    list(outs),
                    prot.field_plan.prime if prot.field_plan is not None else None,
                )
            corr = prot.corrections.get(stage.name) if prot is not None else None
            if corr is None or stage.name in prot.pooled:
                continue
            results = corr.module(
                *(delta[n] for n in corr.delta_inputs),
                *(env[n] if n in env else shadow[n] for n in corr.primal_inputs),
            )
            k = len(corr.delta_outputs)
            delta.update(zip(corr.delta_outputs, results[:k], strict=True))
            shadow.update(zip(corr.primal_outputs, results[k:], strict=True))
        if prot is not None and prot.rnm is not None:
            site = prot.rnm
            self.last_request = {
                "sanitised_tokens": env[site.sanitised],
                "epsilon": site.tables.request_epsilon(env[site.token_input]),
                "epsilon_per_token": site.tables.epsilon,
            }
        return [self._output(v, env, gpu, delta) for v in self.flat_outputs]

    def _output(self, value: Any, env: dict[str, Any], gpu: dict[str, Any], delta: dict) -> Any:
        if not isinstance(value, str):
            return value
        if value in env:
            return env[value]
        prot = self.protection
        if prot is not None and value in prot.gpu_masked:
            if prot.field_plan is not None:
                bits = prot.field_plan.output_bits[value]
                return OPS.field_unmask(gpu[value], delta[value], bits, prot.field_plan.prime)
            return OPS.unmask(gpu[value], delta[value])
        return gpu[value]

    @functools.cached_property
    def _sent_clear(self) -> set[str]:
        """Enclave values that cross to the GPU unmasked (public, DP-sanitised, or unprotected)."""
        masked = self.protection.masked if self.protection is not None else {}
        return {
            e.name for e in self.edges if e.direction == "enclave->gpu" and e.name not in masked
        }

    def without_protection(self) -> SplitProgram:
        """The same placement split again with no masks, RNM or checks.

        For measuring what protection costs (``benchmarks/overhead.py``); the result has not
        passed the audit and sends protected values in the clear.
        """
        from partitioner.split import build_stages

        stages, edges, flat_outputs = build_stages(self.source, self.placement, self.shapes)
        return dataclasses.replace(
            self,
            stages=stages,
            edges=edges,
            flat_outputs=flat_outputs,
            protection=None,
            pool=None,
            last_request={},
        )

    # -- description --------------------------------------------------------------------------

    @property
    def cut_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.crossing]

    def bytes_crossing(self) -> dict[str, int]:
        totals = {"enclave->gpu": 0, "gpu->enclave": 0}
        for edge in self.cut_edges:
            totals[edge.direction] += edge.nbytes
        return totals

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
        return {
            n: self.label_rules[n]
            for n, label in sorted(self.labels.items())
            if label == Label.OTHER
        }

    def plan(self) -> dict[str, Any]:
        """Canonical, deterministic description (the golden-file format)."""
        if self.saved_plan is not None:
            return self.saved_plan
        stages = []
        for stage in self.stages:
            stages.append(
                {
                    "name": stage.name,
                    "side": stage.side,
                    "labels": dict(
                        sorted(Counter(str(self.labels[n]) for n in stage.nodes).items())
                    ),
                    "nodes": stage.nodes,
                    "params": stage.params,
                    "inputs": stage.inputs,
                    "outputs": stage.outputs,
                    "extra_inputs": [list(x) for x in stage.extra_inputs],
                    "masked_outputs": stage.masked_outputs,
                }
            )
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model": self.model_name,
            "policy": self.policy.to_dict(),
            "reference_dims": dict(sorted(self.shapes.reference.items())),
            "stages": stages,
            "edges": [e.to_dict() for e in self.edges],
            "bytes_crossing": self.bytes_crossing(),
            "other_nodes": self.other_nodes(),
            "protection": self.protection.summary() if self.protection is not None else None,
        }

    def _protection_lines(self) -> list[str]:
        prot = self.protection
        if prot is None:
            return []
        counts = Counter(e.protection for e in self.cut_edges)
        lines = [
            "protection of cut edges: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        ]
        if prot.masked:
            scale = f", pads uniform on [-{prot.mask_scale:g}, {prot.mask_scale:g}]"
            if prot.field_plan is not None:
                scale = f", pads uniform mod p={prot.field_plan.prime}"
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
            lines.append(
                f"RNM: ε={prot.rnm.tables.epsilon:g} per token, {prot.rnm.tables.k} candidates, "
                f"in {prot.rnm.stage}; a request's ε is ε x its non-special tokens"
            )
        if prot.freivalds:
            lines.append(f"Freivalds checks on {len(prot.freivalds)} GPU stages")
        return lines

    def report(self) -> str:
        """Human-readable summary: stages, labels per side, enclave share, bytes crossing."""
        ref = ", ".join(f"{k}={v}" for k, v in sorted(self.shapes.reference.items())) or "static"
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
        others = self.other_nodes()
        if others:
            lines.append(f"unclassified nodes (label 'other'): {len(others)}")
            for node, rule in others.items():
                lines.append(f"  {node}: {rule}")
        else:
            lines.append("unclassified nodes (label 'other'): none")
        return "\n".join(lines)
