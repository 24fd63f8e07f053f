"""``SplitProgram``: ordered stages, the edges between them, and an in-process executor.

Calling a SplitProgram runs every stage in order in this process (the reference executor the
runtime is checked against) and returns what the model returns. ``report()`` and ``plan()``
describe the split; ``plan()`` is canonical JSON-ready data (sorted, no addresses, no
timestamps) so golden files can compare it exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind

from partitioner.placement import ENCLAVE, GPU, Placement
from partitioner.policy import Policy
from partitioner.shapes import ShapeContext
from partitioner.split import Edge, Stage
from passes.label_set import Label

PLAN_SCHEMA_VERSION = 1


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
        args_spec, kwargs_spec = self.in_spec.children_specs
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
    n_positional = signature.in_spec.children_specs[0].num_children
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
    shapes: ShapeContext
    placement: Placement
    labels: dict[str, Label] = field(default_factory=dict)
    label_rules: dict[str, str] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    param_bytes: dict[str, int] = field(default_factory=dict)

    # -- execution ---------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        env = self.signature.bind(args, dict(kwargs))
        for stage in self.stages:
            outs = stage.module(*(env[name] for name in stage.inputs))
            env.update(zip(stage.outputs, outs, strict=True))
        flat = [env[v] if isinstance(v, str) else v for v in self.flat_outputs]
        return pytree.tree_unflatten(flat, self.signature.out_spec)

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
        }

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
