"""``partition(model, policy)``: the pipeline of DESIGN.md, one named step after another."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from partitioner.capturing import Captured, capture
from partitioner.errors import PartitionError
from partitioner.placement import ENCLAVE, place
from partitioner.policy import Policy
from partitioner.program import SplitProgram, _Signature
from partitioner.shapes import ShapeContext, node_flops
from partitioner.split import build_stages, validate
from passes.attention import decompose_attention
from passes.audit import audit
from passes.label_set import Label
from passes.labels import label_program, user_input_names
from passes.pool import MaskPool
from passes.protect import MoveToEnclave, protect
from passes.randomness import CSPRNG


def needs_attention_decomposition(policy: Policy) -> bool:
    """SDPA hides a softmax: split it when softmax must stay in the enclave but QKᵀ may leave."""
    return (
        policy.pinned_side(Label.NONLINEAR) == ENCLAVE
        and policy.pinned_side(Label.ATTENTION) != ENCLAVE
    )


def _tag_state(program: ExportedProgram, state: Mapping[str, Any]) -> None:
    """Tag each state placeholder with the output value that refills it (for taint)."""
    if not state:
        return
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    outputs = list(next(iter(program.graph.find_nodes(op="output"))).args[0])
    for name, spec in state.items():
        node = placeholders.get(name)
        value = outputs[spec.output] if 0 <= spec.output < len(outputs) else None
        if node is None or not isinstance(value, torch.fx.Node):
            raise PartitionError(
                f"state input {name!r} -> output {spec.output}: no such input or tensor output"
            )
        node.meta.setdefault("teesplit", {})["state_of"] = value.name


def partition(
    model: torch.nn.Module | ExportedProgram | Captured,
    policy: Policy | str | Path = "secureinfer",
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    model_name: str | None = None,
    reference_dims: Mapping[str, int] | None = None,
    special_token_ids: tuple[int, ...] | None = None,
    seed: int | None = None,
) -> SplitProgram:
    """Capture, label, place and split ``model`` under ``policy``.

    ``policy`` is a :class:`Policy`, a preset name (``cmif``, ``secureinfer``, ``slalom``,
    ``all_enclave``, ``all_gpu``) or a YAML/JSON policy file. ``example_inputs`` may be
    omitted for Hugging Face text models. ``reference_dims`` sets the sizes at which bytes and
    FLOPs are counted (default batch=1, seq=128; for a decoder step
    batch=1, seq=1, past=128: one generated token at a 128-token context).
    ``special_token_ids`` are the tokens RNM passes through (default: those the model's
    config names). ``seed`` makes masks and noise reproducible and is for tests only: by
    default the pool keys its CSPRNG from the OS.

    Protection is inserted and the audit run on every call; a split that the audit rejects
    raises :class:`AuditError`.
    """
    policy = Policy.resolve(policy)
    captured = (
        model
        if isinstance(model, Captured)
        else capture(model, example_inputs, dynamic_shapes=dynamic_shapes, model_name=model_name)
    )
    program = captured.program
    if needs_attention_decomposition(policy):
        program = decompose_attention(program)
    label_program(program)
    _tag_state(program, captured.state)
    shapes = ShapeContext(program, captured.dim_names, reference_dims or captured.reference)
    special = captured.special_token_ids if special_token_ids is None else special_token_ids
    force: dict[str, str] = {}
    while True:
        placement = place(program, policy, shapes, force)
        stages, edges, flat_outputs = build_stages(program, placement, shapes)
        validate(program, placement, stages, edges)
        try:
            stages, edges, protection = protect(
                program, policy, shapes, stages, edges, flat_outputs, special
            )
        except MoveToEnclave as move:
            fresh = {n: why for n, why in move.nodes.items() if n not in force}
            if not fresh:  # cannot happen unless a pinned op is refused twice; never loop
                raise PartitionError(
                    f"on_unmaskable='enclave' could not place {sorted(move.nodes)[:5]}"
                ) from None
            force.update(fresh)
            continue
        break
    labels = {}
    rules = {}
    flops = {}
    for node in program.graph.nodes:
        meta = node.meta.get("teesplit")
        if meta and "label" in meta:
            labels[node.name] = meta["label"]
            rules[node.name] = meta["label_rule"]
            if node.name in placement.sides:
                flops[node.name] = node_flops(node, shapes)
    param_bytes = {fqn: t.numel() * t.element_size() for fqn, t in program.state_dict.items()}
    users = set(user_input_names(program))
    split = SplitProgram(
        model_name=model_name or captured.model_name,
        policy=policy,
        stages=stages,
        edges=edges,
        flat_outputs=flat_outputs,
        signature=_Signature.of(program),
        shapes=shapes,
        placement=placement,
        labels=labels,
        label_rules=rules,
        flops=flops,
        param_bytes=param_bytes,
        input_dims={
            n.name: shapes.shape(n.meta["val"])
            for n in program.graph.nodes
            if n.name in users and isinstance(n.meta.get("val"), torch.Tensor)
        },
        protection=protection,
        pool=MaskPool(protection, CSPRNG(seed)) if protection.needs_pool else None,
        source=program,
        state=dict(captured.state),
    )
    audit(split, verbose=False)
    return split
