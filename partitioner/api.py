"""``partition(model, policy)``: the pipeline of ``docs/design.md``, one named step after another.

Also the compiler's public entry points: ``partition``, ``audit`` and ``load`` (a saved bundle,
ready to run in this process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind

from enclave_runtime.executor import Executor
from partitioner.bundle import load_program
from partitioner.capturing import Captured, capture
from partitioner.errors import PartitionError, PolicyError
from partitioner.label_set import Label
from partitioner.placement import Placement, place
from partitioner.plan import ENCLAVE, GPU, INPUT, Plan, Signature, StateSpec
from partitioner.policy import Policy
from partitioner.program import SplitProgram
from partitioner.public_base import base_files, split_parameters
from partitioner.rnm_tables import TokenPrior
from partitioner.shapes import ShapeContext, node_flops
from partitioner.split import build_stages, validate
from passes.attention import decompose_attention
from passes.audit import audit
from passes.base import model_weights, teesplit_meta
from passes.gqa import share_kv_heads
from passes.graph_edit import rewritten
from passes.labels import label_program, user_input_names
from passes.protect import protect
from passes.rnm import token_input_of

__all__ = ["audit", "load", "partition"]


def needs_attention_decomposition(policy: Policy) -> bool:
    """SDPA hides a softmax: split it when softmax must stay in the enclave but QKᵀ may leave."""
    return (
        policy.pinned_side(Label.NONLINEAR) == ENCLAVE
        and policy.pinned_side(Label.ATTENTION) != ENCLAVE
    )


def _untagged(graph: torch.fx.Graph, value_map: Any) -> None:
    """Drop every teesplit tag: only this partition's passes may set them."""
    for node in graph.nodes:
        node.meta.pop("teesplit", None)


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


def _tag_padding(program: ExportedProgram, padding: str | None) -> None:
    """Tag the padding input public: it counts padded positions, and sizes are not hidden."""
    if padding is None:
        return
    node = next(iter(program.graph.find_nodes(op="placeholder", target=padding)), None)
    if node is None or padding not in user_input_names(program):
        raise PartitionError(f"padding input {padding!r}: no such user input")
    teesplit_meta(node)["public"] = True


def _tag_public(program: ExportedProgram, public: Mapping[str, int]) -> None:
    """Tag the placeholders of public weights (bit-identical to the policy's public base):
    placement and taint read the tag, so only the others count as protected."""
    params = model_weights(program)
    for node in program.graph.find_nodes(op="placeholder"):
        if params.get(node.name) in public:
            teesplit_meta(node)["public"] = True


