"""Generation with a KV cache through a split program.

A split program is a pure function, so the cache is explicit: :class:`DecoderStep` wraps a
transformers causal LM as ``step(input_ids, padding, past) -> (logits, *present)`` where
``past`` holds one key and one value tensor per layer (``[batch, kv_heads, past, head_dim]``,
``past`` dynamic and allowed to be 0), ``present`` the keys and values of the ``seq`` new
positions only, and ``padding`` (``[batch, 1]`` int64) how many of each row's first cache
positions are padding: rows of different lengths then share one call, left-padded (a GPU
worker batching the sessions it serves, ``runtime.batching``). A caller with one sequence per
row passes zeros. Padding counts are sizes, which no scheme here hides: the input is public.

One exported program then serves the prefill (``past = 0``) and every decode step, and the
caller appends ``present`` to ``past`` between calls. When a GPU stage holds the cache
(``StateSpec.holder``), a caller may instead pass stand-ins of ``past``'s shape
(``runtime.state.stand_in``), as ``generate`` does: over a worker, ``present`` comes back as a
stand-in and appending it is refused.

:func:`capture_decoder` exports the step and declares each ``past_i`` as *state* of the output
that refills it (:class:`StateSpec`); the taint analysis uses that pairing (a cache carries the
taint of what produced it) and the plan records it so that a loaded program can generate
without the model's code. Decoding itself (``generate``) runs on the enclave side:
:mod:`enclave_runtime.generation`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim

from partitioner.capturing import Captured, capture, model_name_of, special_token_ids
from partitioner.errors import CaptureError
from partitioner.plan import StateSpec

# plans count bytes and FLOPs for one generated token at a 128-token context
DECODE_REFERENCE = {"batch": 1, "seq": 1, "past": 128}
_EXAMPLE = {"batch": 2, "seq": 16, "past": 16}  # > 1 so export keeps every dim symbolic


class DecoderStep(torch.nn.Module):
    """``(input_ids, padding, past) -> (logits of the last position, *present keys and
    values)``.

    Logits are computed for the last position only, as ``generate`` does
    (``logits_to_keep=1``): the prefill's other rows are never read and would cost a
    ``seq × vocab`` product and its bytes across the cut. Row ``b``'s first ``padding[b]``
    cache positions are masked out of attention and not counted in its positions, so a row
    left-padded by ``n`` with ``padding = n`` computes what it computes alone.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = int(model.config.num_hidden_layers)

    def forward(
        self, input_ids: torch.Tensor, padding: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[Any, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            _seed(cache, layer, past[2 * layer], past[2 * layer + 1])
        seq = input_ids.shape[1]
        known = past[0].shape[2]
        device = input_ids.device
        # two aranges, not one sliced: the positions feed the rotary tables (which a policy may
        # keep in the enclave), the mask feeds attention; sharing a node would tie them
        mask = torch.arange(known + seq, device=device)[None, :] >= padding
        positions = torch.arange(known, known + seq, device=device)[None, :] - padding
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask.to(torch.long),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys[:, :, -seq:], layer.values[:, :, -seq:]]
        return (out.logits, *present)


def _seed(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Start ``layer`` of ``cache`` at the given keys and values. ``update`` would append
    them to an empty tensor: a copy of the whole cache in every step's graph (5.9 MB for a
    SmolLM2 decode step at context 128); the layer holds them as they are instead."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    held = layers[layer] if layers is not None and layer < len(layers) else None
    if type(held) is not DynamicLayer:  # a sliding window, or a class this does not know
        cache.update(keys, values, layer)
        return
    held.lazy_initialization(keys, values)
    held.keys, held.values = keys, values


def cache_shape(model: torch.nn.Module) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a transformers decoder's cache."""
    config = model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, int(head_dim)


def capture_decoder(model: torch.nn.Module, *, model_name: str | None = None) -> Captured:
    """Export ``model``'s KV-cache step (see :class:`DecoderStep`) with batch, seq and past
    dynamic, and declare the cache inputs as state."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not getattr(config, "num_hidden_layers", None):
        raise CaptureError(
            f"{type(model).__name__} is not a transformers decoder (no config.num_hidden_layers)"
        )
    # a new module is in training mode; capture restores that mode recursively afterwards,
    # which would leave the caller's model in training mode (dropout on)
    step = DecoderStep(base).train(base.training)
    heads, head_dim = cache_shape(base)
    param = next(iter(base.parameters()))
    gen = torch.Generator().manual_seed(0)
    b, s, p = _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"]
    ids = torch.randint(0, int(config.vocab_size), (b, s), generator=gen).to(param.device)
    padding = torch.zeros(b, 1, dtype=torch.long, device=param.device)
    past = [
        torch.zeros(b, heads, p, head_dim, dtype=param.dtype, device=param.device)
        for _ in range(2 * step.layers)
    ]
    max_len = int(getattr(config, "max_position_embeddings", None) or 4096)
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max_len)
    past_len = Dim("past", min=0, max=max_len)
    dynamic = ({0: batch, 1: seq}, {0: batch}, [{0: batch, 2: past_len} for _ in past])
    captured = capture(
        step,
        (ids, padding, past),
        dynamic_shapes=dynamic,
        model_name=model_name or model_name_of(base),
    )
    captured.special_token_ids = special_token_ids(base)
    dtype = str(param.dtype).removeprefix("torch.")
    captured.reference = dict(DECODE_REFERENCE)
    captured.state = {f"past_{i}": StateSpec(1 + i, 2, dtype) for i in range(len(past))}
    captured.padding = "padding"
    return captured
