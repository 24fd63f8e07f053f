"""TEE-bound speedup on SmolLM2-135M: enclave time per request under each preset against
``all_enclave`` (the project's headline figure).

When the enclave (SGX: a slow, memory-encrypted CPU) is the bottleneck and the GPU is fast,
what a split buys is the enclave time it saves. Both workloads call one split of the decoder
step (``capture_decoder``: the KV cache is an input, logits of the last position only, as
``generate`` computes them): a 128-token prefill (batch 1, past 0) and one decode step at a
128-token context (seq 1, past 128: the prefill's real cache). Each preset runs in this one
process next to ``all_enclave`` (and the plain eager step, for reference), and every call is
broken down by wrapping the executor's parts:

* ``T_gpu``: time inside ``runner.run`` (the GPU stages; here the CPU runs them too);
* ``T_enclave online`` = call time - ``T_gpu``: everything the enclave does during the request,
  split into enclave stage modules (the model's enclave ops and the mask/unmask/RNM ops inside
  them), online corrections (``prot.corrections[s].module`` not precomputed by the pool),
  integrity checks (``enclave_runtime.integrity.check`` for float masks; for exact ones the
  executor's ``ring_checks[s].expect``/``verify``), and the executor loop (the rest:
  binding, input checks, ``pool.take``, reply checks, output unmasking, Python dispatch);
* offline per request: the pool draws mask sets (pads, RNM noise, precomputed corrections
  ``W·r``, Freivalds vectors) in batches, the corrections of a batch as one GEMM per layer
  (``W·[r_1 … r_B]``). The sets the calls take are drawn first, untimed; after the calls,
  ``--fills`` calls ``pool.fill(binding, B, batch=B)`` are timed, each batch dropped once
  timed so that the next fill reuses its memory (a serving pool refills what requests took;
  memory a process touches for the first time costs ~9x more on this VM), and offline per
  request = fill time / B (median over the fills; the rate is B / fill time, in sets/s).
  ``B`` is ``--batch`` (default 64 for decode, 4 for prefill, whose sets hold 128 tokens'
  pads and corrections). What is paid once per executor, not per request, is done first and
  reported apart (``offline_prepare_ms``): the correction weights packed as int8 digits or
  made float64 (``pool._prepared``) and one untimed fill, in which oneDNN generates its
  kernels for the fill's shapes. The timed calls then take only pooled sets (``pool.misses``
  is asserted unchanged);
* round trips: GPU stage calls per request; bytes to / from the GPU: the ``nbytes`` of the
  tensors passed to / returned by ``runner.run``;
* speedups: ``T_enclave(all_enclave) / T_enclave_online`` (a server that draws masks while
  idle) and ``T_enclave(all_enclave) / (T_enclave_online + T_offline)`` (one that does not);
* paired (the headline, with one ``--enclave`` mode): each replayed call of a preset is
  preceded by one all_enclave call on the same workload, and the speedup is the ratio of the
  two medians. On a shared host whose load swings between minutes, presets measured minutes
  apart can differ by 1.5x for the same code; calls made in turn see the same load. (If
  anything against the split: all_enclave's call streams every weight through the caches
  just before each of the split's calls.)
* steady state (paired in blocks): the same recording replayed once more with each side's
  calls back to back in blocks, all_enclave's and the preset's in the order A B B A, each
  block's first half left out as its warm-up: the split as a server decoding a request runs
  it, its working set (KV cache, the libraries' code and data; each call still takes a fresh
  mask set) left warm by its own previous steps. A decode step here takes ~8 calls to warm
  up after a pass over a few hundred MiB (:func:`steady_state`), hence the decode step's
  longer recording (``--decode-repeats``, default 47: blocks of 24). Needs ≥ 7 timed calls
  (2 timed a block); each round's ratio, and the preset's times by position in a block, are
  kept beside the figure. Interleaved pairing is the conservative figure.

Medians over ``--repeats`` calls (``--decode-repeats`` for the decode step) after one warm-up
call. Fills stock the pool until it holds a set for every call or ``--draw-budget`` seconds of
fills are spent, and ``--fills`` timed fills follow the calls (fewer once that budget is spent);
a preset whose sets are slow to draw then gets fewer timed calls (the count used is in the
table; a single set serves one call without a warm-up), and a preset and workload past
``--timeout`` seconds is cut off by SIGALRM. A preset the compiler refuses (or one that fails)
is a row saying why; an unexpected failure also makes the exit status 1. Everything runs on this
machine's CPU: "GPU" time is CPU time of the GPU stages, and only the enclave-side figures are
the point. One torch thread by default (``--threads``): on the 2-core development machine, with
another process busy, two OpenMP threads wait on each other and times swing 2-10x; one thread
keeps the ratios stable. The process runs with the enclave process's glibc settings
(``enclave_runtime.allocator.TUNABLES``, as the launcher and the Gramine manifest start it;
started without them, it starts itself again with them), all_enclave alike.

``--project`` (on by default) adds a projection for a Llama-2-7B-shaped decode step at context
128 from this CPU's measured memory bandwidth and the mask pool's correction op timed at
Llama-2-7B's layer shapes (``benchmarks/projection.py``); the formulas are printed with the
numbers. Results: ``benchmarks/results/teebound.json``; the markdown tables are
printed.

    python benchmarks/teebound.py [--repeats 15] [--quick] [--no-project] [--threads 1]
        [--batch B] [--fills 1] [--draw-budget 45] [--timeout 150] [--out FILE]
        [--presets all_enclave cmif secureinfer slalom slalom:masking=additive]
        [--set KEY=VALUE ...]   # a policy override for every preset but all_enclave
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ceiling import ceiling, print_ceiling  # noqa: E402
from benchmarks.projection import cpu_rates, offline_ops, print_projection, project  # noqa: E402

BASELINE = "all_enclave"
DEFAULT_PRESETS = [
    "all_enclave",
    "cmif",
    "secureinfer",
    "slalom",
    "slalom:masking=additive",
    "private_finetune",
]
# the LoRA adapter benchmarks/finetune.py trains on SST-2 text (private_finetune's fine-tune)
DEFAULT_ADAPTER = ROOT / "benchmarks" / "results" / "lora-sst2"
CONTEXT = 128  # prefill length, and the decode step's past
# mask sets per batched fill, per workload: a prefill set holds 128 tokens' pads and corrections
DEFAULT_BATCH = {"prefill": 4, "decode": 64}


# -- presets and overrides ----------------------------------------------------------------------


def _value(text: str) -> Any:
    """``KEY=VALUE``'s value: JSON when it parses (numbers, true, null, lists), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_preset(spec: str, common: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``name[:key=value[,key=value...]]`` -> (preset, overrides); ``common`` (``--set``)
    applies to every preset except the all_enclave reference."""
    name, _, rest = spec.partition(":")
    overrides = {} if name == BASELINE else dict(common)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--presets {spec!r}: expected key=value after ':', got {item!r}")
        overrides[key.strip()] = _value(value.strip())
    return name, overrides


def label(preset: str, overrides: dict[str, Any]) -> str:
    return preset + "".join(f" {k}={v}" for k, v in overrides.items())


# -- instrumentation ----------------------------------------------------------------------------


class Clock:
    """Adds up seconds per key while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.totals = {}
        self.counts = {}

    def add(self, key: str, seconds: float, count: int = 1) -> None:
        if self.on:
            self.totals[key] = self.totals.get(key, 0.0) + seconds
            self.counts[key] = self.counts.get(key, 0) + count

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - start)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


