"""A bundle deployed on this machine: the GPU worker and the OpenAI-compatible server, each its
own process, for ``teesplit demo`` and the serving benchmark.

Reads a saved bundle; starts ``python -m runtime DIR/gpu`` on a private Unix socket and
``teesplit serve DIR`` on ``127.0.0.1`` (a free port), and yields the server's ``/v1`` URL
and the worker's address once both answer. Their logs (the worker's CPU warning, uvicorn's
lines) go to ``log``, not the terminal. Guarantees: both processes are stopped when the block
ends, however it ends; a process that fails to start raises :class:`DeployError` with the last
lines of its log.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from enclave_runtime import allocator
from partitioner.errors import TeesplitError
from runtime.local_triton import stop

_ROOT = Path(__file__).resolve().parent.parent


class DeployError(TeesplitError):
    """A local worker or server did not start."""


@dataclass(frozen=True)
class Deployment:
    """Where the server answers (``url``, ending in ``/v1``) and the worker (its address)."""

    url: str
    worker: str


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _started(proc: subprocess.Popen, marker: str, log: Path, what: str) -> str:
    """The process's first stdout line, which must contain ``marker``."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if marker not in line:
        proc.kill()
        proc.wait()
        raise DeployError(f"the {what} did not start: {line or _tail(log) or 'no output'}")
    return line


@contextlib.contextmanager
def local_deployment(
    bundle: str | Path,
    *,
    trusted_key: str | None = None,
    max_sessions: int = 8,
    batch_delay_ms: float = 20.0,
    backend: str = "torch",
    log: str | Path | None = None,
) -> Iterator[Deployment]:
    """Start the worker and the server for ``bundle``; yields where they answer (the server
    at ``http://127.0.0.1:PORT/v1``).

    ``trusted_key`` checks the bundle's signature (``None``: run it unsigned, for benchmarks
    of bundles made here). ``batch_delay_ms`` is the worker's wait for calls to batch with;
    ``backend`` how it runs its stages (``torch`` or ``onnx``).
    """
    bundle = Path(bundle)
    folder = Path(tempfile.mkdtemp(prefix="teesplit-deploy-"))
    log_path = Path(log) if log is not None else folder / "log.txt"
    out = log_path.open("a", encoding="utf-8")
    procs: list[subprocess.Popen] = []
    try:
        address = f"unix:{folder / 'worker.sock'}"
        worker = subprocess.Popen(
            [sys.executable, "-m", "runtime", str(bundle / "gpu"), "--listen", address,
             "--batch-delay-ms", str(batch_delay_ms), "--backend", backend],
            cwd=_ROOT, stdout=subprocess.PIPE, stderr=out, text=True,
        )  # fmt: skip
        procs.append(worker)
        _started(worker, "teesplit GPU worker", log_path, "GPU worker")
        verify = ["--trusted-key", trusted_key] if trusted_key else ["--allow-unsigned"]
        server = subprocess.Popen(
            [sys.executable, "-m", "partitioner.cli", "serve", str(bundle), "--worker", address,
             "--listen", "127.0.0.1:0", "--max-sessions", str(max_sessions), *verify],
            cwd=_ROOT, stdout=subprocess.PIPE, stderr=out, text=True,
            env=allocator.environment(),  # the enclave process's glibc settings
        )  # fmt: skip
        procs.append(server)
        line = _started(server, "teesplit serve", log_path, "server")
        url = line.split(" on ", 1)[1].split()[0]
        _wait_ready(url.removesuffix("/v1"), server, log_path)
        yield Deployment(url, address)
    finally:
        for proc in reversed(procs):
            stop(proc, grace=10)
        out.close()
        if log is None:
            shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(base: str, server: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DeployError(f"the server stopped: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise DeployError(f"the server was not ready after {seconds:.0f} s: {_tail(log)}")


__all__ = ["DeployError", "Deployment", "local_deployment"]
