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
import time
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.executor import Executor, Expected
from partitioner.bundle import load_program
from partitioner.errors import TeesplitError
from runtime.protocol import (
    ERROR,
    RESULT,
    RUN,
    STATS,
    ProtocolError,
    parse_address,
    read_frame,
    send_frame,
)


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
    """One connection to a GPU worker: the executor's :class:`StageRunner` for GPU stages.

    What the worker sends is checked against what was asked, and the connection is given up
    at the first doubt: each request carries an id and has one deadline (``timeout`` seconds
    for the whole round trip, however the reply trickles in); the reply must name the same id
    and stage, and its tensors the dtypes and shapes the plan gives, *before* its payload is
    read, so memory is bounded by the expected reply. Any error or timeout closes the socket
    and every later call fails: a late answer to one request is never read as the answer to
    the next. A lock serialises requests on the connection.
    """

    def __init__(self, address: str, timeout: float = 60.0, token: str | None = None) -> None:
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise WorkerError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
        self.address = address
        self.timeout = float(timeout)
        self.token = token
        try:
            family, addr = parse_address(address)
        except ProtocolError as exc:
            raise WorkerError(str(exc)) from None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(addr)
        except OSError as exc:
            self.sock.close()
            raise WorkerError(f"cannot reach the GPU worker at {address}: {exc}") from None
        self._lock = threading.Lock()
        self._next_id = 0
        self._broken: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._last: dict[str, list[torch.Tensor]] = {}  # per stage: the inputs the worker holds

    def _fail(self, why: str) -> WorkerError:
        """Give the connection up: nothing more is read from it."""
        self._broken = why
        self._last.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        return WorkerError(why)

    def run(
        self, stage: str, tensors: list[torch.Tensor], expected: Expected | None = None
    ) -> list[torch.Tensor]:
        """One stage call. An input that extends what the worker already holds for the same
        slot (a KV cache one step longer) is sent as its new part only (``extends``)."""
        with self._lock:
            if self._broken is not None:
                raise WorkerError(
                    f"the connection to the GPU worker at {self.address} was closed after an "
                    f"earlier failure ({self._broken})"
                )
            deadline = time.monotonic() + self.timeout
            self._next_id += 1
            request = self._next_id
            payload, extends = list(tensors), {}
            for i, (old, new) in enumerate(zip(self._last.get(stage, ()), tensors, strict=False)):
                dim = grown_dim(old, new)
                if dim is not None:
                    start = old.shape[dim]
                    payload[i] = new.narrow(dim, start, new.shape[dim] - start)
                    extends[str(i)] = dim
            header: dict[str, Any] = {"stage": stage, "id": request}
            if extends:
                header["extends"] = extends
            if self.token is not None:
                header["token"] = self.token

            def check(kind: int, reply: dict[str, Any], metas: list[Any]) -> None:
                if kind == ERROR and reply.get("id") is None:  # refused before reading it
                    raise ProtocolError(f"the worker refused the connection: {reply.get('error')}")
                if reply.get("id") != request or reply.get("stage") != stage:
                    raise ProtocolError(
                        f"the reply names request {reply.get('id')!r} of stage "
                        f"{reply.get('stage')!r}, not request {request} of stage {stage}"
                    )
                if kind == ERROR:
                    if metas:
                        raise ProtocolError("an error reply carries tensors")
                    return
                if kind != RESULT:
                    raise ProtocolError(f"expected a result frame, got kind {kind}")
                if expected is None:
                    return
                if len(metas) != len(expected):
                    raise ProtocolError(
                        f"the reply has {len(metas)} tensors, stage {stage} returns {len(expected)}"
                    )
                for i, ((dtype, shape, _), (want, want_shape)) in enumerate(
                    zip(metas, expected, strict=True)
                ):
                    if dtype != want or (want_shape is not None and shape != want_shape):
                        raise ProtocolError(
                            f"output {i} is {dtype} {shape}, the plan says {want} {want_shape}"
                        )

            try:
                self.bytes_sent += send_frame(self.sock, RUN, header, payload)
                frame = read_frame(self.sock, deadline=deadline, check=check)
            except (ProtocolError, OSError) as exc:
                raise self._fail(
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
            if self._broken is not None:
                raise WorkerError("the connection was closed after an earlier failure")
            header: dict[str, Any] = {"id": 0, "stage": None}
            if self.token is not None:
                header["token"] = self.token
            try:
                send_frame(self.sock, STATS, header)
                frame = read_frame(self.sock, deadline=time.monotonic() + self.timeout)
            except (ProtocolError, OSError) as exc:
                raise self._fail(f"GPU worker at {self.address} failed on stats: {exc}") from None
            if frame.kind != RESULT or not isinstance(frame.header.get("stats"), dict):
                raise WorkerError(f"GPU worker refused stats: {frame.header.get('error')}")
            return frame.header["stats"]

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
    token: str | None = None,
    seed: int | None = None,
) -> Executor:
    """The saved program at ``bundle`` (enclave side only, its signature checked with
    ``trusted_key``) with its GPU stages served by the worker at ``worker``; the client is the
    executor's ``runner``."""
    plan = load_program(bundle, gpu=False, trusted_key=trusted_key, allow_unsigned=allow_unsigned)
    return Executor(plan, WorkerClient(worker, timeout, token), seed=seed)
