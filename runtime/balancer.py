"""nginx in front of several GPU workers, each session pinned to one worker by its id.

A GPU stage that holds a KV cache keeps it in the worker that computed it, per session
(``runtime.state``): every later token of that session must reach the same worker. The
enclave driver names its session in the ``teesplit-session`` header of its one gRPC stream
(``enclave_runtime.driver.SESSION_HEADER``); nginx hashes that header onto a ring of the
workers (``hash $http_teesplit_session consistent``), so a session's stream goes to one worker
and adding or losing a worker moves only the sessions hashed to it. A worker that dies takes
its sessions' caches with it: nginx resets their streams and each driver fails with its typed
``WorkerError``; the other workers' sessions go on.

Writes, under the run directory it is given (and nowhere else): ``nginx.conf`` (rendered from
:data:`TEMPLATE` with Jinja2), and while nginx runs its pid file, ``error.log``,
``access.log`` (one line per stream: session id, the worker it went to, status) and nginx's
temporary directories. Reads nothing but nginx's own binary. :func:`start` returns once the
listening port accepts connections, or raises :class:`BalancerError` (one line, with the tail
of nginx's error log); :meth:`Balancer.stop` ends nginx and waits for it.

:func:`upstream_for` is nginx's consistent hash (``ngx_http_upstream_hash_module``, the
ketama ring of ``Cache::Memcached::Fast``) in Python: which worker a session id goes to while
every worker is up. Deployers use it to check a balancer; the demo uses it to draw ids that
spread over the workers.
"""

from __future__ import annotations

import bisect
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import jinja2

from partitioner.errors import TeesplitError

# HTTP/2 header ``teesplit-session`` as an nginx variable (lower case, ``-`` -> ``_``)
SESSION_VARIABLE = "$http_teesplit_session"
# an idle decode stream (a user reading, a slow enclave) must not be cut by the balancer
IDLE_SECONDS = 3600

TEMPLATE = """\
# rendered by runtime/balancer.py: nginx in front of {{ upstreams | length }} teesplit GPU workers
{% if user %}
# nginx started as root drops its workers to "nobody" by default, who cannot reach the
# workers' sockets or this directory: they run as the user who started it instead
user {{ user }};
{% endif %}
daemon off;
master_process on;
worker_processes 1;
pid {{ run_dir }}/nginx.pid;
lock_file {{ run_dir }}/nginx.lock;
error_log {{ run_dir }}/error.log warn;

events {
    worker_connections 1024;
}

http {
    log_format teesplit 'session={{ session_variable }} upstream=$upstream_addr '
                        'status=$status request_time=$request_time';
    access_log {{ run_dir }}/access.log teesplit;

    client_body_temp_path {{ run_dir }}/temp/client_body;
    proxy_temp_path {{ run_dir }}/temp/proxy;
    fastcgi_temp_path {{ run_dir }}/temp/fastcgi;
    uwsgi_temp_path {{ run_dir }}/temp/uwsgi;
    scgi_temp_path {{ run_dir }}/temp/scgi;

    upstream teesplit_workers {
        # one session id, one worker: the worker holds the session's KV cache
        hash {{ session_variable }} consistent;
{% for address in upstreams %}
        server {{ address }};
{% endfor %}
    }

    server {
        listen {{ listen }} http2;
        # a session's stream is one HTTP/2 request body: all its messages count against this
        # limit together, so a finite one would end long sessions (0: no limit); each
        # message is bounded by the worker's own limit (--max-frame-mb)
        client_max_body_size {{ max_body }};
        # nginx would end a stream idle for longer than these between two tokens
        client_body_timeout {{ idle }}s;
        send_timeout {{ idle }}s;

        location / {
            grpc_pass grpc://teesplit_workers;
            grpc_read_timeout {{ idle }}s;
            grpc_send_timeout {{ idle }}s;
            grpc_connect_timeout 5s;
        }
    }
}
"""

# what may appear in a path or address written into the configuration: no spaces, quotes,
# ``;``, braces or ``$`` that would end a directive or open a variable
_SAFE = re.compile(r"^[A-Za-z0-9_./:@+\[\]-]+$")


class BalancerError(TeesplitError):
    """nginx is not installed, refused its configuration, or did not start listening."""


def _checked(value: str, what: str) -> str:
    if not _SAFE.match(value):
        raise BalancerError(f"{what} {value!r} cannot be written into nginx.conf")
    return value


