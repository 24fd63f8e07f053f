"""Capture: model + example inputs -> ``torch.export.ExportedProgram``.

Reads an ``nn.Module`` (or an ``ExportedProgram``, passed through), writes nothing to the model,
and guarantees a functional inference graph: export runs non-strict under ``no_grad`` and a
program that mutates a buffer is refused with a :class:`CaptureError` naming the buffer.
Hugging Face models get example inputs built from their config, with batch and sequence
length dynamic (``torch.export.Dim``) so one split program serves any prompt length.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import Dim, ExportedProgram

from partitioner.errors import CaptureError
from partitioner.public_base import peft_caveats
from passes.base import model_weights

# Reference sizes at which symbolic shapes are evaluated for byte and FLOP accounting.
DEFAULT_REFERENCE = {"batch": 1, "seq": 128}
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 16  # >1 so export does not specialise the dims to 0/1


@dataclass
class Captured:
    """An exported program plus what the later steps need to name its symbolic dims."""

    program: ExportedProgram
    model_name: str
    # sympy symbol name (``s70``) -> user-facing dim name (``seq``)
    dim_names: dict[str, str] = field(default_factory=dict)
    # token ids RNM passes through unchanged (BOS/EOS/PAD … from the model's config)
    special_token_ids: tuple[int, ...] = ()
    # state input placeholder -> how it is refilled (partitioner.generation.StateSpec)
    state: dict[str, Any] = field(default_factory=dict)
    # the input counting each row's left padding of the state (public: sizes only)
    padding: str | None = None
    # sizes at which bytes and FLOPs are counted, when the caller gives none
    reference: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REFERENCE))
    # why peft's names would not tell what a fine-tune changed (public_base.peft_caveats);
    # None where capture never saw the model (an ExportedProgram given): unknown
    peft_caveats: tuple[str, ...] | None = None


_SPECIAL_CONFIG_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
    "decoder_start_token_id",
)


def special_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """Special token ids a transformers config names (each key may hold an int or a list)."""
    config = getattr(_hf_base(model) or model, "config", None)
    ids: set[int] = set()
    for key in _SPECIAL_CONFIG_KEYS:
        value = getattr(config, key, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int) and item >= 0:
                ids.add(item)
    return tuple(sorted(ids))


def _hf_base(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model behind ``model`` (itself, or the base of a peft wrapper)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, PreTrainedModel) else None


def model_name_of(model: torch.nn.Module) -> str:
    config = getattr(_hf_base(model), "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return name or type(model).__name__


def hf_example_inputs(
    model: torch.nn.Module,
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """Example ``(args, kwargs, dynamic_shapes)`` for a text model, built from its config."""
    base = _hf_base(model)
    if base is None:
        raise CaptureError(
            f"{type(model).__name__} is not a Hugging Face model; pass example_inputs"
        )
    config = base.config
    if getattr(base, "main_input_name", "input_ids") != "input_ids":
        raise CaptureError(
            f"{type(base).__name__} takes {base.main_input_name!r}, not token ids; "
            "pass example_inputs explicitly"
        )
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise CaptureError(f"{type(model).__name__}.config has no vocab_size; pass example_inputs")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_SEQ), generator=gen).to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    max_len = getattr(config, "max_position_embeddings", None) or 4096
    seq = Dim("seq", min=1, max=int(max_len))
    batch = Dim("batch", min=1, max=1024)
    dynamic: dict[str, Any] = {"input_ids": {0: batch, 1: seq}}
    if "use_cache" in inspect.signature(base.forward).parameters:
        kwargs["use_cache"] = False
        dynamic["use_cache"] = None
    return (), kwargs, dynamic


def _flat_specs(spec: Any, name: str) -> list[tuple[str, Any]]:
    """``(placeholder name, per-tensor spec)`` pairs; a list input ``past`` exports as
    placeholders ``past_0``, ``past_1``, …"""
    if isinstance(spec, (list, tuple)):
        return [pair for i, s in enumerate(spec) for pair in _flat_specs(s, f"{name}_{i}")]
    return [(name, spec)]


def _dim_names(ep: ExportedProgram, dynamic_shapes: Any, params: list[str]) -> dict[str, str]:
    """Map the export's shape symbols back to the ``Dim`` names the caller chose."""
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, Mapping):
        top = list(dynamic_shapes.items())
    else:
        top = list(zip(params, dynamic_shapes, strict=False))
    specs = [pair for key, spec in top for pair in _flat_specs(spec, key)]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    names: dict[str, str] = {}
    for input_name, spec in specs:
        node = placeholders.get(input_name)
        if node is None or not isinstance(spec, Mapping):
            continue
        val = node.meta.get("val")
        for dim, dim_spec in spec.items():
            size = val.shape[dim] if isinstance(val, torch.Tensor) else None
            label = getattr(dim_spec, "__name__", None)
            if isinstance(size, torch.SymInt) and label:
                names.setdefault(str(size.node.expr), label)
    return names


