"""The audit: proves from the split program itself that no secret reaches the GPU in the clear.

Reads a protected :class:`~partitioner.program.SplitProgram` (its source graph, stages, edges and
protection record); writes nothing; raises :class:`AuditError` listing every violation. It does
not trust the protection pass's own edge labels: taint is recomputed from the source graph, and
each claimed mask, unmask and RNM is looked up as an op in the stage graphs. It checks that

1. no GPU stage holds a protected parameter (by name, by tensor storage, and by value: an
   equal or affine copy, such as a quantised weight, whole or some of its rows or columns:
   ``passes.copies``); under a public base, the parameters
   tagged ``public`` (bit-identical to the base's) are not protected;
2. every enclave -> GPU edge whose value depends on the request or on protected weights is
   either masked (a ``teesplit::mask``/``ring_mask`` op produces what crosses) or depends on the
   token input only through RNM (a ``teesplit::rnm`` op in an enclave stage); other edges must
   be public (depend on no secret);
3. every masked value on the GPU that comes back is unmasked: the consuming enclave stage has a
   ``teesplit::unmask``/``ring_unmask`` on that input and a correction produces its delta;
4. every GPU stage that receives a masked input has a correction;
5. under ``integrity="freivalds"``, every GPU stage's results are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.errors import AuditError
from partitioner.ops import OPS
from partitioner.plan import ENCLAVE, GPU, INPUT, OUTPUT, Edge, Protection, Stage
from partitioner.policy import Policy
from passes.base import is_public, model_weights, weight_value
from passes.copies import copies_on_gpu, unexplained_on_gpu
from passes.taint import DP_TAINT, taint_of


class SplitProgram(Protocol):
    """What the audit reads of a split program (the compiler's ``SplitProgram`` has it)."""

    model_name: str
    policy: Policy
    protection: Protection | None
    source: ExportedProgram
    stages: list[Stage]
    edges: list[Edge]


_MASK_OPS = {OPS.mask.default, OPS.ring_mask.default, OPS.ring_mask_rows.default}
_UNMASK_OPS = {OPS.unmask.default, OPS.ring_unmask.default, OPS.ring_unmask_rows.default}


@dataclass
class AuditRow:
    edge: str
    producer: str
    consumer: str
    direction: str
    secrets: str
    protection: str
    verdict: str


@dataclass
class AuditReport:
    program: str
    rows: list[AuditRow]
    violations: list[str]

    def __str__(self) -> str:
        head = ("edge", "from", "to", "direction", "depends on", "protection", "verdict")
        table = [head] + [
            (r.edge, r.producer, r.consumer, r.direction, r.secrets, r.protection, r.verdict)
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [
            f"audit of {self.program}: {len(self.rows)} cut edges, "
            f"{len(self.violations)} violations"
        ]
        for i, row in enumerate(table):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines += [f"VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


def _output_producer(stage: object, value: str) -> torch.fx.Node | None:
    """The node a stage returns for one of its masked outputs."""
    module = stage.module
    out = next(iter(module.graph.find_nodes(op="output")))
    index = len(stage.outputs) + stage.masked_outputs.index(value)
    node = out.args[0][index]
    return node if isinstance(node, torch.fx.Node) else None


def _unmasks(stage: object, value: str) -> bool:
    phs = list(stage.module.graph.find_nodes(op="placeholder"))
    ph = phs[stage.inputs.index(value)]
    return bool(ph.users) and all(u.target in _UNMASK_OPS for u in ph.users)


def _masked_on_gpu(program: SplitProgram) -> set[str]:
    """GPU values that depend on a masked value, by data flow through the stage graphs."""
    masked: set[str] = set()
    for stage in program.stages:
        if stage.side == ENCLAVE:
            masked |= {
                v
                for v in stage.masked_outputs
                if (n := _output_producer(stage, v)) is not None and n.target in _MASK_OPS
            }
            continue
        phs = list(stage.module.graph.find_nodes(op="placeholder"))
        tainted = {ph.name for ph, v in zip(phs, stage.inputs, strict=False) if v in masked}
        for node in stage.module.graph.nodes:
            if node.op == "call_function" and any(a.name in tainted for a in node.all_input_nodes):
                if isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)):
                    tainted.add(node.name)
        out = next(iter(stage.module.graph.find_nodes(op="output")))
        for value, node in zip(stage.outputs, out.args[0], strict=True):
            if isinstance(node, torch.fx.Node) and node.name in tainted:
                masked.add(value)
    return masked - {v for s in program.stages if s.side == ENCLAVE for v in s.masked_outputs}


def _stage_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen = dict(module.named_parameters())
    seen.update(module.named_buffers())
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.find_nodes(op="get_attr"):
            value = getattr(module, node.target, None)
            if isinstance(value, torch.Tensor):
                seen.setdefault(node.target, value)
    return [(k, v) for k, v in seen.items() if v.device.type != "meta" and v.numel() > 1]


def audit(program: SplitProgram, *, verbose: bool = True) -> AuditReport:
    """Check ``program``; print the edge table when ``verbose``; raise :class:`AuditError`."""
    policy = program.policy
    prot = program.protection
    source = program.source
    violations: list[str] = []
    site = prot.rnm if prot is not None else None
    taint = taint_of(source, policy, site.token_input if site else None)
    if site is not None:
        taint[site.sanitised] = taint[site.token_input]
    stages = {s.name: s for s in program.stages}
    side = {name: s.side for name, s in stages.items()}
    side[INPUT] = side[OUTPUT] = ENCLAVE

    # 1. protected weights
    if "model" in policy.protects:
        public = {n.name for n in source.graph.find_nodes(op="placeholder") if is_public(n)}
        protected = [fqn for name, fqn in model_weights(source).items() if name not in public]
        by_fqn = {fqn: weight_value(source, fqn) for fqn in model_weights(source).values()}
        secret = {f: by_fqn[f] for f in protected if by_fqn[f] is not None}
        public_values = [(f, v) for f, v in by_fqn.items() if f not in secret and v is not None]
        gpu_tensors = [(s.name, _stage_tensors(s.module)) for s in program.stages if s.side == GPU]
        violations += copies_on_gpu(gpu_tensors, list(secret.items()), public_values)
        if policy.public_base is not None:
            violations += unexplained_on_gpu(gpu_tensors, public_values)
        storages = {
            t.untyped_storage().data_ptr() for t in secret.values() if t.device.type != "meta"
        }
        for stage in program.stages:
            if stage.side != GPU:
                continue
            held = sorted(set(stage.params) & set(protected))
            if held:
                violations.append(f"GPU stage {stage.name} holds protected parameters {held[:3]}")
            for name, tensor in list(stage.module.named_parameters()) + list(
                stage.module.named_buffers()
            ):
                if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() in storages:
                    violations.append(
                        f"GPU stage {stage.name} attribute {name} shares storage with a "
                        "protected parameter"
                    )
            for node in stage.module.graph.find_nodes(op="get_attr"):
                tensor = getattr(stage.module, node.target, None)
                if (
                    isinstance(tensor, torch.Tensor)
                    and tensor.device.type != "meta"
                    and tensor.untyped_storage().data_ptr() in storages
                ):
                    violations.append(
                        f"GPU stage {stage.name} reads {node.target}, a protected parameter"
                    )

    # 2-3. edges
    rows: list[AuditRow] = []
    rnm_ok = site is not None and any(
        n.target is OPS.rnm.default for n in stages[site.stage].module.graph.nodes
    )
    gpu_masked = _masked_on_gpu(program)
    if prot is not None and gpu_masked != prot.gpu_masked:
        violations.append(
            "the protection record's masked GPU values differ from the data flow: "
            f"{sorted(gpu_masked ^ prot.gpu_masked)[:5]}"
        )
    corrected = {v for c in prot.corrections.values() for v in c.delta_outputs} if prot else set()
    for edge in program.edges:
        if not edge.crossing and not (edge.consumer == OUTPUT and side[edge.producer] == GPU):
            continue
        secrets = taint.get(edge.name, frozenset())
        verdict = "ok"
        if edge.direction == "enclave->gpu":
            masked_here = (
                edge.producer in stages
                and edge.name in stages[edge.producer].masked_outputs
                and (node := _output_producer(stages[edge.producer], edge.name)) is not None
                and node.target in _MASK_OPS
            )
            if secrets - {DP_TAINT}:
                if not masked_here:
                    verdict = "LEAK"
                    violations.append(
                        f"edge {edge.name} ({edge.producer} -> {edge.consumer}) carries "
                        f"{'/'.join(sorted(secrets))} data to the GPU without a mask"
                    )
            elif secrets == {DP_TAINT} and not (masked_here or rnm_ok):
                verdict = "LEAK"
                violations.append(
                    f"edge {edge.name} ({edge.producer} -> {edge.consumer}) depends on the "
                    "token input but no RNM op sanitises it in the enclave"
                )
        else:  # GPU -> enclave or the program output
            if edge.name in gpu_masked:
                consumer = stages.get(edge.consumer)
                unmasked = (
                    consumer is not None
                    and ("delta", edge.name) in consumer.extra_inputs
                    and _unmasks(consumer, edge.name)
                ) or edge.consumer == OUTPUT
                if not unmasked or edge.name not in corrected:
                    verdict = "NO UNMASK"
                    violations.append(
                        f"edge {edge.name} ({edge.producer} -> {edge.consumer}) carries a "
                        "masked value that is never unmasked"
                    )
        rows.append(
            AuditRow(
                edge.name,
                edge.producer,
                edge.consumer,
                edge.direction,
                ",".join(sorted(secrets)) or "-",
                edge.protection,
                verdict,
            )
        )

    # 4. corrections for every masked GPU input
    if prot is not None:
        masked_values = set(prot.masked) | gpu_masked
        for stage in program.stages:
            if stage.side == GPU and set(stage.inputs) & masked_values:
                if stage.name not in prot.corrections:
                    violations.append(
                        f"GPU stage {stage.name} gets masked inputs but no correction"
                    )

    # 5. integrity: every GPU stage is checked when the policy asks for it
    if policy.integrity == "freivalds":
        checked = prot.freivalds if prot is not None else {}
        for stage in program.stages:
            if stage.side == GPU and stage.name not in checked:
                violations.append(f"GPU stage {stage.name} has no Freivalds check")

    report = AuditReport(f"{program.model_name} under {policy.name!r}", rows, violations)
    if verbose:
        print(report)
    if violations:
        raise AuditError(
            f"audit of {report.program} failed with {len(violations)} violations: "
            + "; ".join(violations[:5])
        )
    return report