def render(
    upstreams: Sequence[str],
    listen: str,
    run_dir: str | Path,
    *,
    idle_seconds: int = IDLE_SECONDS,
    max_body: str = "0",
) -> str:
    """The nginx configuration: ``listen`` (``host:port``) in front of ``upstreams`` (the
    workers' addresses as the driver spells them, ``unix:/path`` or ``host:port``), with its
    pid, logs and temporary files under ``run_dir`` (absolute)."""
    if not upstreams:
        raise BalancerError("a balancer needs at least one worker address")
    root = Path(run_dir)
    if not root.is_absolute():
        raise BalancerError(f"the run directory {run_dir} must be an absolute path")
    if not isinstance(idle_seconds, int) or idle_seconds < 1:
        raise BalancerError(f"idle_seconds must be a positive integer, got {idle_seconds!r}")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # nginx.conf, not HTML: every value is checked by _checked instead
    )
    return env.from_string(TEMPLATE).render(
        upstreams=[_checked(a, "worker address") for a in upstreams],
        listen=_checked(listen, "listen address"),
        run_dir=_checked(str(root), "run directory"),
        session_variable=SESSION_VARIABLE,
        idle=idle_seconds,
        max_body=_checked(max_body, "client_max_body_size"),
        user=pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None,
    )


def _ring(upstreams: Sequence[str]) -> tuple[list[int], list[int]]:
    """nginx's consistent-hash ring: 160 points per server (weight 1), sorted, the first of
    equal points kept; each point's hash is crc32(HOST \\0 PORT PREV_HASH)."""
    points: list[tuple[int, int]] = []
    for index, server in enumerate(upstreams):
        if server.lower().startswith("unix:"):
            host, port = server[5:], ""
        else:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                host, port = server, ""
        base = host.encode() + b"\0" + port.encode()
        previous = 0
        for _ in range(160):
            previous = zlib.crc32(base + struct.pack("<I", previous))
            points.append((previous, index))
    points.sort(key=lambda p: p[0])
    kept = [p for i, p in enumerate(points) if i == 0 or p[0] != points[i - 1][0]]
    return [h for h, _ in kept], [s for _, s in kept]


def upstream_for(session: str, upstreams: Sequence[str]) -> int:
    """The index in ``upstreams`` of the worker nginx's ``hash ... consistent`` sends
    ``session`` to when every worker is up: the first ring point at or after crc32(session)."""
    if not upstreams:
        raise BalancerError("no worker addresses to hash onto")
    hashes, servers = _ring(upstreams)
    at = bisect.bisect_left(hashes, zlib.crc32(session.encode()))
    return servers[at % len(hashes)]


def _free_port(host: str) -> int:
    """A port nothing listens on now (nginx cannot report the port it was given for 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


class Balancer:
    """A running nginx: ``address`` (``host:port``, what drivers connect to), ``run_dir``."""

    def __init__(self, process: subprocess.Popen, address: str, run_dir: Path) -> None:
        self.process = process
        self.address = address
        self.run_dir = run_dir

    def routes(self) -> dict[str, list[str]]:
        """Per session id, the workers nginx sent its streams to (``access.log``: a stream is
        logged when it ends). Calls without a session (health checks) are left out."""
        out: dict[str, list[str]] = {}
        try:
            text = (self.run_dir / "access.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            session = fields.get("session", "-")
            if session != "-":
                out.setdefault(session, []).append(fields.get("upstream", "-"))
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL if nginx has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    upstreams: Sequence[str],
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    nginx: str = "nginx",
    timeout: float = 10.0,
    idle_seconds: int = IDLE_SECONDS,
    max_body: str = "0",
) -> Balancer:
    """Write ``run_dir/nginx.conf`` and run ``nginx -p run_dir -c run_dir/nginx.conf`` in the
    foreground as a child process; returns when ``host:port`` (``port`` 0: a free one) accepts
    connections. The caller stops it (:meth:`Balancer.stop`, or ``with``). ``max_body`` is
    nginx's ``client_max_body_size`` for a whole session (``0``: no limit)."""
    binary = shutil.which(nginx)
    if binary is None:
        raise BalancerError(
            f"{nginx} is not on PATH: install nginx (Debian: apt-get install nginx-light)"
        )
    root = Path(run_dir).resolve()
    for sub in ("temp/client_body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = root / "nginx.conf"
    config.write_text(
        render(upstreams, listen, root, idle_seconds=idle_seconds, max_body=max_body),
        encoding="utf-8",
    )
    error_log = root / "error.log"
    pid_file = root / "nginx.pid"
    pid_file.unlink(missing_ok=True)  # a stale one from an earlier run would read as ready
    with open(root / "stderr.log", "wb") as stderr:
        # -e: nginx opens its compiled-in error log before reading the configuration
        process = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(config), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            why = (
                _tail(error_log)
                or _tail(root / "stderr.log")
                or f"exit status {process.returncode}"
            )
            raise BalancerError(f"nginx did not start ({config}): {why}")
        # nginx writes its pid file once its listening socket is bound: before that, a
        # connection could reach whatever else holds the port
        if _read_pid(pid_file) == process.pid:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                pass
        if time.monotonic() > deadline:
            Balancer(process, listen, root).stop()
            raise BalancerError(
                f"nginx did not listen on {listen} within {timeout:g} s: {_tail(error_log)}"
            )
        time.sleep(0.05)
    return Balancer(process, listen, root)


__all__ = ["Balancer", "BalancerError", "render", "start", "upstream_for"]
