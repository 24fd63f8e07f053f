"""The scheduler of ``teesplit serve``: every decoding session advanced by one call per step.

Reads the loaded bundle (:class:`~enclave_runtime.sessions.Model`) and the requests the server
submits (:class:`Request`: a checked job, its prompt's ids, where to send its text). Owns one
:class:`~enclave_runtime.executor.Executor` (mask pool, CSPRNG) and one worker session (one
stream) for all requests, driven by one thread. Each turn of its loop:

1. sessions whose client went away are dropped;
2. new requests are prefilled together, in one call: each prompt a row, left-padded to the
   longest with its ``padding`` input counting the pad (positions the step masks, public
   to RNM, charged no ε); each request is charged its own row's ε
   (``last_request["epsilon_rows"]``);
3. every session that is decoding takes its next step *together*: one executor call with one
   row per session, each row naming its session's sequence (``rows``), so each GPU stage runs
   once per step for all of them (continuous batching, as vLLM schedules and Triton's sequence
   batcher batches). The worker keeps each session's cache apart; the call's stand-ins are as
   long as the longest cache and each shorter row's ``padding`` is raised by its shortfall,
   which the decoder step masks (``Plan.padding``; a program captured without it batches
   only sessions of equal lengths).

Per session: its own sampler (temperature, top-p, seed: ``enclave_runtime.sampling``), stop
strings and detokenizer, its prompt's ε account and its share of the bytes that crossed. Masks
are drawn per call, so every row of every step has fresh pads of its own.

Guarantees: a session's tokens are the ones it gets alone (greedy: up to the floating-point
summation order of a batched step); a session that ends (finished, failed, cancelled) leaves the
batch before the next step and its rows are released on the worker before its final item is
sent and its slot freed; a worker that fails or whose reply is refused fails the sessions
whose cache it held (the stream is given up) and the next requests get a new one; a request
the program refuses fails that request only.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from enclave_runtime.driver import WorkerClient, WorkerError
from enclave_runtime.executor import Executor
from enclave_runtime.generation import _empty_state, _state_order
from enclave_runtime.openai_api import APIError, Job, privacy, usage
from enclave_runtime.sampling import Sampler, sampling_rng
from enclave_runtime.sessions import Detokenizer, Model, Session, api_error
from partitioner.errors import InputError, IntegrityError
from runtime.state import grown, left_padded, stand_in

Emit = Callable[[tuple[Any, ...]], None]

# one-session decode mask sets kept ready, drawn this many at a time (one GEMM per layer):
# 64 a batch is what benchmarks/teebound.py measures the offline cost at (SmolLM2: 8.7 ms a
# set, against 10.5 at 32; ~1.2 MB of enclave memory a set, so a stock of up to 127 sets)
MASK_STOCK = 64
MASK_BATCH = 64


@dataclass
class Request:
    """One submitted request: what the server checked, and where its items go. ``emit``
    receives ``("text", delta)`` items, then exactly one ``("done", finish_reason, usage,
    privacy)`` or ``("error", APIError)``; ``ended`` runs after that (the slot is free)."""

    session: Session
    job: Job
    ids: torch.Tensor
    public: torch.Tensor | None
    max_new: int
    emit: Emit
    ended: Callable[[], None]


@dataclass(eq=False)  # compared by identity: one per session
class _Running:
    """A request being decoded: its sampler and text, the positions its cache holds, the
    cache itself where the enclave keeps it, and its account."""

    request: Request
    sampler: Sampler | None  # None: the request was refused before it started
    text: Detokenizer | None
    row: str = field(default_factory=lambda: secrets.token_hex(8))
    count: int = 0
    token: int = 0
    length: int = 0  # positions its cache holds, its prompt's left pad included
    pad: int = 0  # that pad: positions the step masks, whatever the batch
    past: list[torch.Tensor] = field(default_factory=list)
    account: dict[str, Any] = field(default_factory=dict)
    sent: float = 0.0
    received: float = 0.0
    finish: str | None = None
    ended: bool = False  # its final item was sent
    client: object = None  # the worker stream its cache is on


class Engine:
    """The scheduler (see the module): ``submit`` requests; ``close`` at shutdown."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.plan = model.plan
        self._specs = [self.plan.state[name] for name in _state_order(self.plan)]
        self._executor = Executor(self.plan, runner=_Unconnected())
        self._refill = self._stock_decode_masks()
        self._client: WorkerClient | None = None
        self._cond = threading.Condition()
        self._pending: list[Request] = []
        self._starting: list[_Running] = []  # this turn's new sessions, not yet prefilled
        self._running: list[_Running] = []
        self._closed = False
        self.steps = 0  # batched decode calls, for statistics
        self._thread = threading.Thread(target=self._loop, name="teesplit-engine", daemon=True)
        self._thread.start()

    # -- the server's side -----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is stopping", type="server_error")
            self._pending.append(request)
            self._cond.notify_all()
        request.session.on_cancel(self.wake)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        if self._refill is not None:
            self._refill.set()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)
        if self._client is not None:
            self._client.close()

    def masks(self) -> dict[str, Any]:
        """The mask pool, for ``/health``: one-session decode sets ready, draws made on the
        spot because none was (``misses``), and the background refill's rate."""
        pool = self._executor.pool
        if pool is None:
            return {}
        ready = pool.available(self._decode_binding) if self._refill is not None else 0
        out = {"mask_sets_ready": ready, "mask_set_misses": pool.misses,
               "mask_sets_per_s": round(pool.rate, 1)}  # fmt: skip
        if pool.failure is not None:
            out["mask_refill_failed"] = pool.failure
        return out

    def _stock_decode_masks(self) -> threading.Event | None:
        """Keep one-session decode steps' mask sets drawn ahead, in batches, from a thread
        (the offline work: pads and the corrections ``W·r``, one GEMM per layer per batch),
        so a step takes a set instead of drawing one. A decode step's masked values do not
        grow with the cache, so one stock serves every step; prefills (their lengths vary)
        and batched steps draw on the spot."""
        pool = self._executor.pool
        token = self.plan.token_input
        dims = self.plan.input_dims.get(token, []) if token is not None else []
        names = [d for d in dims if isinstance(d, str) and d.isidentifier()]
        if pool is None or not names:
            return None
        self._decode_binding = dict.fromkeys(names, 1)  # one row, one new token
        try:
            return pool.refill_in_background(self._decode_binding, MASK_STOCK, MASK_BATCH)
        except ValueError:  # its sets depend on the context length (secureinfer): none stocked
            return None

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._running:
                    self._cond.wait()
                new, self._pending = self._pending, []
                closed = self._closed
            if closed:
                stopping = APIError(503, "the server is stopping", type="server_error")
                for run in [*self._running, *map(self._start, new)]:
                    self._end(run, stopping)
                return
            self._starting = [self._start(request) for request in new]
            try:
                self._turn()
            except Exception as exc:  # a bug: every session in flight ends with it
                everyone = [*self._running, *self._starting]
                self._running, self._starting = [], []
                try:
                    self._release(everyone)
                except Exception:  # the stream is given up below: the worker frees them
                    self._reset()
                error = api_error(exc)
                for run in everyone:
                    self._end(run, error)

    def _turn(self) -> None:
        self._drop_cancelled()
        for run in self._starting:
            if run.request.session.cancelled.is_set():
                self._end(run, _cancelled())
        starting = [run for run in self._starting if not run.ended]
        for batch in self._prefill_groups(starting):
            if self._call(batch, prefill=True):
                self._running.extend(batch)
            # a session may have finished on its first token: it ends now, and takes no
            # further step (nor the fate of a later group's failure)
            self._drop_finished()
        self._starting = []
        self._drop_dead()
        if not self._running:
            return
        if self.plan.padding is None:  # no way to pad: only equal lengths share a call
            groups: dict[int, list[_Running]] = {}
            for run in self._running:
                groups.setdefault(run.length, []).append(run)
            batches = list(groups.values())
        else:
            batches = [list(self._running)]
        for batch in batches:  # a failed call may have ended the sessions of later ones
            self._call([r for r in batch if r in self._running and not r.ended], prefill=False)
            self._drop_finished()
        self.steps += 1

    def _prefill_groups(self, runs: list[_Running]) -> list[list[_Running]]:
        """The new sessions in groups prefilled together. A row's left pad stays in its cache
        and counts against the context, so a prompt joins a group only if the group's longest
        prompt plus its own answer fits the context, and only if its pad is at most its own
        length or 16 (the pad's bytes and work are the row's, and stay bounded)."""
        if self.plan.padding is None:  # rows of different lengths cannot share a call
            return [[run] for run in runs]
        context = self.model.context
        groups: list[list[_Running]] = []
        for run in sorted(runs, key=lambda r: -int(r.request.ids.shape[1])):
            n = int(run.request.ids.shape[1])
            for group in groups:
                longest = int(group[0].request.ids.shape[1])  # sorted: the first is longest
                if longest + run.request.max_new <= context and longest - n <= max(16, n):
                    group.append(run)
                    break
            else:
                groups.append([run])
        return groups

    def _start(self, request: Request) -> _Running:
        """The request's running state; one that cannot start is ended at once (400)."""
        try:
            if request.ids.dim() != 2 or request.ids.shape[0] != 1 or request.ids.shape[1] < 1:
                raise InputError("the prompt must be one row of at least one token")
            job = request.job
            return _Running(
                request,
                Sampler(job.temperature, job.top_p, sampling_rng(job.seed)),
                Detokenizer(self.model.tokenizer, job.stop),
            )
        except Exception as exc:
            run = _Running(request, None, None, finish="error")
            self._end(run, api_error(InputError(str(exc))) if isinstance(exc, ValueError)
                      else api_error(exc))  # fmt: skip
            return run

    def _drop_dead(self) -> None:
        """End the sessions whose cache is on a stream given up since (502); one that had
        finished already ends as it finished."""
        live = self._live()
        dead = [r for r in self._running if r.client is not live]
        if dead:
            self._running = [r for r in self._running if r not in dead]
            error = api_error(WorkerError("the GPU worker's stream holding the cache was lost"))
            for run in dead:
                self._end(run, None if run.finish not in (None, "error") else error)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._running if r.request.session.cancelled.is_set()]
        if gone:
            self._running = [r for r in self._running if r not in gone]
            self._release(gone)
            for run in gone:
                self._end(run, _cancelled())

    def _drop_finished(self) -> None:
        done = [r for r in self._running if r.finish is not None or r.ended]
        if done:
            self._running = [r for r in self._running if r not in done]
            self._release([r for r in done if not r.ended])
            for run in done:
                self._end(run)

    # -- one call ------------------------------------------------------------------------------

    def _client_now(self) -> WorkerClient:
        if self._live() is None:
            self._reset()
            self._client = self.model.client(f"engine-{secrets.token_hex(8)}")
            self._executor.runner = self._client
        return self._client

    def _live(self) -> WorkerClient | None:
        """The worker stream, unless there is none or it was given up."""
        return self._client if self._client is not None and not self._client.broken else None

    def _broken(self) -> bool:
        return self._client is not None and self._client.broken

    def _reset(self) -> None:
        """Give the worker stream up: the worker frees every row it held for it."""
        if self._client is not None:
            self._client.close()
        self._client = None

    def _call(self, batch: list[_Running], *, prefill: bool, again: bool = False) -> bool:
        """One executor call for ``batch`` (a prompt, or one decode step of every row), and
        each row's next token; False when it failed (the sessions it failed are ended)."""
        if not batch:
            return True
        try:
            client = self._client_now()
            before = (client.bytes_sent, client.bytes_received)
            args, public = self._inputs(batch, prefill)
            out = self._executor.run(args, {}, public_tokens=public, rows=[r.row for r in batch])
        except Exception as exc:
            if isinstance(exc, InputError) and prefill and len(batch) > 1:
                # one prompt the program refuses must not fail the others prefilled with it;
                # one retried on a stream given up since is ended by _drop_dead
                self._release(batch)
                batch[:] = [run for run in batch if self._call([run], prefill=True)]
                return bool(batch)
            if prefill and not again and isinstance(exc, WorkerError) and self._broken():
                # the stream died (a worker restarted while idle shows it only now): a prompt
                # holds no cache on it yet, so it is tried once more on a new stream
                self._reset()
                self._drop_dead()
                return self._call(batch, prefill=True, again=True)
            self._failed(batch, exc)
            return False
        share = len(batch)
        for run in batch:
            run.sent += (client.bytes_sent - before[0]) / share
            run.received += (client.bytes_received - before[1]) / share
        if prefill:
            account = self._executor.last_request
            for i, run in enumerate(batch):
                run.client = client
                run.account = {k: v for k, v in account.items() if k != "epsilon_rows"}
                if "epsilon_rows" in account:
                    run.account["epsilon"] = account["epsilon_rows"][i]
        logits = out[0][:, -1]
        for i, run in enumerate(batch):
            for k, spec in enumerate(self._specs):
                if spec.holder is None:
                    refill = out[spec.output].narrow(0, i, 1)
                    run.past[k] = torch.cat([run.past[k], refill], spec.dim)
            run.length += int(out[self._specs[0].output].shape[self._specs[0].dim])
            try:
                self._advance(run, int(run.sampler(logits[i : i + 1])[0]))
            except Exception as exc:  # the detokenizer, sampler or emit on this row's values
                run.finish = "error"
                self._release([run])
                self._end(run, api_error(exc))
        if prefill:
            batch[:] = [run for run in batch if not run.ended]
        return True

    def _inputs(
        self, batch: list[_Running], prefill: bool
    ) -> tuple[tuple[Any, ...], bool | torch.Tensor]:
        """The decoder step's arguments for ``batch``, and which token positions are public."""
        plan = self.plan
        public: bool | torch.Tensor
        if prefill:
            longest = max(int(r.request.ids.shape[1]) for r in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            public = torch.ones(len(batch), longest, dtype=torch.bool)
            for i, run in enumerate(batch):
                given = run.request.ids[0]
                run.pad = longest - len(given)
                ids[i, run.pad :] = given  # the pad (token 0) is masked by the step
                mask = run.request.public
                public[i, run.pad :] = mask[0] if mask is not None else False
                run.past = self._empty(1)  # the caches the enclave keeps grow from here
            past = self._empty(len(batch))
            padding = torch.tensor([[r.pad] for r in batch], dtype=torch.long)
        else:
            ids = torch.tensor([[r.token] for r in batch], dtype=torch.long)
            public = True  # generated tokens: the GPU computed the logits they came from
            length = max(r.length for r in batch)
            padding = torch.tensor([[r.pad + length - r.length] for r in batch], dtype=torch.long)
            past = [
                stand_in(grown(empty.shape, spec.dim, length), empty.dtype)
                if spec.holder is not None  # the GPU holds it: its shape only
                else left_padded([r.past[k] for r in batch], spec.dim, length)
                for k, (empty, spec) in enumerate(
                    zip(self._empty(len(batch)), self._specs, strict=True)
                )
            ]
        if plan.padding is None:
            return (ids, past), public
        return (ids, padding, past), public

    def _empty(self, batch: int) -> list[torch.Tensor]:
        """Empty state inputs (0 long) of ``batch`` rows, in the program's order."""
        return _empty_state(self.plan, batch, torch.device("cpu"))

    def _advance(self, run: _Running, token: int) -> None:
        """Take the row's new token: stream its text, or end the session."""
        run.count += 1
        run.token = token
        emit = run.request.emit
        if token in self.model.eos:
            run.finish = "stop"
        else:
            delta, stopped = run.text.add(token)
            if delta:
                emit(("text", delta))
            if stopped:
                run.finish = "stop"
                return
            if run.count >= run.request.max_new:
                run.finish = "length"
        if run.finish is not None:
            rest, stopped = run.text.flush()
            if rest:
                emit(("text", rest))
            if stopped:
                run.finish = "stop"

    def _failed(self, batch: list[_Running], exc: BaseException) -> None:
        """A call failed: it fails the sessions in it. A reply refused (a worker that lied) or
        a stream that died also gives the stream up, and with it every session whose cache
        it held (:meth:`_drop_dead`); a refusal on a live stream fails the call's sessions
        only."""
        if isinstance(exc, IntegrityError) or self._broken():
            self._reset()
        for run in batch:
            run.finish = "error"
        self._release(batch)
        error = api_error(exc)
        for run in batch:
            self._end(run, error)
        self._drop_dead()

    def _release(self, runs: list[_Running]) -> None:
        """Free the rows of ``runs`` on the worker (best effort: a failure gives the stream
        up, which frees them too)."""
        if self._live() is None:
            return
        try:
            self._executor.release([r.row for r in runs])
        except WorkerError:
            # the stream was given up: the worker dropped everything it held, and the
            # sessions still decoding on it end now (not in a call with a new stream's rows)
            self._drop_dead()

    def _end(self, run: _Running, error: APIError | None = None) -> None:
        """The session's final item, then its slot; once only, and never raising (a
        failure here is the server's, and must not stop the scheduler)."""
        if run.ended:
            return
        run.ended = True
        request = run.request
        try:
            if error is not None:
                request.emit(("error", error))
            else:
                crossed = (round(run.sent), round(run.received))
                account = privacy(run.account, self.model.policy, crossed)
                used = usage(request.ids.shape[1], run.count)
                request.emit(("done", run.finish, used, account))
        except Exception as exc:
            api_error(exc)  # logged, without the request's data
        finally:
            try:
                request.ended()
            except Exception as exc:
                api_error(exc)


class _Unconnected:
    """The executor's runner until the first request connects to the worker."""

    def run(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        raise WorkerError("not connected to the GPU worker")

    def release(self, stage: str, rows: Any) -> None:
        return None


def _cancelled() -> APIError:
    return APIError(499, "the client closed the request", code="cancelled")


__all__ = ["Engine", "Request"]
