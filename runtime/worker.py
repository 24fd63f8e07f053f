"""The GPU worker: loads ``gpu/``, runs GPU stages for any number of enclave drivers.

Reads a saved bundle's ``gpu/`` (and the hashes in ``plan.json``; nothing from ``enclave/``);
serves :mod:`runtime.protocol` frames over a Unix socket or TCP, one thread per connection.
Each ``run`` frame names a stage and carries its inputs; the worker checks their count, dtypes
and ranks against the stage's signature and answers with the outputs or an ``error`` frame that
names the stage and the input at fault. It counts bytes in and out and time per stage
(``stats``). Stages run with torch on CUDA when available (``device="auto"``), otherwise on the
CPU with a warning; ``backend="onnx"`` runs the ``.onnx`` stages under onnxruntime instead.
"""

from __future__ import annotations

import hmac
import socket
import socketserver
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from partitioner.bundle import load_stage_modules, onnx_file, read_document, read_plan
from partitioner.ops import prepare_ring_weights
from runtime.onnx_stage import onnx_stage
from runtime.protocol import (
    DTYPES,
    ERROR,
    RESULT,
    RUN,
    STATS,
    ProtocolError,
    parse_address,
    read_frame,
    send_frame,
)


class GPUWorker:
    """The stages of one ``gpu/`` bundle and their counters."""

    def __init__(self, bundle: str | Path, backend: str = "torch", device: str = "auto") -> None:
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
        self.signatures: dict[str, list[dict[str, Any]]] = {}
        for stage in gpu_stages:
            edges = [e.to_dict() for e in plan.edges if e.consumer == stage.name]
            self.signatures[stage.name] = sorted(edges, key=lambda e: stage.inputs.index(e["name"]))
        self.stats: dict[str, dict[str, float]] = defaultdict(
            lambda: {"calls": 0, "bytes_in": 0, "bytes_out": 0, "seconds": 0.0}
        )
        self._lock = threading.Lock()

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

    def run(self, stage: str, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        self.check_inputs(stage, tensors)
        start = time.perf_counter()
        with torch.no_grad():
            if self.backend == "onnx":
                outs = self.stages[stage](*tensors)
            else:
                outs = self.stages[stage](*(t.to(self.device) for t in tensors))
        outs = [o.cpu() for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
        return outs, time.perf_counter() - start

    def record(self, stage: str, seconds: float, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            entry = self.stats[stage]
            entry["calls"] += 1
            entry["seconds"] += seconds
            entry["bytes_in"] += bytes_in
            entry["bytes_out"] += bytes_out


def _extend(held: list[torch.Tensor] | None, frame: Any, stage: str) -> list[torch.Tensor]:
    """The full inputs of a RUN frame whose ``extends`` inputs carry only their new part."""
    extends = frame.header.get("extends") or {}
    tensors = list(frame.tensors)
    if not isinstance(extends, dict):
        raise ProtocolError(f"stage {stage}: 'extends' must map input indices to dims")
    for key, dim in extends.items():
        i = int(key) if str(key).isdigit() else -1
        if held is None or not 0 <= i < min(len(held), len(tensors)):
            raise ProtocolError(
                f"stage {stage}: input {key} extends an input this connection never sent"
            )
        old, new = held[i], tensors[i]
        if (
            not isinstance(dim, int)
            or old.dim() != new.dim()
            or any(
                a != b
                for d, (a, b) in enumerate(zip(old.shape, new.shape, strict=True))
                if d != dim
            )
        ):
            raise ProtocolError(
                f"stage {stage}: input {key} of shape {list(new.shape)} cannot extend "
                f"{list(old.shape)} along dim {dim}"
            )
        tensors[i] = torch.cat([old, new.to(old.dtype)], dim=dim)
    return tensors


class _Handler(socketserver.BaseRequestHandler):
    """One driver's connection. Limits hold whatever the driver sends: a frame over the size
    limit or slower than ``frame_timeout`` ends the connection, as does a token that does not
    match; the connection's held inputs go with it."""

    def handle(self) -> None:
        server: Any = self.server
        if not server.slots.acquire(blocking=False):
            self._refuse("the worker serves no more connections now; try again later")
            return
        try:
            self._serve(server)
        finally:
            server.slots.release()

    def _refuse(self, why: str, request: dict[str, Any] | None = None) -> None:
        try:
            send_frame(self.request, ERROR, {**_echo(request), "error": why})
        except OSError:
            pass

    def _serve(self, server: Any) -> None:
        worker: GPUWorker = server.worker
        sock: socket.socket = self.request
        # this driver's last inputs per stage: a KV cache arrives as its new positions only
        held: dict[str, list[torch.Tensor]] = {}
        while True:
            try:
                # a new connection must speak at once (slots are few); between requests a
                # driver may idle; once a frame starts it must finish in time
                sock.settimeout(server.frame_timeout if not held else server.idle_timeout)
                first = sock.recv(1, socket.MSG_PEEK)
                if not first:
                    return  # the driver hung up between requests
                deadline = time.monotonic() + server.frame_timeout
                frame = read_frame(sock, deadline=deadline, max_payload=server.max_frame_bytes)
            except (ProtocolError, OSError, ValueError) as exc:
                self._refuse(str(exc))
                return
            header = frame.header
            if server.token is not None and not hmac.compare_digest(
                str(header.get("token", "")).encode(), server.token.encode()
            ):
                self._refuse("the request does not carry the worker's token", header)
                return
            if frame.kind == STATS:
                if server.token is None and sock.family != socket.AF_UNIX:
                    self._refuse("stats need the worker's token on TCP", header)
                    continue
                with worker._lock:
                    send_frame(sock, RESULT, {**_echo(header), "stats": dict(worker.stats)})
                continue
            if frame.kind != RUN:
                self._refuse(f"expected a run frame, got kind {frame.kind}", header)
                continue
            stage = header.get("stage")
            bytes_in = sum(t.numel() * t.element_size() for t in frame.tensors)
            try:
                if not isinstance(stage, str) or stage not in worker.stages:
                    raise ProtocolError(f"no GPU stage {stage!r} in this bundle")
                inputs = _extend(held.pop(stage, None), frame, stage)
                outs, seconds = worker.run(stage, inputs)
            except ProtocolError as exc:
                self._refuse(str(exc), header)
                continue
            except Exception as exc:  # a stage failing is reported to the driver, not fatal
                self._refuse(f"stage {stage} failed: {exc}", header)
                continue
            if sum(t.numel() * t.element_size() for t in inputs) > server.max_frame_bytes:
                held.pop(stage, None)  # a cache may not grow past what one frame may carry
            else:
                held[stage] = inputs
            sent = send_frame(sock, RESULT, _echo(header), outs)
            worker.record(stage, seconds, bytes_in, sent)


def _echo(request: dict[str, Any] | None) -> dict[str, Any]:
    """The request's id and stage, which a reply must name."""
    if not isinstance(request, dict):
        return {"id": None, "stage": None}
    return {"id": request.get("id"), "stage": request.get("stage")}


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(
    worker: GPUWorker,
    address: str,
    *,
    token: str | None = None,
    max_connections: int = 64,
    max_frame_bytes: int = 1 << 30,
    frame_timeout: float = 60.0,
    idle_timeout: float = 3600.0,
) -> socketserver.BaseServer:
    """A server for ``worker`` bound to ``address``; call ``serve_forever()`` on it.

    ``token`` (required of every request when set) is a shared secret for TCP deployments;
    without it, statistics are served on Unix sockets only. At most ``max_connections``
    drivers at once; a frame larger than ``max_frame_bytes`` or slower than ``frame_timeout``
    seconds ends its connection.
    """
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        Path(addr).unlink(missing_ok=True)
        server: Any = _UnixServer(addr, _Handler)
    else:
        server = _TCPServer(addr, _Handler)
    server.worker = worker
    server.token = token
    server.slots = threading.BoundedSemaphore(max_connections)
    server.max_frame_bytes = max_frame_bytes
    server.frame_timeout = frame_timeout
    server.idle_timeout = idle_timeout
    return server


__all__ = ["DTYPES", "GPUWorker", "serve"]
