"""``teesplit serve DIR --worker ADDR --listen HOST:PORT``: an OpenAI-compatible HTTP server in
the enclave process.

Reads the bundle's enclave side and tokenizer once (signature and hashes checked, as the stdin
driver does) and serves ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true``
as server-sent events), ``GET /v1/models``, ``GET /health`` (liveness, and the open sessions)
and ``GET /ready`` (the GPU worker answers and a session is free), over TLS when given a
certificate and key. Starlette on uvicorn; the request schema and errors are
:mod:`enclave_runtime.openai_api`.

Each request is a session: its own :class:`Executor` (mask pool, ε account) over its own
:class:`WorkerClient` (one stream to the worker, which holds the session's KV cache). Sessions
run concurrently, each in its own thread, at most ``max_sessions`` at once; one more is refused
at once with 503 (and ``Retry-After``). A session that ends (finished, failed, or cancelled
because its client went away) closes its worker stream, so the worker frees what it held, and
its slot is free again only after that. The prompt's account (ε and the policy) is returned in
the ``teesplit`` field. A request's bytes never choose a file, a module or a code path: they are
parsed into a :class:`~enclave_runtime.openai_api.Job` of checked values, and a failure is
answered with the OpenAI error object, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.driver import WorkerClient, WorkerError
from enclave_runtime.executor import Executor
from enclave_runtime.generation import context_length, decode_steps
from enclave_runtime.launcher import bundle_root
from enclave_runtime.openai_api import (
    APIError,
    Job,
    check_length,
    chunk,
    encode_chat,
    final_chunks,
    parse_chat,
    parse_completion,
    parse_json,
    privacy,
    response,
    sse,
    usage,
)
from enclave_runtime.sampling import Sampler, sampling_rng
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
        gpu = [s for s in self.plan.stages if s.side == "gpu"]
        self._inputs = {s.name: list(s.inputs) for s in gpu}
        self._outputs = {s.name: list(s.outputs) for s in gpu}

    def client(self, session: str, timeout: float | None = None) -> WorkerClient:
        """A new session with the worker (as ``driver.connect`` builds it)."""
        s = self.settings
        return WorkerClient(
            s.worker,
            timeout or s.timeout,
            s.worker_token,
            tls_root=s.worker_tls_root,
            inputs=self._inputs,
            outputs=self._outputs,
            held=self.plan.held(),
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
    """One request's state: its id, its worker client once connected, and whether it was
    cancelled. ``cancel`` may come from the event loop while the session's thread runs."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(8)
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._client: WorkerClient | None = None
        self._closed = False

    def attach(self, client: WorkerClient) -> None:
        with self._lock:
            self._client = client
            closed = self._closed
        if closed:  # cancelled while connecting
            client.close()

    def close(self) -> None:
        """End the worker stream now: the worker frees the session's cache, and a call in
        flight fails at once instead of finishing for nobody."""
        with self._lock:
            client, self._client, self._closed = self._client, None, True
        if client is not None:
            client.close()

    def cancel(self) -> None:
        self.cancelled.set()
        self.close()


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

    Text that may be the start of a stop string, or an incomplete UTF-8 character (decoded as
    U+FFFD), is held back until the next token decides it, so a stream never sends what the
    whole response would not contain.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is safe to send, and whether a stop string ended the text."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        end = len(self.text.rstrip("\ufffd"))
        hold = 0  # the longest end of the text that begins a stop string
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), hold, -1):
                if self.text[:end].endswith(stop[:k]):
                    hold = k
                    break
        return self._take(end - hold), False

    def flush(self) -> str:
        return self._take(len(self.text))

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


Emit = Callable[[tuple[Any, ...]], None]


def generate_session(
    model: Model,
    session: Session,
    job: Job,
    ids: torch.Tensor,
    public: torch.Tensor | None,
    max_new: int,
    emit: Emit,
) -> None:
    """The session's thread: connect, decode, send ``("text", delta)`` items and then exactly
    one ``("done", finish_reason, usage, privacy)`` or ``("error", APIError)``."""
    steps = None
    try:
        model_client = model.client(session.id)
        session.attach(model_client)
        if session.cancelled.is_set():
            raise WorkerError("cancelled")
        executor = Executor(model.plan, model_client)
        sampler = Sampler(job.temperature, job.top_p, sampling_rng(job.seed))
        eos = sorted(model.eos)
        steps = decode_steps(
            executor,
            ids,
            max_new_tokens=max_new,
            eos_token_id=eos or None,
            public_prompt=public,
            choose=sampler,
        )
        text = Detokenizer(model.tokenizer, job.stop)
        count, finish = 0, "length"
        for next_ids in steps:
            if session.cancelled.is_set():
                raise WorkerError("cancelled")
            token = int(next_ids[0])
            count += 1
            if token in model.eos:
                finish = "stop"
                break
            delta, stopped = text.add(token)
            if delta:
                emit(("text", delta))
            if stopped:
                finish = "stop"
                break
        rest = text.flush()
        if rest:
            emit(("text", rest))
        account = privacy(executor.last_request, model.policy)
        emit(("done", finish, usage(ids.shape[1], count), account))
    except Exception as exc:  # every failure ends the session with one error item
        if session.cancelled.is_set():
            emit(("error", APIError(499, "the client closed the request", code="cancelled")))
        else:
            emit(("error", api_error(exc)))
    finally:
        if steps is not None:
            steps.close()
        session.close()


