"""Scale-out, shown: GPU workers behind nginx, several enclave sessions, one worker killed.

    make scale-out
    python examples/scale_out.py [--bundle DIR (--trusted-key PUB | --allow-unsigned)]
                                 [--sessions 4] [--workers 2] [--tokens 8] [--run-dir DIR]

Builds a tiny random Llama's decoder step under ``cmif`` (its GPU stage holds the KV cache,
per session, in the worker) unless ``--bundle`` names a saved decoder bundle; starts the
workers (``python -m runtime DIR/gpu --listen unix:RUN/wK.sock``) and nginx in front of them
(``runtime.balancer``: ``hash $http_teesplit_session consistent``); runs the sessions, each
its own ``connect()`` to nginx, on threads. The sessions start one after the other, so that
each worker's ``ModelStatistics`` shows which one served each session's first tokens; then,
with every session holding a cache and paused after its first tokens, one worker is killed
(SIGKILL) and all sessions go on at once. Prints per session the worker that served it, its
tokens, whether they equal the in-process run of the same bundle and seed, and the typed
error of those whose worker died.

Session ids are drawn at random as the driver draws them, but redrawn until the sessions
spread over the workers by nginx's hash (``runtime.balancer.upstream_for``), so that every run
shows both outcomes; the routing itself is nginx's, and the workers' statistics and nginx's
access log are checked against the prediction.

Writes only under ``--run-dir`` (default: a temporary directory, removed afterwards): the
bundle when it builds one, the workers' sockets, nginx's configuration and logs. Exit status
0 when the sessions on the surviving workers finished with the reference's tokens, those on
the killed worker failed with ``WorkerError`` after tokens equal to the reference's, each
worker's statistics count exactly its sessions' calls, and nothing hung.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.driver import WorkerClient, WorkerError, connect, spawn_worker
from enclave_runtime.generation import generate
from runtime import balancer


@dataclass
class Session:
    """One enclave session and what became of it."""

    index: int
    id: str
    seed: int
    prompt: torch.Tensor
    predicted: int  # the worker nginx's hash sends it to
    worker: int | None = None  # the worker whose statistics grew by its first calls
    calls: int = 0  # requests its driver sent
    calls_at_pause: int = 0
    tokens: list[int] = field(default_factory=list)  # new tokens, as they came
    result: torch.Tensor | None = None  # prompt and new tokens, when it finished
    error: BaseException | None = None
    go: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass
class Outcome:
    """What a run observed; :func:`problems` judges it."""

    sessions: list[Session]
    workers: list[str]  # their addresses
    killed: int
    first: int  # tokens each session produced before the kill
    calls_at_kill: list[int]  # per worker, its ModelStatistics calls just before the kill
    calls_at_end: list[int | None]  # per worker, at the end (None: the killed one)
    routes: dict[str, list[str]]  # per session id, the workers in nginx's access log
    hung: list[int]  # sessions still running after their deadline
    balancer_address: str = ""


def build_bundle(out: Path) -> Any:
    """A tiny random Llama's decoder step under cmif, saved and signed in ``out``; returns the
    public key that verifies it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from transformers import LlamaConfig, LlamaForCausalLM

    from partitioner.api import partition
    from partitioner.generation import capture_decoder

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    key = Ed25519PrivateKey.generate()
    # torch.export's and the ONNX exporter's notices (deprecations, torchvision absent) are
    # not this demo's output
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partition(capture_decoder(model), "cmif", seed=3).save(out, sign_key=key)
    return key.public_key()


def worker_calls(address: str) -> int:
    """The calls the worker at ``address`` has served, all stages (its ModelStatistics, read
    over its own socket: the balancer is not asked)."""
    client = WorkerClient(address, timeout=5.0)
    try:
        return sum(int(s["calls"]) for s in client.stats().values())
    finally:
        client.close()


def spread_ids(count: int, addresses: list[str]) -> list[tuple[str, int]]:
    """``count`` random session ids, session i hashed to worker i mod len(addresses)."""
    out = []
    for i in range(count):
        while True:
            sid = secrets.token_hex(8)
            if balancer.upstream_for(sid, addresses) == i % len(addresses):
                out.append((sid, i % len(addresses)))
                break
    return out


def prompt_of(index: int) -> torch.Tensor:
    return torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(100 + index))


