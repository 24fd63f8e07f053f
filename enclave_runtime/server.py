"""``teesplit serve DIR --worker ADDR --listen HOST:PORT``: an OpenAI-compatible HTTP server in
the enclave process.

Serves ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health`` (liveness, and the open sessions) and
``GET /ready`` (the GPU worker answers and a session is free), over TLS when given a
certificate and key, and (``/v1``) only to clients that send ``--api-key-file``'s key when
given one. Starlette on uvicorn; the request schema and errors are
:mod:`enclave_runtime.openai_api`, the bundle and the sessions :mod:`enclave_runtime.sessions`.

Each request is a session, at most ``max_sessions`` at once; one more is refused at once with
503 (and ``Retry-After``). One scheduler (:mod:`enclave_runtime.engine`) decodes them all:
each new session is prefilled on its own, and every session that is decoding takes its next
step in one batched call to the worker, which keeps each session's KV cache apart. A session
that ends (finished, failed, or cancelled because its client went away) leaves the batch
before the next step, the worker frees its cache, and only then is its slot free again. The
prompt's account (ε and the policy) is returned in the ``teesplit`` field. A request's bytes
never choose a file, a module or a code path: they are parsed into a
:class:`~enclave_runtime.openai_api.Job` of checked values, and a failure is answered with the
OpenAI error object, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from enclave_runtime import allocator
from enclave_runtime.driver import WorkerError
from enclave_runtime.engine import Engine, Request
from enclave_runtime.openai_api import (
    APIError,
    Job,
    check_length,
    chunk,
    final_chunks,
    parse_chat,
    parse_completion,
    parse_json,
    response,
    sse,
)
from enclave_runtime.sessions import Model, Session, Sessions, Settings, api_error
from partitioner.errors import TeesplitError


class Server:
    """The ASGI application's handlers over one :class:`Model`."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.sessions = Sessions(model.settings.max_sessions)
        self.engine = Engine(model)
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

    def _authorised(self, request: Any) -> None:
        """With ``--api-key-file``, a ``/v1`` request must carry the key as a bearer token."""
        key = self.model.settings.api_key
        if key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401, "the request does not carry this server's API key", code="invalid_api_key"
            )

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            self._authorised(request)
        except APIError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_info(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            self._authorised(request)
        except APIError as exc:
            return error_response(exc)
        if request.path_params["model"] != self.model.name:
            return error_response(
                APIError(404, "no such model", param="model", code="model_not_found")
            )
        return JSONResponse(self._card())

    def _load(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions.count(),
            "max_sessions": self.sessions.capacity,
            **self.engine.masks(),
        }

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
            self._authorised(request)
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

        def ended() -> None:  # the worker freed the session's cache: its slot is free
            self.sessions.release(session)

        try:
            self.engine.submit(Request(session, job, ids, public, max_new, emit, ended))
        except APIError as exc:
            self.sessions.release(session)
            return error_response(exc)
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
    port = sock.getsockname()[1]
    return sock, f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


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
    parser.add_argument(
        "--api-key-file", default=None, help="a key every /v1 request must send (Bearer)"
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("teesplit serve: --tls-cert and --tls-key go together")
    token = _read(args.worker_token_file, "worker token")
    api_key = _read(args.api_key_file, "API key")
    if api_key is not None and not api_key.strip():
        raise SystemExit(f"teesplit serve: the API key file {args.api_key_file} is empty")
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
        api_key=api_key.decode("utf-8", "replace").strip() if api_key is not None else None,
    )
    for note in allocator.prepare():
        print(f"teesplit serve: {note}", file=sys.stderr, flush=True)
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
