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
        self.backend = backend
        gpu_stages = [s for s in plan.stages if s.side == "gpu"]
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
                name: module.to(self.device)
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
    def handle(self) -> None:
        worker: GPUWorker = self.server.worker  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        # this driver's last inputs per stage: a KV cache arrives as its new positions only
        held: dict[str, list[torch.Tensor]] = {}
        while True:
            try:
                frame = read_frame(sock)
            except (ProtocolError, RuntimeError, ValueError) as exc:
                if "connection closed while reading the frame prefix (0/" in str(exc):
                    return  # the driver hung up between requests
                try:
                    send_frame(sock, ERROR, {"error": str(exc)})
                except OSError:
                    pass
                return
            if frame.kind == STATS:
                with worker._lock:
                    send_frame(sock, RESULT, {"stats": dict(worker.stats)})
                continue
            if frame.kind != RUN:
                send_frame(sock, ERROR, {"error": f"expected a run frame, got kind {frame.kind}"})
                continue
            stage = frame.header.get("stage")
            bytes_in = sum(t.numel() * t.element_size() for t in frame.tensors)
            try:
                inputs = _extend(held.pop(stage, None), frame, stage)
                outs, seconds = worker.run(stage, inputs)
            except ProtocolError as exc:
                send_frame(sock, ERROR, {"error": str(exc)})
                continue
            except Exception as exc:  # a stage failing is reported to the driver, not fatal
                send_frame(sock, ERROR, {"error": f"stage {stage} failed: {exc}"})
                continue
            held[stage] = inputs
            sent = send_frame(sock, RESULT, {"stage": stage}, outs)
            worker.record(stage, seconds, bytes_in, sent)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(worker: GPUWorker, address: str) -> socketserver.BaseServer:
    """A server for ``worker`` bound to ``address``; call ``serve_forever()`` on it."""
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        Path(addr).unlink(missing_ok=True)
        server: socketserver.BaseServer = _UnixServer(addr, _Handler)
    else:
        server = _TCPServer(addr, _Handler)
    server.worker = worker  # type: ignore[attr-defined]
    return server


__all__ = ["DTYPES", "GPUWorker", "serve"]
