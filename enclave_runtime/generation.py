"""Generation with a KV cache, on the enclave side: decoding over an executor.

:func:`decode_steps` is the one decoding loop: it yields each step's tokens, chosen greedily or
by a sampler; :func:`generate` is greedy decoding to the end, like transformers' ``generate``.

Reads an :class:`~enclave_runtime.executor.Executor` of a decoder step (captured by
``partitioner.generation.capture_decoder``: ``(input_ids, padding, past) -> (logits,
*present)`` with the cache as explicit state); writes the executor's ``last_request``. A
state the GPU holds (``StateSpec.holder``) is passed as a stand-in of its shape
(``runtime.state``): the positions count, the values stay with the holder. Guarantees the tokens of
``model.generate(do_sample=False)`` for the same prompt, and that under RNM only the prompt's
private positions are sanitised and counted in ε.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch

from enclave_runtime.executor import Executor
from partitioner.errors import InputError, PartitionError
from partitioner.plan import Plan
from runtime.state import grown, stand_in


def _state_order(plan: Plan) -> list[str]:
    """State inputs in the order the program takes them (a saved plan's JSON may sort keys)."""
    return [name for name, _ in plan.signature.inputs if name in plan.state]


def step_inputs(plan: Plan, ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[Any, ...]:
    """A decoder step's arguments: ``(ids, padding, past)``, ``padding`` zeros (each row one
    whole sequence), or ``(ids, past)`` for a program captured without padding."""
    if plan.padding is None:
        return (ids, past)
    return (ids, torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device), past)


def _empty_state(plan: Plan, batch: int, device: torch.device) -> list[torch.Tensor]:
    tensors = []
    for name in _state_order(plan):
        spec = plan.state[name]
        dims = plan.input_dims[name]
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

    ``program`` is an :class:`Executor` of a decoder step (``capture_decoder``), in-process,
    loaded, or connected to a worker; anything with an ``executor()`` method (the compiler's
    ``SplitProgram``) gets a fresh one. Stops after ``max_new_tokens`` or when every row has
    produced an EOS token; rows that finished early are padded with ``pad_token_id``
    (default: the first EOS id), as transformers does. Under RNM only the prompt is sanitised,
    less the positions ``public_prompt`` marks (a chat template); generated tokens are ones
    the GPU computed (see :meth:`Executor.run`). Afterwards the executor's ``last_request``
    describes the prompt's sanitisation (its sanitised tokens and total ε) for the whole
    generation request: pass an executor (``split.executor()``) to read it, since a
    ``SplitProgram`` gets a fresh one that is dropped afterwards.
    """
    steps = decode_steps(
        program,
        input_ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        public_prompt=public_prompt,
    )
    return torch.cat([input_ids, *(next_ids[:, None] for next_ids in steps)], dim=1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max token of each row of ``[batch, vocab]`` logits."""
    return logits.argmax(-1)


def decode_steps(
    program: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    public_prompt: torch.Tensor | None = None,
    choose: Callable[[torch.Tensor], torch.Tensor] = greedy,
) -> Generator[torch.Tensor, None, None]:
    """The decoding loop of :func:`generate`, one step at a time: yields each step's new
    tokens (``[batch]`` int64) as soon as they are chosen, for a caller that streams them.

    The request is checked here, before the first step (an :class:`InputError` is raised by
    this call, not by the iterator). ``choose`` maps the last position's logits
    (``[batch, vocab]``) to the next tokens: greedy by default, a sampler
    (``enclave_runtime.sampling``) otherwise. The executor's ``last_request`` is the
    prompt's account after every step. A caller that stops early (a stop string, a client
    gone) closes the iterator; the cache's holder then keeps its state until the session
    ends (``WorkerClient.close``), since no step said ``last``.
    """
    if not isinstance(program, Executor):
        program = program.executor()
    plan = program.spec
    if not plan.state:
        raise PartitionError(
            f"{plan.model}: the program has no KV-cache state; partition the decoder "
            "step (capture_decoder / `teesplit partition` of a causal LM) to generate"
        )
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InputError(
            f"input_ids must be a [batch, seq] int64 tensor, got {input_ids.dtype} "
            f"{list(input_ids.shape)}"
        )
    if input_ids.shape[1] == 0:
        raise InputError("the prompt is empty: nothing to generate from")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = context_length(plan)
    if context is not None and input_ids.shape[1] + max_new_tokens > context:
        raise InputError(
            f"a prompt of {input_ids.shape[1]} tokens plus {max_new_tokens} new ones exceeds "
            f"the model's context of {context} positions; shorten the prompt or ask for fewer"
        )
    return _steps(
        program, input_ids, max_new_tokens, eos_token_id, pad_token_id, public_prompt, choose
    )


def context_length(plan: Plan) -> int | None:
    """The most positions (prompt and new tokens) a decoder step's cache takes, if bounded."""
    return plan.dim_ranges.get("past", [0, None])[1]


def _steps(
    program: Executor,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    public_prompt: torch.Tensor | None,
    choose: Callable[[torch.Tensor], torch.Tensor],
) -> Generator[torch.Tensor, None, None]:
    plan = program.spec
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    specs = [plan.state[name] for name in _state_order(plan)]
    past = _empty_state(plan, input_ids.shape[0], input_ids.device)
    step_ids = input_ids
    prompt_request: dict[str, Any] = {}
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequence = object()  # this generation: an executor refuses to mix it with another's cache
    for step in range(max_new_tokens):
        if step > 0:
            public: bool | torch.Tensor = True
        else:
            public = public_prompt if public_prompt is not None else False
        last = step == max_new_tokens - 1  # the holders of the cache may free it
        out = program.run(  # its stages run under inference_mode
            step_inputs(plan, step_ids, past),
            {},
            public_tokens=public,
            last=last,
            sequence=sequence,
        )
        if step == 0:
            prompt_request = dict(program.last_request)
        # the request's account is its prompt's: later steps pass public tokens only
        program.last_request = prompt_request
        next_ids = choose(out[0][:, -1])
        if eos:
            next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
            done |= torch.isin(next_ids, torch.tensor(eos, device=done.device))
        step_ids = next_ids[:, None]
        past = [
            torch.cat([p, out[spec.output]], dim=spec.dim)
            if spec.holder is None
            else stand_in(grown(p.shape, spec.dim, out[spec.output].shape[spec.dim]), p.dtype)
            for p, spec in zip(past, specs, strict=True)
        ]
        yield next_ids
        if eos and bool(done.all()):
            return


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
    if full.count(text) != 1:  # the words also occur in the template: mark everything private
        enc = tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
        return enc["input_ids"], torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    start = full.find(text)
    end = start + len(text)
    enc = tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc["offset_mapping"][0]
    private = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return enc["input_ids"], ~private[None, :]