def partition(
    model: torch.nn.Module | ExportedProgram | Captured,
    policy: Policy | str | Path = "secureinfer",
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    model_name: str | None = None,
    reference_dims: Mapping[str, int] | None = None,
    special_token_ids: tuple[int, ...] | None = None,
    token_prior: TokenPrior | None = None,
    public_tokens: Mapping[str, Collection[int]] | None = None,
    seed: int | None = None,
) -> SplitProgram:
    """Capture, label, place and split ``model`` under ``policy``.

    ``policy`` is a :class:`Policy`, a preset name (``cmif``, ``secureinfer``, ``slalom``,
    ``private_finetune``, ``all_enclave``, ``all_gpu``) or a YAML/JSON policy file.
    ``example_inputs`` may be omitted for Hugging Face text models. ``reference_dims`` sets the
    sizes at which bytes and FLOPs are counted (default batch=1, seq=128; for a decoder step
    batch=1, seq=1, past=128: one generated token at a 128-token context).
    ``special_token_ids`` are the tokens RNM passes through (default: those the model's
    config names). ``token_prior`` (:mod:`partitioner.token_prior` makes one from a
    tokenizer; ``teesplit partition`` does by default) builds RNM's groups as frequency
    strata, so that a group does not give its most frequent word away; without one the groups
    are cosine clusters only and the plan and the report say so. ``public_tokens`` maps each
    token class the policy's ``rnm.public`` names to its ids
    (:func:`partitioner.token_classes.public_tokens` makes it from a tokenizer): those
    tokens pass RNM unchanged and spend no ε. ``seed`` makes masks and noise reproducible and
    is for tests only: by default the pool keys its CSPRNG from the OS.

    Protection is inserted and the audit run on every call; a split that the audit rejects
    raises :class:`AuditError`.
    """
    policy = Policy.resolve(policy)
    if policy.public_base not in (None, "peft"):
        base_files(policy.public_base)  # a wrong path named before the (long) capture
    captured = (
        model
        if isinstance(model, Captured)
        else capture(model, example_inputs, dynamic_shapes=dynamic_shapes, model_name=model_name)
    )
    if policy.public_base == "peft" and captured.peft_caveats != ():
        why = (
            captured.peft_caveats[0]
            if captured.peft_caveats
            else "it needs the peft model itself, whose configs and merged layers an exported "
            "program does not show"
        )
        raise PolicyError(
            f"public_base='peft' cannot tell what the fine-tune changed: {why}; name the "
            "base's folder or .safetensors file, which is compared by value"
        )
    if needs_attention_decomposition(policy):
        program = decompose_attention(captured.program)
    else:  # SDPA stays one op: it can read grouped KV heads without repeating them
        program = share_kv_heads(captured.program)
    # a private copy, untagged: the labels and placement tags below go into node metadata, a
    # capture is often partitioned again (the demo's two bundles), and a tag given in (public,
    # from an earlier partition of the same program) would unprotect what this policy protects.
    # An attention rewrite made the copy already (it reads no tag); else it is made here.
    if program is captured.program:
        program = rewritten(program, _untagged)
    else:
        _untagged(program.graph, {})
    label_program(program)
    _tag_state(program, captured.state)
    _tag_padding(program, captured.padding)
    parameters = split_parameters(program, policy.public_base)
    if parameters is not None:
        _tag_public(program, parameters.public)
    shapes = ShapeContext(program, captured.dim_names, reference_dims or captured.reference)
    special = captured.special_token_ids if special_token_ids is None else special_token_ids
    prior = token_prior
    public = _public_classes(policy, special, public_tokens, _vocab_rows(program))
    kept = tuple(sorted(set(special).union(*public.values())))
    tokens = (kept, prior, {name: len(ids) for name, ids in public.items()})
    placement, result = _place_and_protect(program, policy, shapes, tokens, held=())
    holders = _holders(program, captured.state, result, settled=False)
    if holders:  # again, with the states the GPU may keep produced there
        held_placement, held_result = _place_and_protect(
            program, policy, shapes, tokens, held=holders
        )
        if _holders(program, captured.state, held_result, settled=True) == holders:
            placement, result = held_placement, held_result
        else:
            holders = {}
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
    users = set(user_input_names(program))
    spec = Plan(
        model=model_name or captured.model_name,
        policy=policy,
        reference_dims=dict(shapes.reference),
        stages=result.stages,
        edges=result.edges,
        flat_outputs=result.flat_outputs,
        input_dims={
            n.name: shapes.shape(n.meta["val"])
            for n in program.graph.nodes
            if n.name in users and isinstance(n.meta.get("val"), torch.Tensor)
        },
        signature=_signature(program),
        state={
            name: dataclasses.replace(spec, holder=holders.get(name))
            for name, spec in captured.state.items()
        },
        protection=result.protection,
        other_nodes={n: rules[n] for n, label in sorted(labels.items()) if label == Label.OTHER},
        dim_ranges={
            name: [low, shapes.upper.get(name)] for name, low in sorted(shapes.lower.items())
        },
        **_token_limits(program),
        padding=captured.padding,
    )
    split = SplitProgram(
        spec=spec,
        source=program,
        shapes=shapes,
        placement=placement,
        labels=labels,
        label_rules=rules,
        flops=flops,
        param_bytes={fqn: t.numel() * t.element_size() for fqn, t in program.state_dict.items()},
        taint=result.taint,
        seed=seed,
        parameters=parameters,
    )
    audit(split, verbose=False)
    return split


def _vocab_rows(program: ExportedProgram) -> int | None:
    """The rows of the embedding RNM sanitises for (None when no lookup reads user tokens)."""
    found = token_input_of(program)
    weight = program.state_dict.get(found[1]) if found is not None else None
    return int(weight.shape[0]) if weight is not None else None


def _public_classes(
    policy: Policy,
    special: tuple[int, ...],
    given: Mapping[str, Collection[int]] | None,
    vocab: int | None,
) -> dict[str, set[int]]:
    """The ids of each class ``rnm.public`` names, keyed as the plan records it (a file by
    its name only: the deployer's paths stay out of the plan's report and the responses);
    ``special`` is the model's own."""
    names = policy.rnm.public if policy.rnm is not None else ()
    given = dict(given or {})
    missing = [n for n in names if n != "special" and n not in given]
    if missing:
        raise PolicyError(
            f"rnm.public names {missing}, but partition() got no ids for them: pass "
            "public_tokens= (partitioner.token_classes.public_tokens(tokenizer, classes))"
        )
    unasked = sorted(set(given) - set(names))
    if unasked:
        raise PolicyError(f"public_tokens has classes {unasked} that rnm.public does not name")
    out = {}
    for name in names:
        ids = set(given.get(name, special))
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise PolicyError(f"public_tokens[{name!r}]: {i!r} is not a token id")
            if name != "special" and vocab is not None and i >= vocab:
                raise PolicyError(
                    f"public_tokens[{name!r}]: token id {i} is outside the vocabulary of {vocab}"
                )
        out[f"file:{Path(name).name}" if name.endswith(".txt") else name] = ids
    return out