def capture(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    model_name: str | None = None,
) -> Captured:
    """Export ``model`` (non-strict, no_grad) into an ``ExportedProgram``.

    ``example_inputs`` is a tuple of positional arguments or a mapping of keyword arguments.
    For Hugging Face text models it may be omitted: token ids are generated and batch/sequence
    made dynamic. Other modules are captured with static shapes unless ``dynamic_shapes``
    (torch.export's format) is given. A transformers decoder given inputs without a past cache
    is exported with ``use_cache=False`` (:func:`_without_cache`).
    """
    if isinstance(model, ExportedProgram):
        _refuse_mutation(model, model_name or "ExportedProgram")
        return Captured(model, model_name or "ExportedProgram")
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
    name = model_name or model_name_of(model)
    caveats = peft_caveats(model)  # before the wrapper goes: it holds peft's configs
    if hasattr(model, "get_base_model") and _hf_base(model) is not None:
        # peft injects its adapter layers into the base model in place; the wrapper's forward
        # only forwards **kwargs, which export cannot give named dynamic dims. Prompt
        # learning (prompt, prefix, p-tuning) adds its virtual tokens in that forward, so the
        # base alone would silently compute without the fine-tune: refused.
        learned = sorted(
            name
            for name, config in (getattr(model, "peft_config", None) or {}).items()
            if getattr(config, "is_prompt_learning", False)
        )
        if learned:
            raise CaptureError(
                f"peft adapter(s) {learned} learn a prompt (prompt/prefix tuning, p-tuning), "
                "which peft's wrapper adds in its forward; the base model it wraps would be "
                "captured without it. Merge-free prompt learning is not supported: use an "
                "adapter that changes the model's layers (LoRA, IA3, ...)"
            )
        model = model.get_base_model()
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if example_inputs is None:
        if _hf_base(model) is None:
            raise CaptureError(f"{name}: example_inputs are required for a non-Hugging Face module")
        args, kwargs, auto_dynamic = hf_example_inputs(model)
        if dynamic_shapes is None:
            dynamic_shapes = auto_dynamic
    elif isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    else:
        raise CaptureError(
            f"{name}: example_inputs must be a tuple or a mapping, "
            f"got {type(example_inputs).__name__}"
        )
    if example_inputs is not None:
        kwargs, dynamic_shapes = _without_cache(model, args, kwargs, dynamic_shapes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(
                model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as exc:  # torch raises many types; all mean "cannot capture"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {name}: {reason}") from exc
    finally:
        model.train(was_training)
    _refuse_mutation(ep, name)
    params = _input_names(model, args, kwargs)
    return Captured(
        ep,
        name,
        _dim_names(ep, dynamic_shapes, params),
        special_token_ids(model),
        peft_caveats=caveats,
    )


def _input_names(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[str]:
    """The names of the inputs given, in ``forward``'s order: torch.export pairs a tuple of
    dynamic shapes with them in that order, not with ``forward``'s leading parameters."""
    sig = inspect.signature(model.forward)
    try:
        return list(sig.bind(*args, **kwargs).arguments)
    except TypeError:  # export accepted the call, so this is a signature inspect cannot read
        return list(sig.parameters)


def _without_cache(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
) -> tuple[dict[str, Any], Any]:
    """The caller's inputs, plus ``use_cache=False`` for a transformers model whose config
    turns its cache on, when the caller passed neither ``use_cache`` nor a past cache.

    Called with token ids alone, such a decoder returns a ``DynamicCache`` next to its logits,
    which torch.export cannot flatten ("DynamicCache in output"), so ``partition(model,
    policy, (ids,))`` failed unless the caller knew to add ``use_cache=False``. Inputs without
    a past ask for one forward pass, which keeps no cache: the same choice
    :func:`hf_example_inputs` makes when no inputs are given (the KV-cache step, with the cache
    as explicit state, is ``partitioner.generation.capture_decoder``). The flag is exported as
    a constant of the call spec, so callers of the split program need not pass it either.
    ``dynamic_shapes`` gets a ``None`` entry for it, in the form the caller used.
    """
    base = _hf_base(model)
    if base is None or not getattr(base.config, "use_cache", False):
        return kwargs, dynamic_shapes
    sig = inspect.signature(model.forward)
    if "use_cache" not in sig.parameters:
        return kwargs, dynamic_shapes
    try:
        given = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:  # a call forward cannot take: let export report it
        return kwargs, dynamic_shapes
    if "use_cache" in given or given.get("past_key_values") is not None:
        return kwargs, dynamic_shapes
    kwargs = {**kwargs, "use_cache": False}
    if isinstance(dynamic_shapes, Mapping):
        dynamic_shapes = {**dynamic_shapes, "use_cache": None}
    elif isinstance(dynamic_shapes, (tuple, list)):
        # a tuple of shapes follows the inputs in forward's order, use_cache among them
        at = list(sig.bind_partial(*args, **kwargs).arguments).index("use_cache")
        dynamic_shapes = type(dynamic_shapes)([*dynamic_shapes[:at], None, *dynamic_shapes[at:]])
    return kwargs, dynamic_shapes


def _refuse_mutation(ep: ExportedProgram, name: str) -> None:
    """Refuse programs that write to a buffer, parameter or input.

    Export's default IR keeps in-place ops (``add_``) instead of functionalising them, so the
    signature's ``buffers_to_mutate`` is not enough: the graph is also searched for mutating
    ops whose written argument is, or is a view of, a placeholder.
    """
    sig = ep.graph_signature
    mutated = sorted(sig.buffers_to_mutate.values()) + sorted(sig.user_inputs_to_mutate.values())
    if mutated:
        raise CaptureError(
            f"{name} mutates {mutated} during forward; teesplit splits pure inference graphs"
        )
    owners = model_weights(ep)
    roots: dict[torch.fx.Node, str] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            roots[node] = owners.get(node.name, node.name)
            continue
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for arg, value in zip(schema.arguments, node.args, strict=False):
            written = arg.alias_info is not None and arg.alias_info.is_write
            if isinstance(value, torch.fx.Node) and value in roots:
                if written:
                    raise CaptureError(
                        f"{name} mutates {[roots[value]]} in place at node {node.name} "
                        f"({node.target}); teesplit splits pure inference graphs"
                    )
                if arg.alias_info is not None:  # a view of a placeholder stays one
                    roots[node] = roots[value]
