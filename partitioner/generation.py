"""Generation with a KV cache through a split program.

A split program is a pure function, so the cache is explicit: :class:`DecoderStep` wraps a
transformers causal LM as ``step(input_ids, past) -> (logits, *present)`` where ``past`` holds
one key and one value tensor per layer (``[batch, kv_heads, past, head_dim]``, ``past``
dynamic and allowed to be 0) and ``present`` the keys and values of the ``seq`` new positions
only. One exported program then serves the prefill (``past = 0``) and every decode step, and the
caller appends ``present`` to ``past`` between calls.

:func:`capture_decoder` exports the step and declares each ``past_i`` as *state* of the output
that refills it (:class:`StateSpec`); the taint analysis uses that pairing (a cache carries the
taint of what produced it) and the plan records it so that a loaded program can generate
without the model's code. :func:`generate` is greedy decoding over any split program that has
state: in-process, loaded from artifacts, or with its GPU stages on a worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.export import Dim

from partitioner.capturing import Captured, capture, model_name_of, special_token_ids
from partitioner.errors import CaptureError, PartitionError

# plans count bytes and FLOPs for one generated token at a 128-token context
DECODE_REFERENCE = {"batch": 1, "seq": 1, "past": 128}
_EXAMPLE = {"batch": 2, "seq": 16, "past": 16}  # > 1 so export keeps every dim symbolic


@dataclass(frozen=True)
class StateSpec:
    """How one state input is refilled: ``past = cat(past, outputs[output], dim)``."""

    output: int  # index into the program's flat outputs
    dim: int  # the dim that grows
    dtype: str  # torch dtype name, for the empty state of the first call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DecoderStep(torch.nn.Module):
    """``(input_ids, past) -> (logits of the last position, *present keys and values)``.

    Logits are computed for the last position only, as ``generate`` does
    (``logits_to_keep=1``): the prefill's other rows are never read and would cost a
    ``seq × vocab`` product and its bytes across the cut.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[Any, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        seq = input_ids.shape[1]
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys[:, :, -seq:], layer.values[:, :, -seq:]]
        return (out.logits, *present)


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
    past = [
        torch.zeros(b, heads, p, head_dim, dtype=param.dtype, device=param.device)
        for _ in range(2 * step.layers)
    ]
    max_len = int(getattr(config, "max_position_embeddings", None) or 4096)
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max_len)
    past_len = Dim("past", min=0, max=max_len)
    dynamic = ({0: batch, 1: seq}, [{0: batch, 2: past_len} for _ in past])
    captured = capture(
        step, (ids, past), dynamic_shapes=dynamic, model_name=model_name or model_name_of(base)
    )
    captured.special_token_ids = special_token_ids(base)
    dtype = str(param.dtype).removeprefix("torch.")
    captured.reference = dict(DECODE_REFERENCE)
    captured.state = {f"past_{i}": StateSpec(1 + i, 2, dtype) for i in range(len(past))}
    return captured


def _state_order(program: Any) -> list[str]:
    """State inputs in the order the program takes them (a saved plan's JSON may sort keys)."""
    return [name for name, _ in program.signature.inputs if name in program.state]


def _empty_state(program: Any, batch: int, device: torch.device) -> list[torch.Tensor]:
    tensors = []
    for name in _state_order(program):
        spec = program.state[name]
        dims = program.input_dims[name]
        shape = [batch if d == "batch" else 0 if i == spec.dim else d for i, d in enumerate(dims)]
        if not all(isinstance(d, int) for d in shape):
            raise PartitionError(f"state input {name} has unnamed symbolic dims {dims}")
        tensors.append(torch.zeros(shape, dtype=getattr(torch, spec.dtype), device=device))
    return tensors


def generate(
    program: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    public_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache; returns prompt and new tokens, like ``generate``.

    ``program`` is a :class:`SplitProgram` captured by :func:`capture_decoder` (in-process,
    loaded, or connected to a worker). Stops after ``max_new_tokens`` or when every row has
    produced an EOS token; rows that finished early are padded with ``pad_token_id``
    (default: the first EOS id), as transformers does. Under RNM only the prompt is sanitised,
    less the positions ``public_prompt`` marks (a chat template); generated tokens are ones
    the GPU computed (see :meth:`SplitProgram.run`). Afterwards ``program.last_request``
    describes the prompt's sanitisation (its sanitised tokens and total ε) for the whole
    generation request.
    """
    if not getattr(program, "state", None):
        raise PartitionError(
            f"{program.model_name}: the program has no KV-cache state; partition the decoder "
            "step (capture_decoder / `teesplit partition` of a causal LM) to generate"
        )
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise PartitionError(
            f"input_ids must be a [batch, seq] int64 tensor, got {input_ids.dtype} "
            f"{list(input_ids.shape)}"
        )
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    specs = [program.state[name] for name in _state_order(program)]
    past = _empty_state(program, input_ids.shape[0], input_ids.device)
    tokens = input_ids
    step_ids = input_ids
    prompt_request: dict[str, Any] = {}
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    with torch.no_grad():
        for step in range(max_new_tokens):
            if step > 0:
                public: bool | torch.Tensor = True
            else:
                public = public_prompt if public_prompt is not None else False
            out = program.run((step_ids, past), {}, public_tokens=public)
            if step == 0:
                prompt_request = dict(program.last_request)
            next_ids = out[0][:, -1].argmax(-1)
            if eos:
                next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
                done |= torch.isin(next_ids, torch.tensor(eos, device=done.device))
            step_ids = next_ids[:, None]
            tokens = torch.cat([tokens, step_ids], dim=1)
            past = [
                torch.cat([p, out[spec.output]], dim=spec.dim)
                for p, spec in zip(past, specs, strict=True)
            ]
            if eos and bool(done.all()):
                break
    program.last_request = prompt_request
    return tokens


def encode_prompt(tokenizer: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, public)`` for a user's ``text``: wrapped in the tokenizer's chat template
    when it has one, with ``public`` marking the template's tokens.

    Only the user's words are private. The template (role names, newlines, a default system
    prompt) is the same for everyone, and sanitising it would garble the structure the model
    relies on while hiding nothing; tokens that overlap the user's characters stay private.
    """
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": text}]
        full = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        full = text
    start = full.rfind(text)
    end = start + len(text)
    enc = tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc["offset_mapping"][0]
    private = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return enc["input_ids"], ~private[None, :]