def _session(
    s: Session,
    bundle: Path,
    address: str,
    *,
    trusted_key: Any,
    allow_unsigned: bool,
    new_tokens: int,
    first: int,
    resume: threading.Event,
    timeout: float,
) -> None:
    """A session's thread: connect through nginx, wait for its turn, generate; pause after
    ``first`` tokens until ``resume``."""
    client = None
    try:
        executor = connect(
            bundle,
            address,
            trusted_key=trusted_key,
            allow_unsigned=allow_unsigned,
            seed=s.seed,
            timeout=timeout,
            session=s.id,  # the teesplit-session header nginx hashes on
        )
        client = executor.runner
        send, step = client.run, executor.run

        def counted(*args: Any, **kwargs: Any) -> Any:
            s.calls += 1
            return send(*args, **kwargs)

        def gated(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            s.tokens.append(int(out[0][0, -1].argmax()))  # greedy, as generate picks it
            if len(s.tokens) == first:
                s.calls_at_pause = s.calls
                s.paused.set()
                if not resume.wait(timeout):
                    raise TimeoutError("the session was not resumed")
            return out

        client.run, executor.run = counted, gated
        if not s.go.wait(timeout):
            raise TimeoutError("the session was never started")
        s.result = generate(executor, s.prompt, max_new_tokens=new_tokens)
    except BaseException as exc:  # recorded and judged: a thread's exception is otherwise lost
        s.error = exc
    finally:
        s.paused.set()  # a session that failed early must not keep the others waiting
        if client is not None:
            client.close()


def scenario(
    bundle: str | Path,
    run_dir: str | Path,
    *,
    trusted_key: Any = None,
    allow_unsigned: bool = False,
    sessions: int = 4,
    workers: int = 2,
    new_tokens: int = 8,
    first: int = 2,
    kill: int = 0,
    timeout: float = 20.0,
) -> Outcome:
    """Run the scale-out scenario (module docstring) and return what it observed."""
    if workers < 2 or sessions < workers or not 0 < first < new_tokens or not 0 <= kill < workers:
        raise ValueError(
            "needs 2+ workers, at least a session per worker, 0 < first < new_tokens, and "
            "the worker to kill among them"
        )
    bundle, run = Path(bundle), Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    addresses = [f"unix:{run / f'w{k}.sock'}" for k in range(workers)]
    procs: list[subprocess.Popen] = []
    lb = None
    resume = threading.Event()
    try:
        with ThreadPoolExecutor(workers) as pool:  # each loads torch: start them together
            spawned = [pool.submit(spawn_worker, bundle / "gpu", a) for a in addresses]
        # every worker that did start is kept, to be stopped below if another did not
        procs = [f.result()[0] for f in spawned if f.exception() is None]
        for f in spawned:
            f.result()
        lb = balancer.start(addresses, run / "nginx")
        people = [
            Session(i, sid, seed=i, prompt=prompt_of(i), predicted=w)
            for i, (sid, w) in enumerate(spread_ids(sessions, addresses))
        ]
        for s in people:
            s.thread = threading.Thread(
                target=_session,
                args=(s, bundle, lb.address),
                kwargs=dict(
                    trusted_key=trusted_key,
                    allow_unsigned=allow_unsigned,
                    new_tokens=new_tokens,
                    first=first,
                    resume=resume,
                    timeout=timeout,
                ),
                daemon=True,  # a hung session is reported, and must not keep the process alive
                name=f"session-{s.index}",
            )
            s.thread.start()
        # one session at a time up to its pause: the worker whose count grew served it
        for s in people:
            before = [worker_calls(a) for a in addresses]
            s.go.set()
            s.paused.wait(timeout * (first + 1))
            grew = [k for k, a in enumerate(addresses) if worker_calls(a) > before[k]]
            s.worker = grew[0] if len(grew) == 1 else None
        calls_at_kill = [worker_calls(a) for a in addresses]
        procs[kill].send_signal(signal.SIGKILL)
        procs[kill].wait()
        resume.set()
        deadline = time.monotonic() + timeout * (new_tokens + 1)
        for s in people:
            s.thread.join(max(deadline - time.monotonic(), 0.1))
        hung = [s.index for s in people if s.thread.is_alive()]
        calls_at_end = [None if k == kill else worker_calls(a) for k, a in enumerate(addresses)]
        # a stream is logged when it ends: give nginx a moment to write the last ones
        logged = time.monotonic() + 5.0
        while time.monotonic() < logged and not all(s.id in lb.routes() for s in people):
            time.sleep(0.1)
        return Outcome(
            sessions=people,
            workers=addresses,
            killed=kill,
            first=first,
            calls_at_kill=calls_at_kill,
            calls_at_end=calls_at_end,
            routes=lb.routes(),
            hung=hung,
            balancer_address=lb.address,
        )
    finally:
        resume.set()  # sessions still paused (the run failed) end instead of waiting
        if lb is not None:
            lb.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def problems(outcome: Outcome, references: list[torch.Tensor]) -> list[str]:
    """Every way the run fell short of the module docstring's promise (none: it held).
    ``references[i]`` is session i's prompt and tokens from the in-process program."""
    out = []
    k = outcome.killed
    served: dict[int, list[Session]] = {w: [] for w in range(len(outcome.workers))}
    for s, want in zip(outcome.sessions, references, strict=True):
        name = f"session {s.index} ({s.id})"
        new = want[0, s.prompt.shape[1] :].tolist()
        if s.index in outcome.hung:
            out.append(f"{name} hung")
            continue
        if s.worker is None:
            out.append(f"{name}: no single worker's statistics grew by its first tokens")
            continue
        served[s.worker].append(s)
        logged = {a for a in outcome.routes.get(s.id, [])}
        if s.worker != s.predicted or logged != {outcome.workers[s.worker]}:
            out.append(
                f"{name}: served by w{s.worker}, hashed to w{s.predicted}, nginx logged "
                f"{sorted(logged)}"
            )
        if s.tokens[: outcome.first] != new[: outcome.first]:
            out.append(f"{name}: first tokens {s.tokens} differ from the reference {new}")
        if s.worker == k:
            if not isinstance(s.error, WorkerError):
                out.append(f"{name} on the killed worker ended with {s.error!r}, not WorkerError")
        elif s.error is not None or s.result is None or not torch.equal(s.result, want):
            out.append(f"{name} on a live worker: {s.error!r}, tokens {s.tokens} vs {new}")
    for w, mine in served.items():
        if not mine:
            out.append(f"worker w{w} served no session")
        if outcome.calls_at_kill[w] != sum(s.calls_at_pause for s in mine):
            out.append(
                f"worker w{w} counted {outcome.calls_at_kill[w]} calls before the kill, its "
                f"sessions sent {sum(s.calls_at_pause for s in mine)}"
            )
        end = outcome.calls_at_end[w]
        if w != k and end != sum(s.calls for s in mine):
            out.append(
                f"worker w{w} counted {end} calls, its sessions sent {sum(s.calls for s in mine)}"
            )
    return out


def report(outcome: Outcome, references: list[torch.Tensor]) -> list[str]:
    """One line per session, and one per worker."""
    lines = []
    for s, want in zip(outcome.sessions, references, strict=True):
        new = want[0, s.prompt.shape[1] :].tolist()
        where = f"w{s.worker}" if s.worker is not None else "w?"
        if s.worker == outcome.killed:
            where += " (killed)"
        if s.index in outcome.hung:
            end = "HUNG"
        elif s.error is not None:
            end = f"{type(s.error).__name__}: {s.error}"
        else:
            end = "finished"
        same = s.tokens == new[: len(s.tokens)]
        lines.append(
            f"session {s.index} {s.id} -> {where:<12} tokens {s.tokens} "
            f"{'= reference' if same else f'!= reference {new}'}; {end}"
        )
    for w, address in enumerate(outcome.workers):
        end = outcome.calls_at_end[w]
        lines.append(
            f"worker w{w} {address}: {outcome.calls_at_kill[w]} calls before the kill, "
            + ("then SIGKILL" if end is None else f"{end} at the end")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a saved decoder bundle (default: build one)")
    parser.add_argument("--trusted-key", help="the compiler's public key (PEM) for --bundle")
    parser.add_argument("--allow-unsigned", action="store_true")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per session")
    parser.add_argument("--first", type=int, default=2, help="tokens before the kill")
    parser.add_argument("--kill", type=int, default=0, help="the worker to kill")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    parser.add_argument("--run-dir", type=Path, help="kept afterwards (default: a temporary one)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="no CUDA device")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from partitioner.api import load

    with tempfile.TemporaryDirectory(prefix="teesplit-scale-") as scratch:
        run = args.run_dir or Path(scratch)
        trusted: Any = args.trusted_key
        bundle = args.bundle
        if bundle is None:
            bundle = run / "bundle"
            print(f"building a tiny Llama decoder bundle under cmif in {bundle} ...", flush=True)
            trusted = build_bundle(bundle)
        elif trusted is None and not args.allow_unsigned:
            parser.error("--bundle needs --trusted-key PUB or --allow-unsigned")
        outcome = scenario(
            bundle,
            run,
            trusted_key=trusted,
            allow_unsigned=args.allow_unsigned,
            sessions=args.sessions,
            workers=args.workers,
            new_tokens=args.tokens,
            first=args.first,
            kill=args.kill,
            timeout=args.timeout,
        )
        references = [
            generate(
                load(bundle, trusted_key=trusted, allow_unsigned=args.allow_unsigned, seed=s.seed),
                s.prompt,
                max_new_tokens=args.tokens,
            )
            for s in outcome.sessions
        ]
    print(
        f"{len(outcome.sessions)} sessions through nginx at {outcome.balancer_address} "
        f"(hash $http_teesplit_session consistent) over {len(outcome.workers)} workers; "
        f"w{outcome.killed} killed after {outcome.first} tokens of every session"
    )
    for line in report(outcome, references):
        print("  " + line)
    found = problems(outcome, references)
    for problem in found:
        print(f"FAILED: {problem}")
    if not found:
        print(
            "ok: the sessions on the live workers finished with the reference's tokens, those "
            "on the killed one failed with WorkerError, nothing hung"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
