"""The enclave driver: runs the enclave side of a saved program and calls the GPU worker.

Reads ``DIR/plan.json`` and ``DIR/enclave`` only (``load(dir, gpu=False)``); each GPU stage
becomes a :class:`RemoteStage` that sends the stage's (masked) inputs to the worker and returns
its outputs, so the reference executor (``SplitProgram.execute``) drives the two processes
unchanged: masks, unmasks, corrections and Freivalds checks all stay in this process.
A worker that dies, hangs past ``timeout`` seconds, or answers with an error frame makes the
request fail with a :class:`WorkerError` naming the stage; nothing blocks forever.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import torch

from partitioner.errors import TeesplitError
from partitioner.program import SplitProgram
from runtime.protocol import ERROR, RUN, STATS, ProtocolError, parse_address, read_frame, send_frame


class WorkerError(TeesplitError):
    """The GPU worker failed, closed the connection, or did not answer in time."""


class WorkerClient:
    """One connection to a GPU worker (a lock serialises requests on it)."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        family, addr = parse_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(addr)
        except OSError as exc:
            raise WorkerError(f"cannot reach the GPU worker at {address}: {exc}") from None
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    def run(self, stage: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock:
            try:
                self.bytes_sent += send_frame(self.sock, RUN, {"stage": stage}, tensors)
                frame = read_frame(self.sock)
            except (ProtocolError, OSError) as exc:
                raise WorkerError(
                    f"GPU worker at {self.address} failed on stage {stage}: {exc}"
                ) from None
        self.bytes_received += sum(t.numel() * t.element_size() for t in frame.tensors)
        if frame.kind == ERROR:
            raise WorkerError(f"GPU worker refused stage {stage}: {frame.header.get('error')}")
        return frame.tensors

    def stats(self) -> dict[str, Any]:
        with self._lock:
            send_frame(self.sock, STATS, {})
            return read_frame(self.sock).header["stats"]

    def close(self) -> None:
        self.sock.close()


class RemoteStage:
    """Stands in for a GPU stage's module: a call is a round trip to the worker."""

    def __init__(self, client: WorkerClient, name: str) -> None:
        self.client = client
        self.name = name

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.client.run(self.name, list(tensors)))


def connect(
    bundle: str | Path, worker: str, *, timeout: float = 60.0, seed: int | None = None
) -> SplitProgram:
    """The saved program at ``bundle`` with its GPU stages served by the worker at ``worker``."""
    from partitioner.artifacts import load

    program = load(bundle, gpu=False, seed=seed)
    client = WorkerClient(worker, timeout)
    for stage in program.stages:
        if stage.side == "gpu":
            stage.module = RemoteStage(client, stage.name)
    program.worker = client
    return program
