"""The sessions of ``teesplit serve``: the bundle loaded once, and what each request holds.

Reads the bundle's enclave side and tokenizer once (:class:`Model`: signature and hashes
checked, as the stdin driver does). Each request is a :class:`Session` (its id, and whether
its client went away); :class:`Sessions` bounds how many are open; the scheduler that decodes
them (``enclave_runtime.engine``) streams each one's text through a :class:`Detokenizer`.
A failure is turned into an OpenAI error that names the client's own mistake in full and the
worker's or ours without internals (:func:`api_error`; those go to stderr, the host's to read).
"""

from __future__ import annotations

import secrets
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.driver import WorkerClient, WorkerError, worker_client
from enclave_runtime.generation import context_length
from enclave_runtime.launcher import bundle_root
from enclave_runtime.openai_api import APIError, Job, encode_chat
from enclave_runtime.tokenizer import bundle_tokenizer
from partitioner.bundle import VerifiedFiles, load_program, read_document
from partitioner.errors import ArtifactError, InputError, IntegrityError, TeesplitError
from partitioner.plan import Plan


@dataclass
class Settings:
    """What ``teesplit serve`` was told (the command line's values)."""

    bundle: Path
    worker: str
    trusted_key: str | None = None
    allow_unsigned: bool = False
    timeout: float = 60.0
    worker_token: str | None = None
    worker_tls_root: bytes | None = None
    max_sessions: int = 8
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    model_name: str | None = None
    api_key: str | None = None  # clients must send it as a bearer token, when set


class Model:
    """The bundle, loaded once: the plan (enclave side), its tokenizer, and how to reach the
    worker. Holds no request state."""

    def __init__(self, settings: Settings) -> None:
        root = bundle_root(settings.bundle)
        self.settings = settings
        self.plan: Plan = load_program(
            root,
            gpu=False,
            trusted_key=settings.trusted_key,
            allow_unsigned=settings.allow_unsigned,
        )
        if not self.plan.state:
            raise ArtifactError(f"{root} holds no decoder step (no KV-cache state) to generate")
        document = read_document(root, trusted_key=settings.trusted_key)
        self.tokenizer = bundle_tokenizer(root, VerifiedFiles(root, document["files"]))
        if self.tokenizer is None:
            raise ArtifactError(f"{root} was saved without a tokenizer: it cannot serve text")
        self.context = context_length(self.plan) or 1 << 20
        self.name = settings.model_name or self.plan.model
        self.policy = self.plan.policy.name
        eos = self.tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set()
        # a prompt of more characters than this cannot fit the context whatever its tokens
        self.max_prompt_chars = min(16 * self.context, settings.max_body_bytes)

    def client(self, session: str, timeout: float | None = None) -> WorkerClient:
        """A new session with the worker (as ``driver.connect`` builds it)."""
        s = self.settings
        return worker_client(
            self.plan,
            s.worker,
            timeout or s.timeout,
            s.worker_token,
            tls_root=s.worker_tls_root,
            session=session,
        )

    def encode(self, job: Job) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The job's prompt as ``(input_ids, public positions or None)``."""
        if job.prompt_ids is not None:
            return torch.tensor([job.prompt_ids], dtype=torch.int64), None
        if job.kind == "completion":
            return self.tokenizer(job.prompt)["input_ids"], None
        if not self.tokenizer.chat_template:
            raise APIError(
                400,
                f"{self.name} has no chat template; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            return encode_chat(self.tokenizer, job.messages)
        except ArtifactError as exc:  # the template refused the conversation (raise_exception)
            raise APIError(400, str(exc), param="messages", code="chat_template_error") from None


class Session:
    """One request's id and whether it was cancelled. ``cancel`` may come from the event loop
    while the scheduler runs the session; it stops before the scheduler's next step."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(8)
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None

    def on_cancel(self, wake: Callable[[], None]) -> None:
        """``wake`` runs when the session is cancelled (now, if it was already)."""
        with self._lock:
            self._wake = wake
        if self.cancelled.is_set():
            wake()

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            wake = self._wake
        if wake is not None:
            wake()


class Sessions:
    """The open sessions, at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._open: dict[str, Session] = {}

    def open(self) -> Session:
        with self._lock:
            if len(self._open) >= self.capacity:
                raise APIError(
                    503,
                    f"the server is serving its {self.capacity} sessions; retry shortly",
                    type="server_error",
                    code="server_busy",
                )
            session = Session()
            self._open[session.id] = session
            return session

    def release(self, session: Session) -> None:
        with self._lock:
            self._open.pop(session.id, None)

    def count(self) -> int:
        with self._lock:
            return len(self._open)


class Detokenizer:
    """Generated tokens -> text deltas, stopping at a stop string.

    Each token is decoded in a short window (the tokens since the text last ended on a whole
    character, and the one before them, so a tokenizer that drops a word's leading space at the
    start of a text still spaces it), not the whole answer again: a step costs the same at the
    thousandth token as at the first. Text that may be the start of a stop string, or an
    incomplete UTF-8 character (decoded as U+FFFD), is held back until later tokens decide it,
    so a stream never sends what the whole response would not contain.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (whole characters only)
        self.sent = 0  # how much of it was handed out
        self._prefix = self._read = 0  # the window: ids[_prefix:_read] decoded already

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool = False) -> None:
        """Append the window's new characters to ``text`` once they are whole (or at the end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string ended the text."""
        self.ids.append(token)
        old = len(self.text)
        self._advance()
        return self._check(old)

    def _check(self, old: int) -> tuple[str, bool]:
        longest = max((len(stop) for stop in self.stops), default=0)
        since = max(old - longest + 1, 0)  # an earlier stop would have ended the text already
        hits = [i for i in (self.text.find(stop, since) for stop in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        end = len(self.text)
        hold = 0  # the longest end of the text that begins a stop string
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return self._take(end - hold), False

    def flush(self) -> tuple[str, bool]:
        """At the end: the rest of the text (a character left incomplete included), and
        whether it ends at a stop string after all."""
        old = len(self.text)
        self._advance(final=True)
        delta, stopped = self._check(old)
        return delta + ("" if stopped else self._take(len(self.text))), stopped

    def _take(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def api_error(exc: BaseException) -> APIError:
    """What a client is told about a failure: its own input's fault in full, the worker's or
    ours without internals (those go to stderr)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InputError):
        return APIError(400, str(exc))
    log = f"teesplit serve: request failed: {type(exc).__name__}"
    if isinstance(exc, (WorkerError, IntegrityError)):
        print(f"{log}: {exc}", file=sys.stderr, flush=True)
        return APIError(
            502,
            "the GPU worker failed or its reply was refused; the request was not completed",
            type="server_error",
            code="worker_error",
        )
    if isinstance(exc, TeesplitError):
        print(f"{log}: {exc}", file=sys.stderr, flush=True)
    else:  # a bug: where and what type only, since a message may hold request data and
        # stderr is the host's to read
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        print(log + where, file=sys.stderr, flush=True)
    return APIError(500, "internal error", type="server_error", code="internal_error")
