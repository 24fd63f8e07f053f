"""The enclave driver: runs the enclave side of a saved program and calls the GPU worker.

Reads ``DIR/plan.json`` and ``DIR/enclave`` only (``load_program(dir, gpu=False)``). The
:class:`WorkerClient` is the executor's :class:`~enclave_runtime.executor.StageRunner` for the
GPU stages: it sends a stage's (masked) inputs to the worker and returns its outputs, so the
same executor that runs in one process drives the two: masks, unmasks, corrections and
Freivalds checks all stay in this process.
A worker that dies, hangs past ``timeout`` seconds, or answers with an error frame makes the
request fail with a :class:`WorkerError` naming the stage; nothing blocks forever.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.executor import Executor
from partitioner.bundle import load_program
from partitioner.errors import TeesplitError
from runtime.protocol import ERROR, RUN, STATS, ProtocolError, parse_address, read_frame, send_frame


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
        self._last: dict[str, list[torch.Tensor]] = {}  # per stage: the inputs the worker holds

    def run(self, stage: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """One stage call. An input that extends what the worker already holds for the same
        slot (a KV cache one step longer) is sent as its new part only (``extends``)."""
        with self._lock:
            payload, extends = list(tensors), {}
            for i, (old, new) in enumerate(zip(self._last.get(stage, ()), tensors, strict=False)):
                dim = grown_dim(old, new)
                if dim is not None:
                    start = old.shape[dim]
                    payload[i] = new.narrow(dim, start, new.shape[dim] - start)
                    extends[str(i)] = dim
            header: dict[str, Any] = {"stage": stage}
            if extends:
                header["extends"] = extends
            try:
                self.bytes_sent += send_frame(self.sock, RUN, header, payload)
                frame = read_frame(self.sock)
            except (ProtocolError, OSError) as exc:
                self._last.clear()
                raise WorkerError(
                    f"GPU worker at {self.address} failed on stage {stage}: {exc}"
                ) from None
            if frame.kind == ERROR:
                self._last.pop(stage, None)  # the worker dropped its copy too
            else:
                self._last[stage] = list(tensors)
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


def spawn_worker(gpu_bundle: str | Path, address: str) -> tuple[subprocess.Popen, str]:
    """Start ``python -m runtime GPU_BUNDLE --listen ADDRESS`` locally and wait until it
    serves; returns the process and its ready line. The caller kills the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", str(gpu_bundle), "--listen", address],
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


def connect(
    bundle: str | Path,
    worker: str,
    *,
    trusted_key: Any = None,
    allow_unsigned: bool = False,
    timeout: float = 60.0,
    seed: int | None = None,
) -> Executor:
    """The saved program at ``bundle`` (enclave side only, its signature checked with
    ``trusted_key``) with its GPU stages served by the worker at ``worker``; the client is the
    executor's ``runner``."""
    plan = load_program(bundle, gpu=False, trusted_key=trusted_key, allow_unsigned=allow_unsigned)
    return Executor(plan, WorkerClient(worker, timeout), seed=seed)