def _nbytes(tensors: Any) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


class TimingRunner:
    """Wraps a :class:`StageRunner`: time inside ``run``, calls, and bytes each way."""

    def __init__(self, inner: Any, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock

    def run(self, stage: str, tensors: list[torch.Tensor], expected: Any = None) -> Any:
        start = time.perf_counter()
        outs = self.inner.run(stage, tensors, expected)
        self.clock.add("gpu", time.perf_counter() - start)
        self.clock.add("bytes_to_gpu", 0.0, _nbytes(tensors))
        self.clock.add("bytes_from_gpu", 0.0, _nbytes(outs))
        return outs

    def __getattr__(self, name: str) -> Any:  # anything else a runner offers
        return getattr(self.inner, name)


class Instrumented:
    """Wraps an executor's enclave stage modules, online corrections and integrity checks."""

    def __init__(self, executor: Any, clock: Clock) -> None:
        import enclave_runtime.integrity as integrity_module

        self.executor = executor
        self.clock = clock
        self._undo: list[Callable[[], None]] = []
        # what runs each enclave stage: its graph, or its compiled library (partitioner.aot)
        resolve = executor._module
        self._swap(executor, "_module", lambda s: clock.wrap("enclave_stages", resolve(s)))
        prot = executor.spec.protection
        if prot is not None:
            pooled = set(getattr(prot, "pooled", ()) or ())
            for name, corr in (getattr(prot, "corrections", None) or {}).items():
                if name not in pooled and getattr(corr, "module", None) is not None:
                    self._swap(corr, "module", clock.wrap("corrections", corr.module))
        # exact masking checks with one RingCheck per GPU stage, held by the executor
        for check in (getattr(executor, "ring_checks", None) or {}).values():
            self._swap(check, "expect", clock.wrap("checks", check.expect))
            self._swap(check, "verify", clock.wrap("checks", check.verify))
        # float masks: the executor calls ``integrity.check`` through the module
        if hasattr(integrity_module, "check"):
            self._swap(integrity_module, "check", clock.wrap("checks", integrity_module.check))
        self._swap(executor, "runner", TimingRunner(executor.runner, clock))

    def _swap(self, obj: Any, attr: str, new: Any) -> None:
        old = getattr(obj, attr)
        setattr(obj, attr, new)
        self._undo.append(lambda: setattr(obj, attr, old))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


# -- one preset, one workload -------------------------------------------------------------------

REPLAY_SEED = "teebound"  # both executors of a workload draw the same pads from it


class Recorder:
    """A runner that keeps every reply, in call order, for :class:`Replay`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.replies: list[tuple[str, list[torch.Tensor]]] = []

    def run(self, stage: str, tensors: list[torch.Tensor], expected: Any = None, **kw: Any) -> Any:
        outs = self.inner.run(stage, tensors, expected, **kw)
        self.replies.append((stage, [o.clone() for o in outs]))
        return outs

    def release(self, stage: str, rows: Any) -> None:
        self.inner.release(stage, rows)


class Replay:
    """The GPU as a recording: each call gets the reply the real stage gave the same call of
    an executor with the same seed (so the same pads: the replies are right, and every check
    passes). What it costs the enclave is a list lookup, and it leaves the CPU's caches to
    the enclave, as a real GPU does. ``seconds`` adds up the time spent in :meth:`run` (the
    lookup and the copy of the reply), which a call's enclave time leaves out."""

    # stands in for a remote GPU behind a serialising client (``WorkerClient``), which never
    # writes what it is handed: the executor hands it its own tensors, as it hands the client
    copies_inputs = True

    def __init__(self, replies: list[tuple[str, list[torch.Tensor]]]) -> None:
        self.replies = replies
        self.next = 0
        self.seconds = 0.0

    def run(self, stage: str, tensors: list[torch.Tensor], expected: Any = None, **_: Any) -> Any:
        start = time.perf_counter()
        name, outs = self.replies[self.next]
        if name != stage:
            raise AssertionError(f"replay out of step: {stage} called where {name} was")
        self.next += 1
        outs = [o.clone() for o in outs]
        self.seconds += time.perf_counter() - start
        return outs

    def release(self, stage: str, rows: Any) -> None:
        pass


def replay(
    split: Any,
    args: tuple[Any, ...],
    public: bool,
    replies: list[tuple[str, list[torch.Tensor]]],
    fills: int,
    batch: int,
    warm_up: bool,
    paired: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """The enclave's time per request with the GPU's replies replayed (:class:`Replay`), in
    the same call order as :func:`measure`'s executor: on this machine the CPU also runs the
    GPU stages, whose weights (a float64 copy of every masked layer) evict the enclave's
    working set from the caches between every two enclave stages; a real GPU does not.

    The recording is replayed twice, each time by a fresh executor with the same seed (the
    same pads). First with nothing wrapped: ``replay_online_ms`` is a call's time less the
    replay's own (:attr:`Replay.seconds`). Then with the executor's parts wrapped in timers
    (:class:`Instrumented`) for the breakdown, stages and checks: those timers cost a split
    a few microseconds per GPU round trip, ~120 a decode step, which all_enclave (one stage)
    does not pay, so the online figure is not taken from that pass
    (``replay_online_instrumented_ms`` shows what it would have been).

    ``paired``: one call of all_enclave on the same workload. In the plain pass each call is
    then preceded by one such call, so that both see the same moment of a shared, noisy host:
    ``replay_paired_speedup`` is the median of all_enclave's times over the median of this
    preset's, from calls made in turn (``replay_paired_base_ms`` is the former). That is
    against the split: all_enclave's call streams every weight through the caches just before
    each of the split's calls, whose working set (the KV cache, the mask set, the libraries'
    code) then starts cold, which a server decoding a request does not see. So the recording
    is then replayed a third time in steady state (:func:`steady_state`: each side's calls
    back to back in blocks, A B B A, each block's first half left out as its warm-up):
    ``replay_steady_speedup`` is the median of all_enclave's calls over the median of this
    preset's (``replay_steady_base_ms``, ``replay_steady_ms``), ``replay_steady_rounds`` each
    round's ratio."""

    def executor() -> Any:
        ex = split.executor(Replay(replies), seed=REPLAY_SEED)
        if ex.pool is not None:
            binding = ex.binding(ex.signature.bind(args, {}))
            for _ in range(fills):
                ex.pool.fill(binding, batch, batch=batch)
        return ex

    plain: list[float] = []
    base: list[float] = []
    ex = executor()
    with torch.no_grad():
        if warm_up:
            ex.run(args, {}, public_tokens=public)
        for _ in range(0 if replies else 3):  # no GPU call (all_enclave): nothing to replay
            start = time.perf_counter()
            ex.run(args, {}, public_tokens=public)
            plain.append(time.perf_counter() - start)
        while ex.runner.next < len(replies):
            if paired is not None:
                base.append(seconds(paired))
            plain.append(replayed_call(ex, args, public))
    pooled_only(ex, "plain replay")
    steady, steady_base, steady_rounds, positions = steady_state(
        executor, args, public, len(plain) + warm_up, paired
    )
    ex = executor()
    clock = Clock()
    inst = Instrumented(ex, clock)
    calls: list[dict[str, float]] = []
    try:
        with torch.no_grad():
            if warm_up:
                ex.run(args, {}, public_tokens=public)
            while ex.runner.inner.next < len(replies):
                clock.reset()
                clock.on = True
                start = time.perf_counter()
                ex.run(args, {}, public_tokens=public)
                total = time.perf_counter() - start
                clock.on = False
                t = clock.totals
                calls.append({"online": total - t.get("gpu", 0.0), **t})
            if not calls:  # a preset with no GPU call: the loops above never ran
                for _ in range(3):
                    start = time.perf_counter()
                    ex.run(args, {}, public_tokens=public)
                    calls.append({"online": time.perf_counter() - start})
    finally:
        clock.on = False
        inst.restore()
    pooled_only(ex, "timed replay")

    def med(key: str) -> float:
        return median([c.get(key, 0.0) for c in calls]) * 1e3

    paired_figures = (
        {
            "replay_paired_base_ms": median(base) * 1e3,
            "replay_paired_speedup": median(base) / median(plain),
        }
        if base
        else {}
    )
    if steady:
        paired_figures.update(
            replay_steady_calls=len(steady),
            replay_steady_base_ms=median(steady_base) * 1e3,
            replay_steady_ms=median(steady) * 1e3,
            replay_steady_speedup=median(steady_base) / median(steady),
            replay_steady_rounds=steady_rounds,
            replay_steady_positions_ms=[round(t * 1e3, 3) for t in positions],
        )
    return {
        **paired_figures,
        "replay_calls": len(plain),
        "replay_online_ms": median(plain) * 1e3,
        "replay_online_instrumented_ms": med("online"),
        "replay_stages_ms": med("enclave_stages"),
        "replay_checks_ms": med("checks"),
    }


def steady_state(
    executor: Callable[[], Any],
    args: tuple[Any, ...],
    public: bool,
    calls: int,
    paired: Callable[[], Any] | None,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """The recording replayed by a fresh executor in two blocks of back-to-back calls (all it
    serves: ``calls``), in rounds with blocks of all_enclave's calls in the order A B B A (so
    that a drift of the host's load over the seconds they take falls on both sides alike);
    each block's first half left out as its warm-up.

    Why half: after a block of the other side's calls (or any pass over a few hundred MiB), a
    decode step here is not warm after one call but after ~8 (~50 ms of calls): `slalom`'s
    steps after all_enclave's took 8.5, 7.9, 7.4, 6.9, 6.7, 6.5, 6.4, 6.3, 6.1, 6.1 ms, and
    alike after a 600 MiB buffer was merely written (stop 53; the caches' replacement policy
    adapting after a stream, by the look of it), against 5.7 ms with nothing in between.

    Returns (this preset's timed calls less the replay's own, all_enclave's, each round's
    ratio of medians, this preset's calls by their position in a block, the mean of its two
    blocks, warm-up included). Empty with fewer than 2 timed calls a block (``calls`` < 8)
    or without ``paired``."""
    half = calls // 2
    if paired is None or half < 4:
        return [], [], [], []
    ex = executor()  # its fill evicts the caches too: each block starts cold anyway

    def base_block() -> list[float]:
        return [seconds(paired) for _ in range(half)]

    def split_block(count: int) -> list[float]:
        return [replayed_call(ex, args, public) for _ in range(count)]

    with torch.no_grad():
        base_1 = base_block()
        split_1 = split_block(half)
        split_2 = split_block(calls - half)
        base_2 = base_block()
    if ex.runner.next != len(ex.runner.replies):
        raise AssertionError("the steady-state pass did not replay the whole recording")
    pooled_only(ex, "steady-state")
    positions = [(a + b) / 2 for a, b in zip(split_1, split_2, strict=False)]
    base_1, base_2 = base_1[half // 2 :], base_2[half // 2 :]
    split_1, split_2 = split_1[half // 2 :], split_2[len(split_2) // 2 :]
    rounds = [median(base_1) / median(split_1), median(base_2) / median(split_2)]
    return split_1 + split_2, base_1 + base_2, rounds, positions


def seconds(call: Callable[[], Any]) -> float:
    """How long one ``call()`` took."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def replayed_call(ex: Any, args: tuple[Any, ...], public: bool) -> float:
    """How long one call of ``ex`` (a :class:`Replay` runner's executor) took, less the
    replay's own time (:attr:`Replay.seconds`)."""
    before = ex.runner.seconds
    took = seconds(lambda: ex.run(args, {}, public_tokens=public))
    return took - (ex.runner.seconds - before)


def pooled_only(ex: Any, what: str) -> None:
    """Every call of a replayed pass took a pooled mask set: one drawn on the spot would be
    counted as online work (the replay's fills match the measured pass's, which asserts the
    same)."""
    if ex.pool is not None and ex.pool.misses:
        raise AssertionError(f"{ex.pool.misses} pool misses during the {what} pass")


def enclave_allocator(caching: bool = True) -> None:
    """This process as the enclave's: run again with its glibc settings if they are not set
    (glibc reads them only when a process starts), then, with ``caching``, its caching CPU
    allocator (``enclave_runtime.allocator``). SystemExit if that cannot be installed."""
    from enclave_runtime import allocator

    if not allocator.tuned():
        if os.environ.get("TEESPLIT_RESTARTED"):  # glibc dropped them (a secure-mode process)
            print(f"GLIBC_TUNABLES={allocator.TUNABLES} did not hold: running without it")
        else:
            print(f"running again with the enclave process's GLIBC_TUNABLES={allocator.TUNABLES}")
            sys.stdout.flush()
            env = {**allocator.environment(), "TEESPLIT_RESTARTED": "1"}
            os.execve(sys.executable, sys.orig_argv, env)
    if caching:
        why = allocator.install()
        if why is not None:
            raise SystemExit(f"the caching CPU allocator: {why}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


class Timeout(Exception):
    """A preset's workload ran past ``--timeout``."""


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout


def measure(
    split: Any,
    args: tuple[Any, ...],
    public: bool,
    repeats: int,
    batch: int,
    fills: int,
    draw_budget: float,
    phase: dict[str, str],
    paired: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Time one workload on a fresh executor of ``split`` (see the module docstring);
    ``phase["now"]`` says what it is doing (for a timeout's message)."""
    from enclave_runtime.executor import InProcessRunner

    recorder = Recorder(InProcessRunner(split.spec))
    ex = split.executor(recorder, seed=REPLAY_SEED)
    env = ex.signature.bind(args, {})
    binding = ex.binding(env)
    pool = ex.pool
    fill_s: list[float] = []  # seconds per batched fill of ``batch`` sets
    prepare_s = 0.0
    sets = repeats + 1  # one for the warm-up
    stocked = 0  # batched fills that stocked the pool for the calls (a replay draws as many)
    if pool is not None:
        # once per executor, not per set: the correction weights packed as int8 digits (or
        # made float64), and one untimed fill, in which oneDNN generates its kernels for the
        # fill's shapes (a first fill of 64 decode sets took 16 ms a set, the next 4-5 ms);
        # a pool refilling in the background pays that once, not per request
        phase["now"] = "preparing the correction weights"
        start = time.perf_counter()
        for stage in getattr(pool.protection, "pooled", ()) or ():
            pool._prepared(stage)
        pool.fill(binding, batch, batch=batch)
        prepare_s = time.perf_counter() - start
        stocked = 1
        # the sets the warm-up and timed calls take, untimed: the first ones of this
        # executor's stream, which each replay (same seed) draws again and so matches the
        # recorded replies
        spent = 0.0
        while pool.available(binding) < sets and spent < draw_budget:
            phase["now"] = f"stocking {sets} mask sets for the timed calls"
            start = time.perf_counter()
            pool.fill(binding, batch, batch=batch)
            spent += time.perf_counter() - start
            stocked += 1
        sets = pool.available(binding)
    warm_up = sets >= 2  # a single expensive set goes to one timed call, without a warm-up
    timed_calls = min(repeats, sets - 1) if warm_up else 1
    misses = pool.misses if pool is not None else 0
    clock = Clock()
    inst = Instrumented(ex, clock)
    calls: list[dict[str, float]] = []
    try:
        with torch.no_grad():
            if warm_up:
                phase["now"] = "in the warm-up call"
                ex.run(args, {}, public_tokens=public)
            for i in range(timed_calls):
                phase["now"] = f"in timed call {i + 1}"
                clock.reset()
                clock.on = True
                start = time.perf_counter()
                ex.run(args, {}, public_tokens=public)
                total = time.perf_counter() - start
                clock.on = False
                t = clock.totals
                calls.append(
                    {
                        "call": total,
                        "gpu": t.get("gpu", 0.0),
                        "enclave_stages": t.get("enclave_stages", 0.0),
                        "corrections": t.get("corrections", 0.0),
                        "checks": t.get("checks", 0.0),
                        "round_trips": clock.counts.get("gpu", 0),
                        "bytes_to_gpu": clock.counts.get("bytes_to_gpu", 0),
                        "bytes_from_gpu": clock.counts.get("bytes_from_gpu", 0),
                    }
                )
    finally:
        signal.alarm(0)  # nothing interrupts the restore
        clock.on = False
        inst.restore()
    if pool is not None and pool.misses != misses:
        raise AssertionError(f"{pool.misses - misses} pool misses during the timed calls")
    if pool is not None:
        # Timed fills, after the calls, into recycled memory: each batch is dropped once
        # timed, so the next fill reuses its blocks, as a serving pool refilling what
        # requests took does. A fill that grows the process instead pays this VM's first
        # touch of memory its hypervisor has not backed yet (600 MiB blocks touched in a
        # loop: ~100 ms each, ~950 ms each past ~7.5 GiB), which made a prefill set cost
        # 1.2-1.8 s in place of ~0.4 s late in a long run (benchmarks/README.md, stop 53).
        # The sets the calls left go first: the pool is first in, first out, and a set left
        # over keeps its whole batch's buffer, which the next fill would then not reuse.
        while pool.available(binding):
            pool.take(binding)
        while len(fill_s) < max(fills, 1) and (not fill_s or spent < draw_budget):
            phase["now"] = f"drawing batched fill {len(fill_s) + 1} ({batch} mask sets)"
            start = time.perf_counter()
            pool.fill(binding, batch, batch=batch)
            fill_s.append(time.perf_counter() - start)
            spent += fill_s[-1]
            for _ in range(batch):
                pool.take(binding)
    phase["now"] = "replaying the GPU's replies"
    replayed = replay(split, args, public, recorder.replies, stocked, batch, warm_up, paired)

    def med(key: str) -> float:
        return median([c[key] for c in calls])

    online = median([c["call"] - c["gpu"] for c in calls])
    loop = median(
        [c["call"] - c["gpu"] - c["enclave_stages"] - c["corrections"] - c["checks"] for c in calls]
    )
    masking = getattr(split.protection, "masking", "none") if split.protection else "none"
    enclave_ops = sum(
        node.op == "call_function"
        for stage in split.stages
        if stage.side != "gpu" and hasattr(stage.module, "graph")
        for node in stage.module.graph.nodes
    )
    return {
        "binding": dict(binding),
        "masking": masking,
        "stages": len(split.stages),
        "gpu_stages": sum(s.side == "gpu" for s in split.stages),
        "enclave_ops": enclave_ops,  # call_function nodes in the enclave stages
        "timed_calls": timed_calls,
        "warm_up": warm_up,
        "call_ms": med("call") * 1e3,
        "enclave_online_ms": online * 1e3,
        "enclave_stages_ms": med("enclave_stages") * 1e3,
        "corrections_ms": med("corrections") * 1e3,
        "checks_ms": med("checks") * 1e3,
        "loop_ms": loop * 1e3,
        "gpu_ms": med("gpu") * 1e3,
        # per request: a batched fill's time over its size (median over the fills)
        "offline_ms": median(fill_s) / batch * 1e3,
        "offline_batch": batch if pool is not None else None,
        "offline_fills": len(fill_s),
        "offline_fill_ms": median(fill_s) * 1e3,
        "offline_rate_sets_s": batch / median(fill_s) if fill_s else None,
        "offline_prepare_ms": prepare_s * 1e3,
        "round_trips": int(med("round_trips")),
        "bytes_to_gpu": int(med("bytes_to_gpu")),
        "bytes_from_gpu": int(med("bytes_from_gpu")),
        "pool_misses": 0 if pool is None else pool.misses - misses,
        **replayed,
    }


# -- main ----------------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def workloads_for(
    adapter: Path | None = None,
) -> tuple[Any, Any, dict[str, tuple[tuple[Any, ...], bool]]]:
    """SmolLM2-135M (with the peft ``adapter`` folder's LoRA injected, when given), its
    captured decoder step, and the two workloads: name -> (call args, public_tokens). The
    prompt's tokens are private (RNM sanitises all 128); a generated token is public (the GPU
    computed it), as ``enclave_runtime.generation`` does."""
    from partitioner.generation import DecoderStep, cache_shape, capture_decoder
    from partitioner.zoo import smollm2

    model = smollm2()
    if adapter is not None:  # peft injects the adapter's layers into the model in place
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).get_base_model().eval()
    heads, head_dim = cache_shape(model)
    layers = int(model.config.num_hidden_layers)
    ids = torch.randint(0, model.config.vocab_size, (1, CONTEXT))
    empty = [torch.zeros(1, heads, 0, head_dim) for _ in range(2 * layers)]
    whole = torch.zeros(1, 1, dtype=torch.long)  # no row padded
    with torch.no_grad():  # the prompt's real cache for the decode step
        past = list(DecoderStep(model)(ids, whole, empty)[1:])
    next_id = torch.randint(0, model.config.vocab_size, (1, 1))
    workloads = {
        "prefill": ((ids, whole, empty), False),
        "decode": ((next_id, whole, past), True),
    }
    return model, capture_decoder(model), workloads


def add_speedups(rows: list[dict[str, Any]], online_key: str, prefix: str) -> None:
    """``{prefix}speedup_online``/``{prefix}speedup_with_offline`` per row, against
    all_enclave's ``online_key`` in the same mode, and (suffix ``_vs_eager``) in eager mode."""
    base = {
        (r["workload"], r["enclave"]): r[online_key]
        for r in rows
        if r["preset"] == BASELINE and "error" not in r
    }
    for r in rows:
        if "error" in r:
            continue
        for suffix, mode in (("", r["enclave"]), ("_vs_eager", "eager")):
            ref = base.get((r["workload"], mode))
            if ref is None:
                continue
            online, offline = r[online_key], r["offline_ms"]
            r[f"{prefix}speedup_online{suffix}"] = ref / online if online > 0 else math.inf
            r[f"{prefix}speedup_with_offline{suffix}"] = (
                ref / (online + offline) if online + offline > 0 else math.inf
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)  # the steady pass needs >= 7
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=47,
        help="timed calls of the decode step (default 47; --repeats for the prefill): the "
        "steady-state pass replays them in blocks of half, each block's first half a warm-up",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="mask sets per batched pool.fill (default: "
        + ", ".join(f"{w} {b}" for w, b in DEFAULT_BATCH.items())
        + ")",
    )
    parser.add_argument(
        "--fills",
        type=int,
        default=1,
        help="batched fills timed after the calls (offline; fewer past --draw-budget)",
    )
    parser.add_argument(
        "--draw-budget",
        type=float,
        default=45.0,
        help="seconds of batched fills per preset and workload before fewer calls are timed",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=150,
        help="seconds per preset and workload; past it the row says where it stopped",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); 1 keeps figures stable on a shared machine",
    )
    parser.add_argument(
        "--enclave",
        nargs="+",
        choices=["eager", "aot", "step"],
        default=["eager", "aot"],
        help="how the enclave runs its stages: op by op (eager), compiled ahead of time "
        "(partitioner.aot, every preset and all_enclave alike), or, where a program allows "
        "it, all of them as one compiled library calling back for the GPU stages "
        "(partitioner.aot_step; else as aot); each mode has its own baseline",
    )
    parser.add_argument(
        "--aot-cache",
        default=str(ROOT / "build" / "aot-cache"),
        help="where compiled enclave libraries are kept between runs (keyed by structure)",
    )
    parser.add_argument("--quick", action="store_true", help="1 timed call, 1 fill: a smoke run")
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, metavar="NAME[:K=V,..]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--project", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--adapter",
        default=str(DEFAULT_ADAPTER),
        help="a peft LoRA folder injected into SmolLM2 for every preset ('' for none)",
    )
    parser.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="all_enclave with its linear layers free, eager and compiled (benchmarks/ceiling.py)",
    )
    parser.add_argument(
        "--allocator",
        choices=["caching", "torch"],
        default="caching",
        help="the process's CPU allocator, for every preset and all_enclave alike: the "
        "enclave driver's caching one (enclave_runtime.allocator), or torch's own",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teebound.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.fills, args.draw_budget = 1, 1, min(args.draw_budget, 20.0)
        args.decode_repeats = 1
        args.timeout = min(args.timeout, 90)
    if args.batch is not None and args.batch < 1:
        raise SystemExit("--batch: at least 1")
    batches = {w: args.batch or b for w, b in DEFAULT_BATCH.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    enclave_allocator(caching=args.allocator == "caching")
    common = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        common[key] = _value(value)
    presets = [parse_preset(p, common) for p in args.presets]
    if BASELINE not in [name for name, _ in presets]:
        presets.insert(0, (BASELINE, {}))
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    from enclave_runtime.executor import InProcessRunner
    from partitioner.aot import compile_enclave, why_eager
    from partitioner.aot_step import compile_step
    from partitioner.api import partition
    from partitioner.errors import TeesplitError
    from partitioner.generation import DecoderStep
    from partitioner.policy import Policy

    started = time.perf_counter()
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        if args.adapter != str(DEFAULT_ADAPTER):
            raise SystemExit(f"--adapter {adapter}: no peft adapter there")
        print(f"no adapter at {adapter} (benchmarks/finetune.py trains it): the base model alone")
        adapter = None
    model, step, workloads = workloads_for(adapter)
    layers = int(model.config.num_hidden_layers)
    eager = {}  # the plain model's decoder step, for reference (all_enclave should match it)
    with torch.no_grad():
        for workload, (call_args, _) in workloads.items():
            eager_step = DecoderStep(model)
            eager_step(*call_args)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                eager_step(*call_args)
                times.append(time.perf_counter() - t0)
            eager[workload] = median(times) * 1e3
    print(
        f"SmolLM2-135M ({layers} layers), batch 1: prefill of {CONTEXT} tokens and one decode "
        f"step at context {CONTEXT}; {torch.get_num_threads()} torch thread(s); "
        f"{args.allocator} CPU allocator; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}; "
        f"repeats {args.repeats} (decode {args.decode_repeats}); "
        f"setup {time.perf_counter() - started:.0f} s"
    )

    rows: list[dict[str, Any]] = []
    baseline_calls: dict[str, Callable[[], Any]] = {}  # workload -> one all_enclave call
    ceilings: dict[str, dict[str, Any]] = {}  # workload -> benchmarks/ceiling.py's figures
    unexpected = False
    for name, overrides in presets:
        row_label = label(name, overrides)
        t0 = time.perf_counter()
        try:
            policy = Policy.preset(name, **overrides)
            split = partition(step, policy)
        except TeesplitError as exc:
            rows.append({"preset": row_label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {row_label}: refused ({type(exc).__name__}: {exc})")
            continue
        except Exception as exc:  # a preset broken mid-edit: report it, keep the others
            unexpected = True
            traceback.print_exc()
            rows.append({"preset": row_label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        partition_s = time.perf_counter() - t0
        if name == BASELINE and not overrides and args.ceiling:
            for workload, (call_args, _) in workloads.items():
                ceilings[workload] = ceiling(split, call_args, args.repeats, compile=True)
        compiled: dict[str, Any] = {}
        step_library: Any = None
        for mode, (workload, (call_args, public)) in itertools.product(
            args.enclave, workloads.items()
        ):
            if mode == "step" and step_library is None:
                t2 = time.perf_counter()
                try:
                    step_library = compile_step(split, args.aot_cache)
                    print(f"  {row_label}: step library ({time.perf_counter() - t2:.0f} s)")
                except Exception as exc:  # NotLowerable, or export's and Inductor's
                    step_library = False
                    why = why_eager(exc)
                    print(f"  {row_label}: no step library ({why}): one library per stage")
            split.spec.step = step_library if mode == "step" and step_library else None
            if mode in ("aot", "step") and not compiled:
                t2 = time.perf_counter()
                report = compile_enclave(split, args.aot_cache)
                compiled = {s.name: s.compiled for s in split.stages if s.compiled is not None}
                print(
                    f"  {row_label}: {len(report.compiled)} enclave stages compiled "
                    f"({len(report.libraries)} libraries, {time.perf_counter() - t2:.0f} s)"
                    + (f", {len(report.eager)} eager: {report.eager}" if report.eager else "")
                )
            for stage in split.stages:
                stage.compiled = compiled.get(stage.name) if mode != "eager" else None
            t1 = time.perf_counter()
            phase = {"now": "starting"}
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(args.timeout)
            try:
                result = measure(
                    split,
                    call_args,
                    public,
                    args.decode_repeats if workload == "decode" else args.repeats,
                    batches[workload],
                    args.fills,
                    args.draw_budget,
                    phase,
                    baseline_calls.get(workload),
                )
            except Timeout:
                why = f"timed out after {args.timeout} s, {phase['now']}"
                rows.append({"preset": row_label, "workload": workload, "error": why})
                print(f"  {row_label} {workload}: {why}")
                continue
            except Exception as exc:
                if not isinstance(exc, TeesplitError):
                    unexpected = True
                    traceback.print_exc()
                rows.append(
                    {
                        "preset": row_label,
                        "workload": workload,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                print(f"  {row_label} {workload}: failed ({type(exc).__name__}: {exc})")
                continue
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            result.update(
                preset=row_label,
                workload=workload,
                enclave=mode,
                partition_s=partition_s,
                # at the plan's reference dims (one token at a 128-token context)
                gpu_flop_share=1.0 - split.share()["flops"],
            )
            rows.append(result)
            if name == BASELINE and not overrides and len(args.enclave) == 1:
                # all_enclave's calls to pair with each preset's replayed calls (one mode
                # only: an executor reads its stages' compiled libraries when called, and a
                # second mode would swap them)
                base_ex = split.executor(InProcessRunner(split.spec), seed=REPLAY_SEED)
                baseline_calls[workload] = functools.partial(
                    base_ex.run, call_args, {}, public_tokens=public
                )
            print(
                f"  {row_label} {workload} ({mode}): "
                f"enclave online {result['enclave_online_ms']:.1f} ms, "
                f"GPU {result['gpu_ms']:.1f} ms, offline "
                + (
                    f"{result['offline_ms']:.1f} ms per set (batch {result['offline_batch']})"
                    if result["offline_batch"]
                    else "none (no mask pool)"
                )
                + f" ({time.perf_counter() - t1:.0f} s)"
            )

    # in run and replayed, each against all_enclave run the same way (like for like) and
    # against eager all_enclave
    add_speedups(rows, "enclave_online_ms", "")
    add_speedups(rows, "replay_online_ms", "replay_")
    for r in rows:  # paired: all_enclave's calls made in turn with this preset's
        if "replay_paired_base_ms" in r:
            r["replay_paired_speedup_with_offline"] = r["replay_paired_base_ms"] / (
                r["replay_online_ms"] + r["offline_ms"]
            )
        if "replay_steady_base_ms" in r:
            r["replay_steady_speedup_with_offline"] = r["replay_steady_base_ms"] / (
                r["replay_steady_ms"] + r["offline_ms"]
            )

    print("\n## SmolLM2-135M: enclave time per request (ms, medians; this CPU runs both sides)\n")
    print(
        "| workload | enclave | preset | masking | calls | T_enclave online | enclave stages "
        "| corrections "
        "| checks | loop | T_gpu | offline/request | offline batch | sets/s | round trips "
        "| kB to GPU | kB from GPU | GPU FLOPs | speedup online | speedup incl. offline "
        "| online ÷ eager all_enclave |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        for r in rows:
            if r.get("workload", workload) != workload:
                continue
            if "error" in r:
                print(f"| {workload} | – | {r['preset']} | {r['error']} |" + " |" * 17)
                continue
            print(
                f"| {workload} | {r['enclave']} | {r['preset']} | {r['masking']} | "
                f"{r['timed_calls']}"
                f"{'' if r['warm_up'] else ' (no warm-up)'} | "
                f"{r['enclave_online_ms']:.2f} | {r['enclave_stages_ms']:.2f} | "
                f"{r['corrections_ms']:.2f} | {r['checks_ms']:.2f} | {r['loop_ms']:.2f} | "
                f"{r['gpu_ms']:.2f} | {r['offline_ms']:.2f} | {fmt(r['offline_batch'], 'd')} | "
                f"{fmt(r['offline_rate_sets_s'], '.1f')} | {r['round_trips']} | "
                f"{r['bytes_to_gpu'] / 1e3:,.1f} | {r['bytes_from_gpu'] / 1e3:,.1f} | "
                f"{r['gpu_flop_share']:.1%} | {fmt(r.get('speedup_online'), '.2f')} | "
                f"{fmt(r.get('speedup_with_offline'), '.2f')} | "
                f"{fmt(r.get('speedup_online_vs_eager'), '.2f')} |"
            )
    print("\n## The same with the GPU's replies replayed (the CPU's caches left to the enclave)\n")
    print(
        "| workload | enclave | preset | T_enclave online | (with timers) | enclave stages "
        "| checks | offline/request | speedup online | speedup incl. offline "
        "| all_enclave in turn | **paired speedup online** | paired incl. offline "
        "| steady: T_enclave online | steady: all_enclave | **steady speedup online** "
        "| steady incl. offline | online ÷ eager all_enclave |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        for r in rows:
            if r.get("workload", workload) != workload or "error" in r:
                continue
            print(
                f"| {workload} | {r['enclave']} | {r['preset']} | {r['replay_online_ms']:.2f} | "
                f"{r['replay_online_instrumented_ms']:.2f} | "
                f"{r['replay_stages_ms']:.2f} | {r['replay_checks_ms']:.2f} | "
                f"{r['offline_ms']:.2f} | {fmt(r.get('replay_speedup_online'), '.2f')} | "
                f"{fmt(r.get('replay_speedup_with_offline'), '.2f')} | "
                f"{fmt(r.get('replay_paired_base_ms'), '.2f')} | "
                f"{fmt(r.get('replay_paired_speedup'), '.2f')} | "
                f"{fmt(r.get('replay_paired_speedup_with_offline'), '.2f')} | "
                f"{fmt(r.get('replay_steady_ms'), '.2f')} | "
                f"{fmt(r.get('replay_steady_base_ms'), '.2f')} | "
                f"{fmt(r.get('replay_steady_speedup'), '.2f')}"
                + (
                    " (rounds " + " / ".join(f"{x:.2f}" for x in r["replay_steady_rounds"]) + ")"
                    if r.get("replay_steady_rounds")
                    else ""
                )
                + " | "
                f"{fmt(r.get('replay_steady_speedup_with_offline'), '.2f')} | "
                f"{fmt(r.get('replay_speedup_online_vs_eager'), '.2f')} |"
            )
    print(
        "\nPlain eager decoder step (no split), for reference: "
        + ", ".join(f"{w} {ms:.1f} ms" for w, ms in eager.items())
    )
    print(
        "T_enclave online = call - T_gpu = stages + corrections + checks + loop; "
        "offline/request = time of pool.fill(binding, B, batch=B) / B (sets/s = B / that time; "
        "B: " + ", ".join(f"{w} {b}" for w, b in batches.items()) + "); speedups are "
        "T_enclave(all_enclave) over T_enclave online (and + offline). Replayed: T_enclave "
        "online from calls with nothing wrapped (the replay's own time left out); the stages "
        "and checks, and '(with timers)', from a second replay with the executor's parts "
        "timed; paired: each of those calls preceded by one all_enclave call (one --enclave "
        "mode only), the speedup from the medians of the two; steady: a third replay, each "
        "side's calls back to back in blocks (A B B A, A all_enclave's), each block's first "
        "half left out as its warm-up, the two rounds' ratios in brackets."
    )

    if ceilings:
        print_ceiling(ceilings)

    projection = rates = None
    if args.project:
        rates = cpu_rates(args.quick)
        # this implementation's fixed enclave cost per layer, from a slalom-like decode row
        decode = [
            r
            for r in rows
            if r.get("workload") == "decode"
            and r.get("preset", "").startswith("slalom")
            and "error" not in r
        ]
        exact = [r for r in decode if r["masking"] == "exact"] or decode  # the projection's
        best = min(exact, key=lambda r: r["enclave_online_ms"]) if exact else None
        measured = None if best is None else {**best, "layers": layers}
        ops = offline_ops(batches["decode"], args.quick)
        projection = project(rates, measured, batches["decode"], ops, CONTEXT)
        print_projection(rates, projection)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": "SmolLM2-135M-Instruct (float32)"
        + (f" + LoRA adapter {adapter}" if adapter else ""),
        "context": CONTEXT,
        "batch": 1,
        "threads": torch.get_num_threads(),
        "allocator": args.allocator,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "offline_batch": batches,
        # timed fills reuse the memory of the batch before (see measure)
        "offline_fill_memory": "recycled",
        "quick": args.quick,
        "presets": args.presets,
        "eager_ms": eager,
        "rows": rows,
        "cpu_rates": rates,
        "ceiling": ceilings,
        "projection_llama2_7b": projection,
        "seconds": time.perf_counter() - started,
    }
    out.write_text(json.dumps(document, indent=1, default=str))
    print(f"\nwritten to {out} ({time.perf_counter() - started:.0f} s in all)")
    if unexpected:
        sys.exit(1)


if __name__ == "__main__":
    main()
