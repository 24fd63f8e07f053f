"""The enclave driver: runs the enclave side of a saved program and calls the GPU worker.

Reads ``DIR/plan.json`` and ``DIR/enclave`` only (``load_program(dir, gpu=False)``). The
:class:`WorkerClient` is the executor's :class:`~enclave_runtime.executor.StageRunner` for the
GPU stages: it sends a stage's (masked) inputs to the worker and returns its outputs, so the
same executor that runs in one process drives the two: masks, unmasks, corrections and
Freivalds checks all stay in this process.
The two speak KServe v2 gRPC (:mod:`runtime.kserve`). A worker that dies, hangs past
``timeout`` seconds, or answers with an error makes the request fail with a
:class:`WorkerError` naming the stage; nothing blocks forever.
"""

from __future__ import annotations

import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from enclave_runtime.executor import Executor, Expected
from partitioner.bundle import load_program
from partitioner.errors import TeesplitError
from partitioner.plan import HeldSlot, Plan
from runtime.kserve import (
    DATATYPES,
    EXTENDS,
    MAX_MESSAGE,
    NAMES,
    RELEASE,
    ROWS,
    ProtocolError,
    decode,
    sequence_parameters,
    service,
    target,
    tensor_bytes,
)
from runtime.state import grown, is_stand_in, stand_in

SESSION_HEADER = "teesplit-session"


class WorkerError(TeesplitError):
    """The GPU worker failed, closed the connection, or did not answer in time."""


def grown_dim(old: torch.Tensor, new: torch.Tensor) -> int | None:
    """The dim along which ``new`` is ``old`` plus more (a cache one step longer), else None.

    The worker saw ``old`` already, so sending only the rest reveals nothing new; a masked
    cache is re-masked on every step, so its prefix differs and it is sent whole.
    """
    if old.dtype != new.dtype or old.dim() != new.dim():
        return None
    grown = [d for d, (a, b) in enumerate(zip(old.shape, new.shape, strict=True)) if a != b]
    if len(grown) != 1 or old.shape[grown[0]] == 0 or new.shape[grown[0]] < old.shape[grown[0]]:
        return None
    dim = grown[0]
    return dim if torch.equal(new.narrow(dim, 0, old.shape[dim]), old) else None


