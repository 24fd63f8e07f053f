"""The OpenAI API's requests, responses and errors, as the enclave's server reads and writes them.

Reads a request body (untrusted bytes from any client) and returns a :class:`Job`, or raises
:class:`APIError`, which is the OpenAI error object (``{"error": {"message", "type", "param",
"code"}}``) with its HTTP status. Every field that matters is checked for type and range; fields
this server does not know are ignored, as OpenAI's are, and known ones it cannot honour
(``n > 1``, ``logprobs``, tools, penalties...) are refused rather than silently dropped. Nothing
in a request names a file, a module or a template: the prompt is text or token ids, and the
chat template is the bundle's, rendered in its sandbox (:mod:`enclave_runtime.tokenizer`).

Writes the response objects (``chat.completion``, ``text_completion`` and their stream chunks),
each with a top-level ``teesplit`` field that OpenAI clients ignore: the privacy account of the
request (ε spent on the prompt, and the policy).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_MESSAGES = 256
MAX_STOP = 4
MAX_STOP_CHARS = 256
ROLES = {"system", "developer", "user", "assistant"}
# known fields this server cannot honour: refused unless they ask for the default
UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": False,
    "top_logprobs": 0,
    "suffix": "",
    "tools": [],
    "functions": [],
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class APIError(Exception):
    """A request refused, as the OpenAI error object and its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # the OpenAI field's name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN and Infinity are not JSON and are refused."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the request body is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


