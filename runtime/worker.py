"""The GPU worker: loads ``gpu/``, runs GPU stages for any number of enclave drivers.

Reads a saved bundle's ``gpu/`` (and the hashes in ``plan.json``; nothing from ``enclave/``);
serves the KServe v2 / Open Inference Protocol over gRPC (:mod:`runtime.kserve`) on a Unix
socket or TCP, with TLS and a bearer token when configured. Each GPU stage is a model; a
request's inputs are checked (names, count, dtypes, ranks, sizes in the program's ranges)
against the stage's signature and answered with the outputs, or with an error naming the stage
and the input at fault. A ``ModelStreamInfer`` stream is one session: the inputs it last sent
each stage are held for ``teesplit_extends`` and freed when the stream ends. A stage's held
state (a KV cache) is one sequence per stream (Triton's ``sequence_id``), or, when a request
names a sequence per row (``teesplit_rows``: an enclave that batches its sessions itself), one
per row, each released by ``teesplit_release`` or with the stream. It counts calls and
time per stage (``ModelStatistics``; the client counts the bytes). Calls that concurrent
sessions make to one stage run as one batch (:mod:`runtime.batching`: a decode step's caches of
different lengths are left-padded), so the statistics' ``execution_count`` counts runs and
``inference_count`` calls. Stages run with torch on CUDA when available (``device="auto"``),
otherwise on the CPU with a warning; ``backend="onnx"`` runs the ``.onnx`` stages under
onnxruntime instead.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from partitioner.bundle import PLAN_FILE, load_stage_modules, onnx_file, read_document, read_plan
from partitioner.ops import prepare_ring_weights
from runtime.batching import Layout, StageBatcher
from runtime.kserve import (
    EXTENDS,
    MAX_MESSAGE,
    NAMES,
    RELEASE,
    ROWS,
    ProtocolError,
    decode,
    target,
    tensor_bytes,
)
from runtime.onnx_stage import onnx_stage
from runtime.state import (
    HeldState,
    RowBatch,
    RowStates,
    StateError,
    is_stand_in,
    row_ids,
    stand_in,
)


class GPUWorker:
    """The stages of one ``gpu/`` bundle and their counters."""

    def __init__(
        self,
        bundle: str | Path,
        backend: str = "torch",
        device: str = "auto",
        *,
        batch_delay: float = 0.02,
        max_batch: int = 64,
    ) -> None:
        root = Path(bundle)
        if root.name == "gpu":
            root = root.parent
        plan = read_plan(root, read_document(root, sides=("gpu",)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cpu":
                warnings.warn(
                    "no CUDA device: the GPU worker runs its stages on the CPU", stacklevel=2
                )
        self.device = torch.device(device)
        # Freivalds bounds a float result's rounding at float32's: TF32 (10-bit mantissas)
        # would be refused as corruption, so it stays off whatever the host's defaults
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.backend = backend
        gpu_stages = [s for s in plan.stages if s.side == "gpu"]
        self.dim_ranges = plan.dim_ranges
        if backend == "onnx":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self.stages: dict[str, Any] = {
                s.name: onnx_stage(
                    root / onnx_file(s.name), providers if device == "cuda" else None
                )
                for s in gpu_stages
            }
        else:
            self.stages = {
                name: prepare_ring_weights(module, self.device)
                for name, module in load_stage_modules(root, plan, "gpu").items()
            }
            for module in self.stages.values():
                # check_inputs holds every request to the plan's signature and ranges first;
                # torch.export's own per-call check (sympy) cost a third of a decode step
                module.validate_inputs = False
        self.signatures: dict[str, list[dict[str, Any]]] = {}
        for stage in gpu_stages:
            edges = [e.to_dict() for e in plan.edges if e.consumer == stage.name]
            self.signatures[stage.name] = sorted(edges, key=lambda e: stage.inputs.index(e["name"]))
        self.version = _version(root)
        self.outputs = {s.name: list(s.outputs) for s in gpu_stages}
        self.output_edges = {
            s.name: [next(e.to_dict() for e in plan.edges if e.producer == s.name and e.name == o)
                     for o in s.outputs]
            for s in gpu_stages
        }  # fmt: skip
        self.held = plan.held()  # per stage, the states it keeps for a session's sequence
        # per stage, inputs an earlier GPU stage produced: a session keeps them (last one each)
        self.resident = plan.resident()
        self.resident_names = set().union(*self.resident.values()) if self.resident else set()
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "seconds": 0.0})
        self.open_sessions = 0  # streams open now: each holds its session's inputs and caches
        self._row_states: list[RowStates] = []  # the row-addressed caches of the open streams
        self.users: dict[str, int] = defaultdict(int)  # per stage, the open streams calling it
        self._lock = threading.Lock()
        # concurrent sessions' calls of a stage run as one batch (runtime.batching)
        self.batchers = {
            s.name: StageBatcher(
                self._runner(s.name),
                Layout.of(
                    [(e["name"], e["shape"]) for e in self.signatures[s.name]],
                    [e["shape"] for e in self.output_edges[s.name]],
                    {slot.input: slot.dim for slot in self.held.get(s.name, [])},
                    plan.padding,
                ),
                expected=lambda name=s.name: max(self.users[name], 1),
                # only a stage holding sessions' caches (a decode step, one call per token)
                # waits for batch-mates: a preset with many stages per token would pay the
                # wait on every call whenever the sessions are out of step
                max_delay=batch_delay if self.held.get(s.name) else 0.0,
                max_rows=max_batch,
            )
            for s in gpu_stages
        }

    def held_sequences(self) -> int:
        """Row-addressed sequences held now, over all open streams."""
        with self._lock:
            return sum(len(states.rows) for states in self._row_states)

    def track(self, states: RowStates, held: bool) -> None:
        with self._lock:
            if held:
                self._row_states.append(states)
            elif states in self._row_states:
                self._row_states.remove(states)

    def _runner(self, stage: str) -> Any:
        module = self.stages[stage]

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.no_grad():  # per thread: the batch may run on another session's
                outs = module(*inputs)
            return list(outs) if isinstance(outs, (list, tuple)) else [outs]

        return run

    def check_inputs(self, stage: str, tensors: list[torch.Tensor]) -> None:
        if stage not in self.stages:
            raise ProtocolError(f"unknown stage {stage!r}; this worker runs {sorted(self.stages)}")
        expected = self.signatures[stage]
        if len(tensors) != len(expected):
            raise ProtocolError(f"stage {stage} takes {len(expected)} inputs, got {len(tensors)}")
        for edge, tensor in zip(expected, tensors, strict=True):
            want = edge["dtype"]
            got = str(tensor.dtype).removeprefix("torch.")
            if want != got or len(edge["shape"]) != tensor.dim():
                raise ProtocolError(
                    f"stage {stage} input {edge['name']}: expected {want} of rank "
                    f"{len(edge['shape'])} {edge['shape']}, got {got} of shape {list(tensor.shape)}"
                )
            for want_dim, got_dim in zip(edge["shape"], tensor.shape, strict=True):
                low, high = (
                    self.dim_ranges.get(want_dim, [0, None])
                    if isinstance(want_dim, str)
                    else (0, None)
                )
                if got_dim < low or (high is not None and got_dim > high):
                    raise ProtocolError(
                        f"stage {stage} input {edge['name']}: {want_dim} = {got_dim} is outside "
                        f"the program's range [{low}, {high}]"
                    )
                if isinstance(want_dim, int) and want_dim != got_dim:
                    raise ProtocolError(
                        f"stage {stage} input {edge['name']}: expected shape {edge['shape']}, "
                        f"got {list(tensor.shape)}"
                    )

    def run(
        self, stage: str, tensors: list[torch.Tensor], state: HeldState | RowBatch | None = None
    ) -> tuple[list[torch.Tensor], float]:
        """Run ``stage``; with ``state``, its held inputs (stand-ins in ``tensors``) are the
        session's tensors, which stay on this device and grow by the stage's refills."""
        self.check_inputs(stage, tensors)
        start = time.perf_counter()
        device = torch.device("cpu") if self.backend == "onnx" else self.device
        inputs = [t if is_stand_in(t) else t.to(device) for t in tensors]
        if state is not None:
            inputs = state.inputs(inputs)
        outs = self.batchers[stage](inputs)
        if state is not None:
            outs = state.keep(inputs, outs)
        outs = [o.cpu() for o in outs]
        return outs, time.perf_counter() - start

    def stand_ins(
        self,
        stage: str,
        given: dict[str, torch.Tensor],
        state: HeldState | RowBatch | None,
        start: bool,
        values: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The stage's inputs from a request that omits some: a held state is a stand-in of
        what the session holds, or (``start``) an empty state shaped from the other inputs'
        sizes; a value an earlier GPU stage produced is the one this session's last call of
        that stage returned (``values``)."""
        signature = self.signatures[stage]
        slots = {slot.input: slot for slot in self.held.get(stage, [])}
        binding: dict[str, int] = {}
        for edge in signature:
            tensor = given.get(edge["name"])
            if tensor is not None and tensor.dim() == len(edge["shape"]):
                for want, got in zip(edge["shape"], tensor.shape, strict=True):
                    if isinstance(want, str):
                        binding.setdefault(want, int(got))
        device = torch.device("cpu") if self.backend == "onnx" else self.device
        out = []
        for i, edge in enumerate(signature):
            if edge["name"] in given:
                out.append(given[edge["name"]])
                continue
            if values is not None and edge["name"] in self.resident.get(stage, ()):
                if edge["name"] not in values:
                    raise ProtocolError(
                        f"stage {stage}: input {edge['name']} is omitted but no stage of this "
                        "session produced it"
                    )
                out.append(values[edge["name"]])
                continue
            slot = slots.get(i)
            if slot is None or state is None:
                raise ProtocolError(f"stage {stage}: input {edge['name']} is missing")
            dtype = getattr(torch, edge["dtype"])
            if start:
                shape = [
                    0 if d == slot.dim else binding.get(s, -1) if isinstance(s, str) else s
                    for d, s in enumerate(edge["shape"])
                ]
                if min(shape) < 0:
                    raise ProtocolError(
                        f"stage {stage}: the other inputs do not size held state {edge['name']} "
                        f"{edge['shape']}"
                    )
            elif (held := state.held_shape(slot)) is not None:
                shape = held
            else:
                raise ProtocolError(
                    f"stage {stage}: held state {edge['name']} is omitted but this session's "
                    "sequence never started on this stage (sequence_start)"
                )
            out.append(stand_in(shape, dtype, device))
        return out

    def record(self, stage: str, seconds: float) -> None:
        with self._lock:
            entry = self.stats[stage]
            entry["calls"] += 1
            entry["seconds"] += seconds