class WorkerClient:
    """One session with a GPU worker over KServe v2 gRPC: the executor's
    :class:`StageRunner` for GPU stages.

    The session is one bidirectional ``ModelStreamInfer`` stream (opened at the first call,
    ``sequence_id`` random, ``sequence_start`` on its first request): the worker holds what the
    session last sent each stage, so a grown KV cache travels as its new positions only
    (``teesplit_extends``), and frees it when the stream ends (:meth:`close`).

    What the worker sends is checked against what was asked, and the session is given up at
    the first doubt: each request has an id and one deadline (``timeout`` seconds for the
    whole round trip); the reply must name the same id and stage, its tensors the names,
    datatypes and shapes the plan gives and payloads of exactly their size. Any error or
    timeout cancels the stream and every later call fails: a late answer to one request is
    never read as the answer to the next. A lock serialises requests. ``token`` is sent as
    ``authorization: Bearer``; ``tls_root`` (PEM) makes the channel TLS, verified against it.
    ``extends=False`` sends every input whole (a server that holds nothing: Triton).

    ``held`` (``Plan.held()``) names the states a stage keeps: given their stand-ins
    (``runtime.state``), the client sends neither them nor asks for their refills (KServe
    ``outputs``); a 0-long state starts a sequence on that stage (a new ``sequence_id``,
    ``sequence_start``, as Triton's implicit state expects), and a stand-in whose length is not
    what the worker holds is refused before anything is sent. A call given ``rows`` (one
    sequence id per batch row) continues or starts one sequence per row instead
    (``teesplit_rows``: the worker left-pads the rows' caches to the longest), and
    :meth:`release` frees rows. ``outputs`` are the stages'
    output names (the plan's), by which the reply is read. ``session`` (default: random) is
    the id sent as the ``teesplit-session`` header, which a load balancer may hash on.
    ``resident`` (``Plan.resident()``) names inputs an earlier GPU stage produced: our worker
    keeps them for the session, so they are not sent back up (the enclave keeps its copy for
    its checks); ``passing`` (``Plan.passing()``) names outputs only unchecked later GPU
    stages read, which are not asked for; ``extends=False`` sends and asks for both (Triton
    keeps nothing across models).
    """

    # the tensors it is handed are serialised into the request and never written: the
    # executor need not copy them before a call (``StageRunner``)
    copies_inputs = True

    def __init__(
        self,
        address: str,
        timeout: float = 60.0,
        token: str | None = None,
        *,
        tls_root: bytes | None = None,
        max_message: int = MAX_MESSAGE,
        inputs: dict[str, list[str]] | None = None,
        extends: bool = True,
        outputs: dict[str, list[str]] | None = None,
        held: dict[str, list[HeldSlot]] | None = None,
        session: str | None = None,
        resident: dict[str, set[str]] | None = None,
        passing: dict[str, set[str]] | None = None,
    ) -> None:
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise WorkerError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
        try:
            grpc_target = target(address)
        except ProtocolError as exc:
            raise WorkerError(str(exc)) from None
        self.address = address
        self.timeout = float(timeout)
        self.token = token
        self.pb, service_grpc = service()
        options = [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
        if tls_root is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root)
            self.channel = grpc.secure_channel(grpc_target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(grpc_target, options=options)
        self.stub = service_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        try:
            self.stub.ServerLive(
                self.pb.ServerLiveRequest(), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            self.channel.close()
            raise WorkerError(
                f"cannot reach the GPU worker at {address}: {exc.code().name}: {exc.details()}"
            ) from None
        self.extends = extends  # Triton does not hold inputs: send them whole
        self.session = session if session is not None else secrets.token_hex(8)
        # per GPU stage, its inputs' names in the plan (the tensor names the worker checks)
        self._names = {stage: dict(enumerate(names)) for stage, names in (inputs or {}).items()}
        self._lock = threading.Lock()
        self._next_id = 0
        self._broken: str | None = None
        self._stream: Any = None
        self._requests: queue.Queue[Any] = queue.Queue()
        self._replies: queue.Queue[Any] = queue.Queue()
        # tensor payload bytes each way, and whole messages as serialised (names, shapes, ids)
        self.bytes_sent = self.bytes_received = 0
        self.wire_bytes_sent = self.wire_bytes_received = 0
        self._last: dict[str, list[torch.Tensor]] = {}  # per stage: the inputs the worker holds
        self._outputs = outputs or {}
        self._held = held or {}
        # per stage, the indices of inputs an earlier GPU stage produced: our worker has them
        self._resident = {
            stage: {i for i, n in self._names.get(stage, {}).items() if n in names}
            for stage, names in (resident or {}).items()
        }
        # per stage, the indices of outputs only unchecked later GPU stages read: not asked for
        self._passing = {
            stage: {i for i, n in enumerate(self._outputs.get(stage, [])) if n in names}
            for stage, names in (passing or {}).items()
        }
        # per stage with held state: its sequence's id, and the shape the worker holds per slot
        self._sequences: dict[str, tuple[str, dict[int, list[int]]]] = {}
        # per stage, its row-addressed sequences: id -> the length held, per slot
        self._rows: dict[str, dict[str, dict[int, int]]] = {}

    def _open(self) -> None:
        """The session's stream and the thread that queues its replies."""
        # the session id as a header too: a load balancer hashing on it sends every stream of
        # the session to the worker that holds its state
        self._stream = self.stub.ModelStreamInfer(
            iter(self._requests.get, None),
            metadata=[*self.metadata, (SESSION_HEADER, self.session)],
        )

        def read() -> None:
            try:
                for reply in self._stream:
                    self._replies.put(reply)
                self._replies.put(WorkerError("the GPU worker ended the session"))
            except grpc.RpcError as exc:
                self._replies.put(
                    WorkerError(f"{exc.code().name}: {exc.details()}")
                    if exc.code() != grpc.StatusCode.CANCELLED
                    else WorkerError("the session was cancelled")
                )

        threading.Thread(target=read, daemon=True, name="teesplit-kserve-reader").start()

    def _fail(self, why: str) -> WorkerError:
        """Give the session up: nothing more is read from it."""
        self._broken = why
        self._last.clear()
        if self._stream is not None:
            self._stream.cancel()
        self._requests.put(None)
        return WorkerError(why)

    def run(
        self,
        stage: str,
        tensors: list[torch.Tensor],
        expected: Expected | None = None,
        end: bool = False,
        rows: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """One stage call. An input that extends what the worker already holds for the same
        slot (a KV cache one step longer) is sent as its new part only (``extends``); a state
        the stage holds is not sent at all, and ``end`` ends its sequence (``sequence_end``).
        ``rows``: the sequence of each batch row, on a stage that holds state."""
        with self._lock:
            self._check_open()
            slots = self._held.get(stage, [])
            if rows is not None and not slots:
                raise WorkerError(f"stage {stage} holds no state: its rows name no sequences")
            if rows is not None:
                omitted, start = self._row_inputs(stage, tensors, list(rows))
            else:
                omitted, start = self._held_inputs(stage, tensors) if slots else (set(), False)
            if self.extends:  # a server that keeps what the session computed: our worker
                omitted = omitted | self._resident.get(stage, set())
            self._next_id += 1
            request, sent = self._request(
                stage, tensors, str(self._next_id), omitted, start, end and bool(slots), rows
            )
            reply = self._roundtrip(stage, request)
            try:
                outs = self._read(reply, stage, str(self._next_id), expected)
            except ProtocolError as exc:
                raise self._fail(
                    f"GPU worker at {self.address} failed on stage {stage}: {exc}"
                ) from None
            if outs is None:  # the worker refused the request; it dropped its copies too
                self._last.pop(stage, None)
                if rows is None:
                    self._sequences.pop(stage, None)
                raise WorkerError(f"GPU worker refused stage {stage}: {reply.error_message}")
            self._last[stage] = sent
            outs = self._kept(stage, tensors, outs, expected, rows)
            if slots and rows is None:
                if end:
                    self._sequences.pop(stage, None)
                    self._last.pop(stage, None)
        self.bytes_received += sum(len(b) for b in reply.infer_response.raw_output_contents)
        self.wire_bytes_received += reply.ByteSize()
        return outs

    def _check_open(self) -> None:
        if self._broken is not None:
            raise WorkerError(
                f"the session with the GPU worker at {self.address} was closed after an "
                f"earlier failure ({self._broken})"
            )
        if self._stream is None:
            self._open()

    @property
    def broken(self) -> bool:
        """Whether the session was given up (every later call fails)."""
        return self._broken is not None

    def _roundtrip(self, stage: str, request: Any) -> Any:
        """Send ``request`` and wait for its reply, within the timeout (lock held)."""
        deadline = time.monotonic() + self.timeout
        self._requests.put(request)
        self.bytes_sent += sum(len(b) for b in request.raw_input_contents)
        self.wire_bytes_sent += request.ByteSize()
        try:
            reply = self._replies.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise self._fail(
                f"GPU worker at {self.address} did not answer stage {stage} within "
                f"{self.timeout:g} s"
            ) from None
        if isinstance(reply, WorkerError):
            raise self._fail(f"GPU worker at {self.address} failed on stage {stage}: {reply}")
        return reply

    def release(self, stage: str, rows: Sequence[str]) -> None:
        """Free row-addressed sequences of ``stage`` on the worker now (a session that
        finished or was cancelled). Nothing to do once the session is closed: the worker
        freed everything with the stream."""
        with self._lock:
            held = self._rows.get(stage, {})
            rows = [row for row in rows if held.pop(row, None) is not None]
            if not rows or self._broken is not None or self._stream is None:
                return
            self._next_id += 1
            request = self.pb.ModelInferRequest(model_name=stage, id=str(self._next_id))
            request.parameters[RELEASE].string_param = ",".join(rows)
            reply = self._roundtrip(stage, request)
            response = reply.infer_response
            if response.id != str(self._next_id) or response.model_name != stage:
                raise self._fail(f"GPU worker at {self.address} answered a release out of turn")
            if reply.error_message:
                raise self._fail(
                    f"GPU worker at {self.address} refused to release on stage {stage}: "
                    f"{reply.error_message}"
                )
        self.wire_bytes_received += reply.ByteSize()

    def _row_inputs(
        self, stage: str, tensors: list[torch.Tensor], rows: list[str]
    ) -> tuple[set[int], bool]:
        """As :meth:`_held_inputs`, for a call with one sequence per row: either every row
        starts (0-long stand-ins) or every row continues, the stand-ins as long as the longest
        row the worker holds."""
        held = self._rows.setdefault(stage, {})
        if len(set(rows)) != len(rows):
            raise WorkerError(f"stage {stage}: a sequence names two rows")
        omitted: set[int] = set()
        starts = []
        for slot in self._held[stage]:
            tensor = tensors[slot.input]
            if not is_stand_in(tensor) or tensor.shape[0] != len(rows):
                raise WorkerError(
                    f"stage {stage} keeps {slot.state} on the GPU worker: pass a stand-in "
                    f"of {len(rows)} rows, one per sequence named"
                )
            omitted.add(slot.input)
            starts.append(tensor.shape[slot.dim] == 0)
            if not tensor.shape[slot.dim]:
                continue
            lengths = [held.get(row, {}).get(slot.input) for row in rows]
            if None in lengths or tensor.shape[slot.dim] != max(lengths):
                raise WorkerError(
                    f"stage {stage}: the worker holds {slot.state} of lengths {lengths} for "
                    f"these rows, the call says {tensor.shape[slot.dim]}"
                )
        start = all(starts)
        if any(starts) and not start:
            raise WorkerError(f"stage {stage}: some of its held states are empty, some not")
        if start and any(row in held for row in rows):
            raise WorkerError(f"stage {stage}: a row's sequence was started already")
        return omitted, start

    def _held_inputs(self, stage: str, tensors: list[torch.Tensor]) -> tuple[set[int], bool]:
        """The held inputs not to send (stand-ins), and whether this call starts the stage's
        sequence; refuses a stand-in whose shape is not what the worker holds."""
        omitted: set[int] = set()
        starts = []
        for slot in self._held[stage]:
            tensor = tensors[slot.input]
            if not is_stand_in(tensor):
                raise WorkerError(
                    f"stage {stage} keeps {slot.state} on the GPU worker: pass a stand-in "
                    "of its shape (runtime.state.stand_in), empty to start a sequence"
                )
            omitted.add(slot.input)
            starts.append(tensor.shape[slot.dim] == 0)
        start = any(starts)
        if start and not all(starts):
            raise WorkerError(f"stage {stage}: some of its held states are empty, some not")
        if start:
            self._sequences[stage] = (secrets.token_hex(8), {})
        else:
            _, shapes = self._sequences.get(stage, ("", {}))
            for i in omitted:
                if shapes.get(i) != list(tensors[i].shape):
                    raise WorkerError(
                        f"stage {stage}: the worker holds {self._names.get(stage, {}).get(i, i)} "
                        f"of shape {shapes.get(i)}, the call says {list(tensors[i].shape)}"
                    )
        return omitted, start

    def _kept(
        self,
        stage: str,
        tensors: list[torch.Tensor],
        outs: list[torch.Tensor],
        expected: Expected | None,
        rows: list[str] | None = None,
    ) -> list[torch.Tensor]:
        """The reply's outputs with a stand-in in the place of each output not asked for (a
        held refill, a value only the worker needs); records the shapes the worker now holds."""
        full = list(outs)
        for i in sorted(self._skipped(stage)):
            want = expected[i] if expected is not None else None
            if want is None or want[1] is None:
                raise WorkerError(f"stage {stage}: output {i} was not asked for: no known shape")
            full.insert(i, stand_in(want[1], want[0]))
        if rows is not None:
            held = self._rows.setdefault(stage, {})
            for row in rows:
                lengths = held.setdefault(row, {})
                for slot in self._held[stage]:
                    more = full[slot.output].shape[slot.dim]
                    lengths[slot.input] = lengths.get(slot.input, 0) + more
        elif self._held.get(stage):
            _, shapes = self._sequences.setdefault(stage, (secrets.token_hex(8), {}))
            for slot in self._held[stage]:
                more = full[slot.output].shape[slot.dim]
                shapes[slot.input] = grown(tensors[slot.input].shape, slot.dim, more)
        return full

    def _skipped(self, stage: str) -> set[int]:
        """The stage's outputs not asked for: held refills, and (our worker) passing values."""
        held = {slot.output for slot in self._held.get(stage, [])}
        return held | self._passing.get(stage, set()) if self.extends else held

    def _request(
        self,
        stage: str,
        tensors: list[torch.Tensor],
        request_id: str,
        omitted: set[int],
        start: bool,
        end: bool,
        rows: Sequence[str] | None = None,
    ) -> tuple[Any, list[torch.Tensor]]:
        """The request, and the tensors it stands for (what ``extends`` may extend next)."""
        request = self.pb.ModelInferRequest(model_name=stage, id=request_id)
        if rows is not None:
            sequence_parameters(request.parameters, self.session, start, False)
            request.parameters[ROWS].string_param = ",".join(rows)
        elif stage in self._sequences:
            sequence_parameters(request.parameters, self._sequences[stage][0], start, end)
        else:
            sequence_parameters(request.parameters, self.session, self._next_id == 1, False)
        skipped = self._skipped(stage)
        if skipped:
            for i, name in enumerate(self._outputs.get(stage, [])):
                if i not in skipped:
                    request.outputs.add(name=name)
        held = self._last.get(stage, ())
        sent = [t for i, t in enumerate(tensors) if i not in omitted]
        names = [n for i, n in sorted(self._names.get(stage, {}).items()) if i not in omitted]
        for i, tensor in enumerate(sent):
            payload = tensor
            dim = grown_dim(held[i], tensor) if self.extends and i < len(held) else None
            spec = request.inputs.add(name=names[i] if i < len(names) else f"input_{i}")
            if dim is not None:
                begin = held[i].shape[dim]
                payload = tensor.narrow(dim, begin, tensor.shape[dim] - begin)
                spec.parameters[EXTENDS].int64_param = dim
            if payload.dtype not in NAMES:
                raise WorkerError(f"stage {stage} input {i}: {payload.dtype} cannot be sent")
            spec.datatype = NAMES[payload.dtype]
            spec.shape.extend(payload.shape)
            request.raw_input_contents.append(tensor_bytes(payload))
        return request, sent

    def _read(
        self, reply: Any, stage: str, request_id: str, expected: Expected | None
    ) -> list[torch.Tensor] | None:
        """The reply's tensors, checked; None when it is the worker's refusal of the request.
        Held refills are not in the reply (they were not asked for)."""
        response = reply.infer_response
        if response.id != request_id or response.model_name != stage:
            said = f" with the error {reply.error_message!r}" if reply.error_message else ""
            raise ProtocolError(
                f"the reply names request {response.id!r} of stage {response.model_name!r}, "
                f"not request {request_id} of stage {stage}{said}"
            )
        if reply.error_message:
            if len(response.raw_output_contents) or len(response.outputs):
                raise ProtocolError("an error reply carries tensors")
            return None
        if len(response.outputs) != len(response.raw_output_contents):
            raise ProtocolError(
                f"the reply has {len(response.outputs)} outputs but "
                f"{len(response.raw_output_contents)} payloads"
            )
        kept = self._skipped(stage)
        names = self._outputs.get(stage)
        wanted = [i for i in range(len(expected) if expected is not None else 0) if i not in kept]
        if expected is not None and len(response.outputs) != len(wanted):
            raise ProtocolError(
                f"the reply has {len(response.outputs)} tensors, stage {stage} returns "
                f"{len(wanted)}"
            )
        outs = []
        for j, (spec, raw) in enumerate(
            zip(response.outputs, response.raw_output_contents, strict=True)
        ):
            i = wanted[j] if expected is not None else j
            if names is not None and i < len(names) and spec.name != names[i]:
                raise ProtocolError(f"output {j} is {spec.name!r}, the plan says {names[i]}")
            if expected is not None:
                want, want_shape = expected[i]
                got = DATATYPES.get(spec.datatype)
                if got != want or (want_shape is not None and list(spec.shape) != list(want_shape)):
                    raise ProtocolError(
                        f"output {i} is {spec.datatype} {list(spec.shape)}, the plan says "
                        f"{want} {want_shape}"
                    )
            outs.append(decode(f"output {i}", spec.datatype, spec.shape, raw))
        return outs

    def stats(self) -> dict[str, Any]:
        """Per stage: calls and seconds (the worker's ``ModelStatistics``)."""
        with self._lock:
            if self._broken is not None:
                raise WorkerError("the session was closed after an earlier failure")
            try:
                response = self.stub.ModelStatistics(
                    self.pb.ModelStatisticsRequest(), timeout=self.timeout, metadata=self.metadata
                )
            except grpc.RpcError as exc:
                raise WorkerError(
                    f"GPU worker refused stats: {exc.code().name}: {exc.details()}"
                ) from None
        return {
            m.name: {
                "calls": int(m.inference_count),
                "seconds": m.inference_stats.success.ns / 1e9,
            }
            for m in response.model_stats
        }

    def close(self) -> None:
        """End the session: the stream closes and the worker frees what it held for it."""
        self._rows.clear()
        self._requests.put(None)
        self.channel.close()


def spawn_worker(
    gpu_bundle: str | Path, address: str, backend: str = "torch"
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m runtime GPU_BUNDLE --listen ADDRESS [--backend onnx]`` locally and
    wait until it serves; returns the process and its ready line. The caller kills it."""
    command = [sys.executable, "-m", "runtime", str(gpu_bundle), "--listen", address]
    proc = subprocess.Popen(
        [*command, "--backend", backend],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if "teesplit GPU worker" not in line:
        proc.kill()
        proc.wait()
        raise WorkerError(f"the GPU worker for {gpu_bundle} did not start ({line!r})")
    return proc, line


def worker_client(
    plan: Plan,
    address: str,
    timeout: float = 60.0,
    token: str | None = None,
    *,
    tls_root: bytes | None = None,
    session: str | None = None,
    extends: bool = True,
) -> WorkerClient:
    """A session with the GPU worker at ``address`` for ``plan``'s GPU stages: their tensor
    names, the states they hold and the values that stay on the worker, all from the plan.
    ``extends=False`` for a server that keeps nothing but implicit state (Triton)."""
    gpu = [s for s in plan.stages if s.side == "gpu"]
    return WorkerClient(
        address,
        timeout,
        token,
        tls_root=tls_root,
        inputs={s.name: list(s.inputs) for s in gpu},
        outputs={s.name: list(s.outputs) for s in gpu},
        held=plan.held(),
        session=session,
        resident=plan.resident(),
        passing=plan.passing(),
        extends=extends,
    )


def connect(
    bundle: str | Path,
    worker: str,
    *,
    trusted_key: Any = None,
    allow_unsigned: bool = False,
    timeout: float = 60.0,
    token: str | None = None,
    seed: int | None = None,
    tls_root: bytes | None = None,
    session: str | None = None,
) -> Executor:
    """The saved program at ``bundle`` (enclave side only, its signature checked with
    ``trusted_key``) with its GPU stages served by the worker at ``worker``; the client is the
    executor's ``runner``. ``tls_root`` (PEM) verifies a TLS worker."""
    plan = load_program(bundle, gpu=False, trusted_key=trusted_key, allow_unsigned=allow_unsigned)
    client = worker_client(plan, worker, timeout, token, tls_root=tls_root, session=session)
    return Executor(plan, client, seed=seed)