class Server:
    """The ASGI application's handlers over one :class:`Model`."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.sessions = Sessions(model.settings.max_sessions)
        self.started = int(time.time())

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request: Any, exc: Exception) -> Any:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            message = {404: "no such endpoint", 405: "method not allowed"}.get(status, "error")
            return error_response(APIError(status, message))

        async def internal(request: Any, exc: Exception) -> Any:
            return error_response(api_error(exc))

        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
        ]
        handlers = {HTTPException: http_error, Exception: internal}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- metadata and health -----------------------------------------------------------------

    def _card(self) -> dict[str, Any]:
        return {
            "id": self.model.name,
            "object": "model",
            "created": self.started,
            "owned_by": "teesplit",
        }

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_info(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        if request.path_params["model"] != self.model.name:
            return error_response(
                APIError(404, "no such model", param="model", code="model_not_found")
            )
        return JSONResponse(self._card())

    def _load(self) -> dict[str, Any]:
        return {"sessions": self.sessions.count(), "max_sessions": self.sessions.capacity}

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model.name, **self._load()})

    async def ready(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        def probe() -> str | None:
            try:
                self.model.client("readiness-probe", min(self.model.settings.timeout, 5)).close()
            except WorkerError as exc:
                print(f"teesplit serve: not ready: {exc}", file=sys.stderr, flush=True)
                return "the GPU worker does not answer"
            return None

        why = await asyncio.to_thread(probe)
        if why is None and self.sessions.count() >= self.sessions.capacity:
            why = "every session is in use"
        status = "ready" if why is None else "unavailable"
        body = {"status": status, **({"reason": why} if why else {}), **self._load()}
        return JSONResponse(body, status_code=200 if why is None else 503)

    # -- completions -------------------------------------------------------------------------

    async def chat(self, request: Any) -> Any:
        return await self._complete(request, "chat")

    async def completions(self, request: Any) -> Any:
        return await self._complete(request, "completion")

    async def _body(self, request: Any) -> bytes:
        """The body, at most ``max_body_bytes`` (413 beyond, before reading it all)."""
        cap = self.model.settings.max_body_bytes
        too_big = APIError(413, f"the request body is over {cap} bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > cap:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    def _parse(self, body: dict[str, Any], kind: str) -> Job:
        m = self.model
        if kind == "chat":
            return parse_chat(body, m.name, m.context, m.max_prompt_chars)
        return parse_completion(body, m.name, m.context, m.max_prompt_chars, m.plan.vocab)

    async def _complete(self, request: Any, kind: str) -> Any:
        try:
            job = self._parse(parse_json(await self._body(request)), kind)
            ids, public = await asyncio.to_thread(self.model.encode, job)
            max_new = check_length(
                job, ids.shape[1], self.model.context, self.model.settings.default_max_tokens
            )
            session = self.sessions.open()
        except Exception as exc:  # every refusal: an OpenAI error object
            return error_response(api_error(exc))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def emit(item: tuple[Any, ...]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        def run() -> None:
            try:
                generate_session(self.model, session, job, ids, public, max_new, emit)
            finally:  # the slot is free only once the worker stream is closed
                self.sessions.release(session)

        threading.Thread(target=run, name=f"teesplit-session-{session.id}", daemon=True).start()
        watcher = asyncio.create_task(_watch_disconnect(request, session))
        try:
            first = await queue.get()
        except BaseException:
            watcher.cancel()
            session.cancel()
            raise
        if first[0] == "error":
            watcher.cancel()
            return error_response(first[1])
        if job.stream:
            return _stream(job, first, queue, session, watcher)
        return await _collect(job, first, queue, session, watcher)


async def _watch_disconnect(request: Any, session: Session) -> None:
    """Cancel the session when its client goes away (the body was read already, so the next
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            session.cancel()
            return


async def _collect(
    job: Job, item: tuple[Any, ...], queue: asyncio.Queue, session: Session, watcher: Any
) -> Any:
    from starlette.responses import JSONResponse

    parts = []
    try:
        while item[0] == "text":
            parts.append(item[1])
            item = await queue.get()
    except BaseException:
        session.cancel()
        raise
    finally:
        watcher.cancel()
    if item[0] == "error":
        return error_response(item[1])
    _, finish, used, cost = item
    return JSONResponse(response(job, "".join(parts), finish, used, cost))


def _stream(
    job: Job, first: tuple[Any, ...], queue: asyncio.Queue, session: Session, watcher: Any
) -> Any:
    from starlette.responses import StreamingResponse

    async def events() -> AsyncIterator[bytes]:
        finished = False
        item = first
        try:
            if job.kind == "chat":
                yield sse(chunk(job, "", first=True))
            while True:
                if item[0] == "text":
                    yield sse(chunk(job, item[1]))
                elif item[0] == "done":
                    _, finish, used, cost = item
                    for last in final_chunks(job, finish, used, cost):
                        yield sse(last)
                    break
                else:  # after the headers an error is an event, as OpenAI's streams send it
                    yield sse(item[1].body())
                    break
                item = await queue.get()
            yield sse("[DONE]")
            finished = True
        finally:
            watcher.cancel()
            if not finished:  # the client went away mid-stream: free the session now
                session.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def error_response(error: APIError) -> Any:
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# -- the command --------------------------------------------------------------------------------


def _listen(address: str) -> tuple[socket.socket, str]:
    """A listening socket for ``HOST:PORT`` (port 0: a free one) and the address it got."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen takes HOST:PORT, got {address!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    bound = sock.getsockname()
    return sock, f"{host}:{bound[1]}"


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"teesplit serve: cannot read the {what} {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    from enclave_runtime.__main__ import UNSIGNED_WARNING, positive_int, seconds

    parser = argparse.ArgumentParser(prog="teesplit serve", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="DIR or DIR/enclave of a saved decoder step")
    parser.add_argument("--worker", required=True, help="the GPU worker (unix:/path or host:port)")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on (port 0: any)")
    verification = parser.add_mutually_exclusive_group(required=True)
    verification.add_argument("--trusted-key", default=None, help="the compiler's public key")
    verification.add_argument(
        "--allow-unsigned", action="store_true", help="run an unsigned bundle (development only)"
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--model-name", default=None, help="the model id (default: the plan's)")
    parser.add_argument("--max-sessions", type=positive_int, default=8)
    parser.add_argument(
        "--max-tokens", type=positive_int, default=512, help="tokens when a request names none"
    )
    parser.add_argument("--max-body-kb", type=positive_int, default=1024)
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds per worker call")
    parser.add_argument("--worker-tls-root", default=None, help="PEM root: TLS to the worker")
    parser.add_argument("--worker-token-file", default=None, help="the worker's shared secret")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("teesplit serve: --tls-cert and --tls-key go together")
    token = _read(args.worker_token_file, "worker token")
    settings = Settings(
        bundle=Path(args.bundle),
        worker=args.worker,
        trusted_key=args.trusted_key,
        allow_unsigned=args.allow_unsigned,
        timeout=args.timeout,
        worker_token=token.decode("utf-8", "replace").strip() if token is not None else None,
        worker_tls_root=_read(args.worker_tls_root, "worker's TLS root"),
        max_sessions=args.max_sessions,
        max_body_bytes=args.max_body_kb << 10,
        default_max_tokens=args.max_tokens,
        model_name=args.model_name,
    )
    if args.allow_unsigned:
        print(
            UNSIGNED_WARNING.replace("teesplit enclave", "teesplit serve"),
            file=sys.stderr,
            flush=True,
        )
    if args.tls_cert is not None:  # a bad certificate or key fails before anything starts
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.tls_cert, args.tls_key
            )
        except (OSError, ValueError) as exc:
            raise SystemExit(f"teesplit serve: cannot use --tls-cert/--tls-key: {exc}") from None
    try:
        model = Model(settings)
        model.client("startup-probe").close()  # a wrong --worker fails now, not per request
    except TeesplitError as exc:
        raise SystemExit(f"teesplit serve: {type(exc).__name__}: {exc}") from None
    try:
        sock, bound = _listen(args.listen)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"teesplit serve: cannot listen on {args.listen}: {exc}") from None
    import uvicorn

    config = uvicorn.Config(
        Server(model).app(),
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        log_level="warning",
        access_log=False,  # the host reads the enclave's logs: no paths or clients in them
        # a backstop far above the sessions: health checks and refusals still get through
        limit_concurrency=4 * args.max_sessions + 64,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,  # on SIGTERM, streams still open are cut after 5 s
    )
    scheme = "https" if args.tls_cert else "http"
    print(
        f"teesplit serve: {model.name} under {model.policy!r} on {scheme}://{bound}/v1 "
        f"(at most {args.max_sessions} sessions)",
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