def _version(root: Path) -> str:
    """The model version every stage reports: the plan's sha256, shortened."""
    try:
        return hashlib.sha256((root / PLAN_FILE).read_bytes()).hexdigest()[:16]
    except OSError:
        return "1"


def _extend(
    held: list[torch.Tensor] | None,
    tensors: list[torch.Tensor],
    extends: dict[int, int],
    stage: str,
) -> list[torch.Tensor]:
    """The full inputs of a request whose ``extends`` inputs carry only their new part."""
    tensors = list(tensors)
    for i, dim in extends.items():
        if held is None or not 0 <= i < min(len(held), len(tensors)):
            raise ProtocolError(
                f"stage {stage}: input {i} extends an input this session never sent"
            )
        old, new = held[i], tensors[i]
        if (
            not 0 <= dim < new.dim()
            or old.dim() != new.dim()
            or any(
                a != b
                for d, (a, b) in enumerate(zip(old.shape, new.shape, strict=True))
                if d != dim
            )
        ):
            raise ProtocolError(
                f"stage {stage}: input {i} of shape {list(new.shape)} cannot extend "
                f"{list(old.shape)} along dim {dim}"
            )
        tensors[i] = torch.cat([old, new.to(old.dtype)], dim=dim)
    return tensors


class _Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 ``GRPCInferenceService`` over one :class:`GPUWorker`."""

    def __init__(self, worker: GPUWorker, token: str | None, max_bytes: int) -> None:
        self.worker = worker
        self.token = token
        self.max_bytes = max_bytes
        self.pb = service_pb2

    # -- access ------------------------------------------------------------------------------

    def _authorised(self, context: Any) -> None:
        if self.token is None:
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "the request does not carry the worker's token"
            )

    # -- health and metadata -----------------------------------------------------------------

    def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return self.pb.ModelReadyResponse(ready=request.name in self.worker.stages)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._authorised(context)
        stage = request.name
        if stage not in self.worker.stages:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no GPU stage {stage!r} in this bundle")

        def meta(edge: dict[str, Any]) -> Any:
            return self.pb.ModelMetadataResponse.TensorMetadata(
                name=edge["name"],
                datatype=NAMES[getattr(torch, edge["dtype"])],
                shape=[d if isinstance(d, int) else -1 for d in edge["shape"]],
            )

        return self.pb.ModelMetadataResponse(
            name=stage,
            versions=[self.worker.version],
            platform="teesplit",
            inputs=[meta(e) for e in self.worker.signatures[stage]],
            outputs=[meta(e) for e in self.worker.output_edges[stage]],
        )

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        self._authorised(context)
        if self.worker_token_required(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "stats need the worker's token on TCP")
        pb = self.pb
        with self.worker._lock:
            stats = {k: dict(v) for k, v in self.worker.stats.items()}
        out = []
        for stage, entry in sorted(stats.items()):
            if request.name and request.name != stage:
                continue
            ns = int(entry["seconds"] * 1e9)
            calls = int(entry["calls"])
            duration = pb.StatisticDuration(count=calls, ns=ns)
            out.append(
                pb.ModelStatistics(
                    name=stage,
                    version=self.worker.version,
                    inference_count=calls,
                    # runs of the stage: fewer than calls when sessions' calls were batched
                    execution_count=self.worker.batchers[stage].batches,
                    inference_stats=pb.InferStatistics(success=duration, compute_infer=duration),
                )
            )
        return pb.ModelStatisticsResponse(model_stats=out)

    def worker_token_required(self, context: Any) -> bool:
        """Statistics tell a stranger what runs: on TCP they need the token."""
        return self.token is None and not context.peer().startswith("unix:")

    # -- inference -----------------------------------------------------------------------------

    def ModelInfer(self, request: Any, context: Any) -> Any:
        self._authorised(context)
        try:
            return self._infer(request, None)
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a stage failing is reported to the driver, not fatal
            context.abort(grpc.StatusCode.INTERNAL, f"stage {request.model_name} failed: {exc}")

    def ModelStreamInfer(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        """One session: what it last sent each stage, and the states each stage holds for its
        sequence, are kept until the stream ends."""
        self._authorised(context)
        session = _Session()
        with self.worker._lock:
            self.worker.open_sessions += 1
        try:
            yield from self._stream(requests, session)
        finally:  # the stream ended or was cancelled: the session and what it held go
            with self.worker._lock:
                self.worker.open_sessions -= 1
                for stage in session.stages:
                    self.worker.users[stage] -= 1
            for states in session.rows.values():
                self.worker.track(states, held=False)
            session.rows.clear()

    def _stream(self, requests: Iterator[Any], session: _Session) -> Iterator[Any]:
        pb = self.pb
        for request in requests:
            try:
                if RELEASE in request.parameters:
                    reply = self._release(request, session)
                else:
                    reply = self._infer(request, session)
            except (ProtocolError, StateError) as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=str(exc), infer_response=self._echo(request)
                )
                continue
            except Exception as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=f"stage {request.model_name} failed: {exc}",
                    infer_response=self._echo(request),
                )
                continue
            yield pb.ModelStreamInferResponse(infer_response=reply)
            params = request.parameters
            if "sequence_end" in params and params["sequence_end"].bool_param:
                session.sent.pop(request.model_name, None)  # a sequence is one stage's
                session.states.pop(request.model_name, None)

    def _release(self, request: Any, session: _Session) -> Any:
        """Free the row-addressed sequences a request names, on its stage; an empty reply."""
        stage = request.model_name
        if stage not in self.worker.held:
            raise ProtocolError(f"stage {stage!r} holds no state to release")
        if len(request.inputs) or len(request.raw_input_contents):
            raise ProtocolError(f"stage {stage}: a release carries no tensors")
        ids = row_ids(request.parameters[RELEASE].string_param)
        states = session.rows.get(stage)
        if states is not None:
            states.release(ids)
        return self._echo(request)

    def _echo(self, request: Any) -> Any:
        return self.pb.ModelInferResponse(id=request.id, model_name=request.model_name)

    def _infer(self, request: Any, session: _Session | None) -> Any:
        worker = self.worker
        stage = request.model_name
        if stage not in worker.stages:
            raise ProtocolError(f"no GPU stage {stage!r} in this bundle")
        if len(request.inputs) != len(request.raw_input_contents):
            raise ProtocolError(
                f"stage {stage}: {len(request.inputs)} inputs but "
                f"{len(request.raw_input_contents)} raw payloads"
            )
        names = _sent_names(stage, request, worker, session is not None)
        if session is not None and stage not in session.stages:
            session.stages.add(stage)
            with worker._lock:
                worker.users[stage] += 1
        tensors, extends = [], {}
        for i, (spec, raw) in enumerate(
            zip(request.inputs, request.raw_input_contents, strict=True)
        ):
            tensors.append(decode(spec.name, spec.datatype, spec.shape, raw, self.max_bytes))
            if EXTENDS in spec.parameters:
                extends[i] = int(spec.parameters[EXTENDS].int64_param)
        if extends and session is None:
            raise ProtocolError(f"stage {stage}: extends needs a session (ModelStreamInfer)")
        sent = _extend(
            session.sent.pop(stage, None) if session is not None else None, tensors, extends, stage
        )
        state, start = self._state(request, session, len(names) < len(worker.signatures[stage]))
        inputs = worker.stand_ins(
            stage,
            dict(zip(names, sent, strict=True)),
            state,
            start,
            session.values if session is not None else None,
        )
        if isinstance(state, RowBatch):
            for edge, tensor in zip(worker.signatures[stage], inputs, strict=True):
                if edge["shape"][:1] == ["batch"] and tensor.shape[0] != len(state.ids):
                    raise ProtocolError(
                        f"stage {stage}: {len(state.ids)} sequences named for {tensor.shape[0]} "
                        f"rows of {edge['name']}"
                    )
        wanted = _wanted(stage, request, worker.outputs[stage])
        try:
            outs, seconds = worker.run(stage, inputs, state)
        except StateError:
            if session is not None and isinstance(state, HeldState):
                session.states.pop(stage, None)
            raise
        if session is not None:
            for name, out in zip(worker.outputs[stage], outs, strict=True):
                if name in worker.resident_names:
                    session.values[name] = out
        size = sum(t.numel() * t.element_size() for t in sent)
        if session is not None and size <= self.max_bytes:
            session.sent[stage] = sent  # what extends may extend: never more than one message
        pb = self.pb
        reply = pb.ModelInferResponse(model_name=stage, model_version=worker.version, id=request.id)
        for name, out in zip(worker.outputs[stage], outs, strict=True):
            if name in wanted:
                reply.outputs.add(name=name, datatype=NAMES[out.dtype], shape=list(out.shape))
                reply.raw_output_contents.append(tensor_bytes(out))
        worker.record(stage, seconds)
        return reply

    def _state(
        self, request: Any, session: _Session | None, omitted: bool
    ) -> tuple[HeldState | RowBatch | None, bool]:
        """The stage's held state for this request's sequence (or its rows' sequences), and
        whether it starts them."""
        stage = request.model_name
        slots = self.worker.held.get(stage)
        params = request.parameters
        if not slots or session is None:
            if ROWS in params:
                raise ProtocolError(
                    f"stage {stage}: {ROWS} needs a stage that holds state, "
                    "in a session (ModelStreamInfer)"
                )
            return None, False
        start = "sequence_start" in params and params["sequence_start"].bool_param
        if ROWS in params:
            states = session.rows.get(stage)
            if states is None:
                states = session.rows[stage] = RowStates(stage, slots)
                self.worker.track(states, held=True)
            return states.batch(row_ids(params[ROWS].string_param), start), start
        sequence = params["sequence_id"].string_param if "sequence_id" in params else ""
        if start:
            if not sequence:
                raise ProtocolError(f"stage {stage}: sequence_start without a sequence_id")
            session.states[stage] = (sequence, HeldState(stage, slots))
        current = session.states.get(stage)
        if current is None or current[0] != sequence:
            if omitted:
                raise ProtocolError(
                    f"stage {stage}: sequence {sequence!r} was not started in this session; "
                    "its held state cannot be omitted"
                )
            return None, False
        return current[1], start


class _Session:
    """What one ``ModelStreamInfer`` stream holds: per stage, the inputs it last sent (for
    ``teesplit_extends``) and its sequence's held state; the last value of each output that a
    later GPU stage reads."""

    def __init__(self) -> None:
        self.sent: dict[str, list[torch.Tensor]] = {}
        self.states: dict[str, tuple[str, HeldState]] = {}
        self.values: dict[str, torch.Tensor] = {}  # GPU-produced values later stages read
        self.rows: dict[str, RowStates] = {}  # per stage, its row-addressed sequences
        self.stages: set[str] = set()  # the stages it called: the batchers expect it there


def _sent_names(stage: str, request: Any, worker: GPUWorker, stream: bool) -> list[str]:
    """The request's input names: the stage's inputs in order, less (in a session) held
    states the stage keeps and values an earlier GPU stage of the session produced."""
    signature = [e["name"] for e in worker.signatures[stage]]
    held = {signature[slot.input] for slot in worker.held.get(stage, [])} if stream else set()
    if stream:
        held |= worker.resident.get(stage, set())
    names = [spec.name for spec in request.inputs]
    expected = iter(signature)
    for i, name in enumerate(names):
        for want in expected:
            if want == name:
                break
            if want not in held:
                raise ProtocolError(f"stage {stage} input {i} is {want}, not {name!r}")
        else:
            raise ProtocolError(f"stage {stage} input {i}: {name!r} is not an input of the stage")
    missing = [n for n in signature if n not in names and n not in held]
    if missing or len(names) > len(signature):
        raise ProtocolError(
            f"stage {stage} takes {len(signature)} inputs ({signature}), got {names}"
        )
    return names


def _wanted(stage: str, request: Any, outputs: list[str]) -> set[str]:
    """The outputs a request asks for (KServe ``outputs``; none named: all of them)."""
    asked = [o.name for o in request.outputs]
    unknown = sorted(set(asked) - set(outputs))
    if unknown:
        raise ProtocolError(f"stage {stage} has no outputs {unknown}; it returns {outputs}")
    return set(asked) if asked else set(outputs)


class WorkerServer:
    """A started gRPC server for one worker; ``port`` is the bound TCP port (0 on Unix)."""

    def __init__(self, server: grpc.Server, port: int) -> None:
        self.server = server
        self.port = port

    def serve_forever(self) -> None:
        self.server.wait_for_termination()

    def shutdown(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()

    def server_close(self) -> None:
        self.shutdown()


def serve(
    worker: GPUWorker,
    address: str,
    *,
    token: str | None = None,
    max_connections: int = 64,
    max_frame_bytes: int = MAX_MESSAGE,
    tls: tuple[bytes, bytes] | None = None,
) -> WorkerServer:
    """Start serving ``worker`` at ``address`` (``unix:/path`` or ``host:port``).

    ``token`` (required of every request when set: ``authorization: Bearer TOKEN``) is a
    shared secret for TCP deployments; without it, statistics are served on Unix sockets only.
    ``tls`` is ``(certificate chain, private key)`` in PEM. At most ``max_connections``
    concurrent calls (streams count one each); a message over ``max_frame_bytes`` is refused
    by gRPC before it is read.
    """
    options = [
        ("grpc.max_receive_message_length", max_frame_bytes),
        ("grpc.max_send_message_length", max_frame_bytes),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_connections),
        options=options,
        maximum_concurrent_rpcs=max_connections,
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _Service(worker, token, max_frame_bytes), server
    )
    address = target(address)
    if address.startswith("unix:"):
        Path(address.removeprefix("unix:")).unlink(missing_ok=True)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot listen on {address}")
    server.start()
    return WorkerServer(server, port if not address.startswith("unix:") else 0)


__all__ = ["GPUWorker", "WorkerServer", "serve"]