def _place_and_protect(
    program: ExportedProgram,
    policy: Policy,
    shapes: ShapeContext,
    tokens: tuple[tuple[int, ...], TokenPrior | None, dict[str, int]],
    held: Collection[str],
) -> tuple[Placement, Any]:
    """Place, split and protect; ops protection cannot mask on the GPU go back to the
    enclave (``on_unmaskable="enclave"``) and the program is placed again."""
    force: dict[str, str] = {}
    while True:
        placement = place(program, policy, shapes, force, held)
        stages, edges, flat_outputs = build_stages(program, placement, shapes)
        validate(program, placement, stages, edges)
        result = protect(program, policy, shapes, stages, edges, flat_outputs, *tokens)
        if not result.move_to_enclave:
            return placement, result
        fresh = {n: why for n, why in result.move_to_enclave.items() if n not in force}
        if not fresh:  # cannot happen unless a pinned op is refused twice; never loop
            raise PartitionError(
                f"on_unmaskable='enclave' could not place {sorted(result.move_to_enclave)[:5]}"
            )
        force.update(fresh)


def _holders(
    program: ExportedProgram, state: Mapping[str, StateSpec], result: Any, *, settled: bool
) -> dict[str, str]:
    """The states a GPU stage may keep (``StateSpec.holder``): those whose refill a GPU stage
    computes unmasked, so that keeping it shows the GPU nothing it has not computed, and does
    not check (a Freivalds check reads the stage's inputs in the enclave).

    ``settled``: the placement already counted these states as held; each must then go, as a
    value, to its holder alone (the enclave may read its shape: positions), else none is held.
    """
    sides = {s.name: s.side for s in result.stages}
    prot = result.protection
    masked = prot.gpu_masked if prot is not None else set()
    checked = set(prot.freivalds) if prot is not None else set()  # checks read every input
    users = {n.name: n.users for n in program.graph.find_nodes(op="placeholder")}
    out: dict[str, str] = {}
    for name, spec in state.items():
        refill = result.flat_outputs[spec.output]
        stage = next((s for s in result.stages if refill in s.outputs), None)
        if stage is None or stage.side != GPU or refill in masked or stage.name in checked:
            continue
        readers = {
            e.consumer
            for e in result.edges
            if e.name == name and e.producer == INPUT and sides.get(e.consumer) == GPU
        }
        if settled:
            placed = {u.name for u in users.get(name, ()) if u.op == "call_function"}
            stray = placed - set(stage.nodes) - _shape_only(users.get(name, ()))
            if readers != {stage.name} or stray:
                return {}
        elif readers - {stage.name}:
            continue
        out[name] = stage.name
    return out


def _shape_only(users: Collection[torch.fx.Node]) -> set[str]:
    """Users that read a tensor's sizes, not its values (``sym_size``, ``_assert_*``)."""
    return {
        u.name
        for u in users
        if u.op == "call_function" and not isinstance(u.meta.get("val"), torch.Tensor)
    }


def _token_limits(program: ExportedProgram) -> dict[str, Any]:
    """The token input and the vocabulary its embedding has (none for a model without one)."""
    found = token_input_of(program)
    if found is None:
        return {}
    token, fqn = found
    weight = program.state_dict.get(fqn)
    return {"token_input": token, "vocab": int(weight.shape[0]) if weight is not None else None}


def _signature(program: ExportedProgram) -> Signature:
    """The exported program's call signature as plan data."""
    inputs: list[tuple[str | None, Any]] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if isinstance(spec.arg, ConstantArgument):
            inputs.append((None, spec.arg.value))
        else:
            inputs.append((spec.arg.name, None))
    return Signature(
        pytree.treespec_dumps(program.call_spec.in_spec),
        pytree.treespec_dumps(program.call_spec.out_spec),
        inputs,
    )


def load(
    directory: str | Path,
    *,
    trusted_key: Any = None,
    allow_unsigned: bool = False,
    seed: int | None = None,
    enclave_key: Any = None,
) -> Executor:
    """A saved split program, verified and ready to run in this process (both sides).

    ``trusted_key`` verifies the bundle's signature (see ``partitioner.bundle.load_program``;
    an unsigned bundle needs ``allow_unsigned=True``). ``seed`` fixes its mask pool's CSPRNG
    (tests only); ``enclave_key`` unseals the enclave's weights (default: the key file named
    by ``$TEESPLIT_ENCLAVE_KEY``). The enclave driver loads the enclave side alone and serves
    the GPU stages from a worker (``enclave_runtime.driver.connect``).
    """
    plan = load_program(
        directory, trusted_key=trusted_key, allow_unsigned=allow_unsigned, enclave_key=enclave_key
    )
    return Executor(plan, seed=seed)