@dataclass
class Job:
    """One checked request: what to generate and how."""

    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def _given(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number", name)
    if not low <= value <= high:
        raise bad(f"{name} must be in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise bad(f"{name} must be in [{low}, {high}], got {value}", name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name)
    return value


def _common(body: dict[str, Any], kind: str, served: str, context: int) -> Job:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be given as a string", "model")
    if model != served:
        raise bad(
            f"the model {model!r} does not exist; this server serves {served!r}",
            "model",
            "model_not_found",
        )
    for name, default in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != default:
            raise bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    form = body.get("response_format")
    if form is not None and form != {"type": "text"}:  # JSON modes would need constrained decoding
        raise bad(
            "only response_format {'type': 'text'} is supported",
            "response_format",
            "unsupported_parameter",
        )
    # the newer name for the same limit, which chat clients may send instead
    limit = "max_completion_tokens" if _given(body, "max_completion_tokens") else "max_tokens"
    max_tokens = _integer(body, limit, 1, context)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(
            f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
            "characters",
            "stop",
        )
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be in (0, 1]", "top_p")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options must be an object", "stream_options")
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        include_usage = _boolean(options, "include_usage")
    return Job(
        kind=kind,
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        stop=stops,
        stream=stream,
        include_usage=include_usage,
    )


def parse_chat(body: dict[str, Any], served: str, context: int, max_chars: int) -> Job:
    """A ``/v1/chat/completions`` body -> :class:`Job` (its messages' text, not yet tokens)."""
    job = _common(body, "chat", served, context)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    total = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role")
        content = _content(message.get("content"), f"{where}.content")
        total += len(content)
        # developer is the newer name of system; chat templates know system
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if total > max_chars:
        raise APIError(
            413,
            f"the messages hold {total} characters; this server takes at most {max_chars}",
            param="messages",
            code="context_length_exceeded",
        )
    job.messages = out
    return job


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        parts = []
        for part in value:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise bad(f"{where}: only text parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where} must be a string or a list of text parts", where)


def parse_completion(
    body: dict[str, Any], served: str, context: int, max_chars: int, vocab: int | None
) -> Job:
    """A ``/v1/completions`` body -> :class:`Job`: one prompt, text or token ids."""
    job = _common(body, "completion", served, context)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt")
        if len(prompt) > max_chars:
            raise APIError(
                413,
                f"the prompt holds {len(prompt)} characters; this server takes at most {max_chars}",
                param="prompt",
                code="context_length_exceeded",
            )
        job.prompt = prompt
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if vocab is not None and not all(0 <= t < vocab for t in prompt):
            raise bad(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(prompt) > context:
            raise _over_context(len(prompt), context, "prompt")
        job.prompt_ids = list(prompt)
    else:
        raise bad("prompt must be one non-empty string or one list of token ids", "prompt")
    return job


def _over_context(tokens: int, context: int, param: str) -> APIError:
    return APIError(
        413,
        f"the prompt is {tokens} tokens; the model's context is {context} positions, and at "
        "least one must be left to generate",
        param=param,
        code="context_length_exceeded",
    )


def check_length(job: Job, prompt_tokens: int, context: int, default_max: int) -> int:
    """The number of tokens to generate: the request's ``max_tokens``, or as many as fit (at
    most ``default_max``). 413 for a prompt that leaves no room, 400 for one that leaves
    less than ``max_tokens`` asks."""
    param = "messages" if job.kind == "chat" else "prompt"
    room = context - prompt_tokens
    if room < 1:
        raise _over_context(prompt_tokens, context, param)
    if job.max_tokens is None:
        return min(room, default_max)
    if job.max_tokens > room:
        raise bad(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {job.max_tokens}: more "
            f"than the model's context of {context} positions",
            "max_tokens",
            "context_length_exceeded",
        )
    return job.max_tokens


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, public)`` of a conversation through the tokenizer's chat template, with
    ``public`` marking the template's own tokens (as ``generation.encode_prompt`` does for one
    message).

    The template is rendered once with a unique marker in place of each message's text: if it
    puts each marker exactly once and the real rendering is the markers' rendering with the
    texts put back, the texts' character spans are known exactly; otherwise (a template that
    transforms or repeats the text) every position is private, which spends more ε but hides
    everything.
    """
    markers = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
    marked = [{**m, "content": k} for m, k in zip(messages, markers, strict=True)]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    skeleton = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    spans: list[tuple[int, int]] | None = []
    rebuilt, at, shift = skeleton, 0, 0
    for marker, message in zip(markers, messages, strict=True):
        if skeleton.count(marker) != 1 or skeleton.index(marker) < at:
            spans = None
            break
        at = skeleton.index(marker)
        start = at + shift
        spans.append((start, start + len(message["content"])))
        shift += len(message["content"]) - len(marker)
        rebuilt = rebuilt.replace(marker, message["content"])
    enc = tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
    ids = enc["input_ids"]
    if spans is None or rebuilt != full:
        return ids, torch.zeros_like(ids, dtype=torch.bool)
    offsets = enc["offset_mapping"][0]
    private = torch.zeros(ids.shape[1], dtype=torch.bool)
    for start, end in spans:
        private |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return ids, ~private[None, :]


# -- responses --------------------------------------------------------------------------------


def privacy(
    account: dict[str, Any], policy: str, crossed: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The ``teesplit`` extension field: what the request cost in privacy, and the bytes that
    crossed to and from the GPU worker for it (tensor payloads: its own rows of each batched
    call; the messages' headers are shared by the batch and not counted)."""
    out = {
        "policy": policy,
        "epsilon": float(account.get("epsilon", 0.0)),
        "epsilon_per_token": account.get("epsilon_per_token"),
    }
    if "public_classes" in account:  # the token classes that passed unchanged, no ε spent
        out["public_classes"] = list(account["public_classes"])
    if crossed is not None:
        out["bytes_to_gpu"], out["bytes_from_gpu"] = crossed
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(job: Job, text: str | None, finish: str | None, *, first: bool = False) -> Any:
    if job.kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if not job.stream:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text or ""},
            "logprobs": None,
            "finish_reason": finish,
        }
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _envelope(job: Job, chunk: bool) -> dict[str, Any]:
    kind = {"chat": "chat.completion", "completion": "text_completion"}[job.kind]
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return {
        "id": prefix + job.id,
        "object": kind + ".chunk" if chunk and job.kind == "chat" else kind,
        "created": job.created,
        "model": job.model,
    }


def response(
    job: Job, text: str, finish: str, used: dict[str, int], cost: dict[str, Any]
) -> dict[str, Any]:
    """The whole (non-streamed) response object."""
    return {
        **_envelope(job, chunk=False),
        "choices": [_choice(job, text, finish)],
        "usage": used,
        "teesplit": cost,
    }


def chunk(job: Job, text: str | None, *, first: bool = False) -> dict[str, Any]:
    """A stream chunk carrying new text (the first chat chunk also names the role)."""
    return {**_envelope(job, chunk=True), "choices": [_choice(job, text, None, first=first)]}


def final_chunks(
    job: Job, finish: str, used: dict[str, int], cost: dict[str, Any]
) -> list[dict[str, Any]]:
    """The stream's last chunks: the finish reason with the privacy account, then (when the
    client asked, ``stream_options.include_usage``) the usage, as OpenAI sends it."""
    text = "" if job.kind == "completion" else None
    last = {**_envelope(job, chunk=True), "choices": [_choice(job, text, finish)], "teesplit": cost}
    out = [last]
    if job.include_usage:
        out.append({**_envelope(job, chunk=True), "choices": [], "usage": used, "teesplit": cost})
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
