"""Split generation speed against transformers' ``generate`` on SmolLM2-135M (issue #4).

For each preset, greedy generation of ``--new`` tokens (EOS ignored, so every run makes the
same amount of work; tests check token equality) from a chat prompt, timed end to end
(prefill included):

* ``transformers``: ``model.generate`` with its KV cache, the reference;
* ``in-process``: the split program's stages all in this process (:func:`generate`);
* ``two processes``: the saved bundle, GPU stages in a worker process (KServe v2 gRPC over a
  Unix socket: one stream per generation) running them with torch, and with onnxruntime (the
  compute the Triton row's Python backend runs, so the two differ in server and protocol only),
  the enclave side here (``enclave_runtime.driver.connect``), with the bytes that crossed;
* ``Triton`` (``--triton``): the same bundle exported by ``teesplit export-triton`` and served by
  a real ``tritonserver`` (PyTriton's, Python backend running the ONNX stages on the CPU:
  ``runtime.local_triton``) over TCP loopback.

Per remote run: bytes per generated token each way (whole KServe messages as serialised:
payloads, names, shapes, ids), and the total against the plan's own
minimum (:func:`plan_minimum`: what the plan's edges carry over the prefill and every decode
step, where a cache the GPU holds never crosses; under cmif, the embedding row of each position
up and the last position's logits back), and the mean round trip of one GPU-stage call as the
client sees it, with the server's own compute time per call (its ``ModelStatistics``).

In-process, the mask pool is *not* filled ahead: each decode step has a new cache length, so
its masks, pads and precomputable corrections are drawn during the request, as a server
without idle time would. "pool prefilled" repeats the run after drawing every step's set
ahead, the best case of a server that prepares masks between requests.

Everything runs on this machine's CPU (no GPU is lent here), so "GPU" time is CPU time too.
Bundles are saved once under ``build/bench-runtime/`` and reused. Medians of ``--repeats``.

    python benchmarks/runtime.py [--new 32] [--repeats 3] [--presets cmif secureinfer slalom]
                                 [--triton]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "What is the capital of France?"


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_pool(executor: Any, prompt_len: int, new: int) -> None:
    """Draw the mask set of every step of one generation ahead (prefill, then seq=1) into
    ``executor``'s pool."""
    if executor.pool is None:
        return
    executor.pool.fill({"batch": 1, "seq": prompt_len, "past": 0}, 1)
    for past in range(prompt_len, prompt_len + new - 1):
        executor.pool.fill({"batch": 1, "seq": 1, "past": past}, 1)


def plan_minimum(plan: Any, prompt: int, n: int) -> int:
    """The bytes one generation must cross by the plan: every crossing edge but a held
    cache's, at the prefill's sizes and at each decode step's (a 1-row batch)."""
    from partitioner.dims import concrete_shape

    held = plan.held_values()
    steps = [{"batch": 1, "seq": prompt, "past": 0}]
    steps += [{"batch": 1, "seq": 1, "past": prompt + i} for i in range(n - 1)]
    total = 0
    for edge in plan.cut_edges:
        if edge.name in held:
            continue
        size = torch.empty((), dtype=getattr(torch, edge.dtype)).element_size()
        for binding in steps:
            total += size * math.prod(concrete_shape(edge.shape, binding))
    return total


def remote_row(
    remote: Any, run: Any, repeats: int, n: int, hf_s: float, plan: Any, prompt: int
) -> dict[str, Any]:
    """Time generation through ``remote`` (an executor whose runner is a ``WorkerClient``):
    tokens/s, bytes per token each way and against the plan's minimum, and per GPU-stage call
    the client's round trip and the server's compute (its ``ModelStatistics``)."""
    client = remote.runner
    run(remote)  # warm-up
    inner = client.run
    trips = [0, 0.0]

    def timed_call(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            trips[0] += 1
            trips[1] += time.perf_counter() - start

    client.run = timed_call
    sent, received = client.wire_bytes_sent, client.wire_bytes_received
    before = client.stats()
    seconds = timed(lambda: run(remote), repeats)
    after = client.stats()
    up = (client.wire_bytes_sent - sent) / repeats
    down = (client.wire_bytes_received - received) / repeats
    calls = sum(after[k]["calls"] - before.get(k, {}).get("calls", 0) for k in after)
    busy = sum(after[k]["seconds"] - before.get(k, {}).get("seconds", 0.0) for k in after)
    minimum = plan_minimum(plan, prompt, n)
    client.close()
    return {
        "seconds": seconds,
        "tok_s": n / seconds,
        "vs_transformers": hf_s / seconds,
        "bytes_to_gpu_per_token": up / n,
        "bytes_from_gpu_per_token": down / n,
        "plan_minimum_bytes_per_token": minimum / n,
        "vs_minimum": (up + down) / minimum,
        "ms_per_call": 1e3 * trips[1] / trips[0],
        "server_ms": 1e3 * busy / calls if calls else None,
    }


def triton_row(
    bundle: Path, run: Any, repeats: int, n: int, hf_s: float, plan: Any, prompt: int
) -> dict[str, Any]:
    """The same generation through a real ``tritonserver`` serving the bundle's export."""
    from enclave_runtime.driver import worker_client
    from enclave_runtime.executor import Executor
    from partitioner.bundle import load_program
    from partitioner.triton_repo import export_repository
    from runtime import local_triton

    work = Path(tempfile.mkdtemp(prefix="teesplit-triton-"))
    export_repository(bundle, work / "repo")
    local_triton.python_backend(work / "repo")
    proc, address = local_triton.start(work / "repo", work)
    try:
        enclave = load_program(bundle, gpu=False, allow_unsigned=True)
        # Triton keeps nothing between calls but implicit state: every other input is sent
        client = worker_client(enclave, address, timeout=120.0, extends=False)
        return remote_row(Executor(enclave, client), run, repeats, n, hf_s, plan, prompt)
    finally:
        local_triton.stop(proc)


def report(preset: str, where: str, row: dict[str, Any]) -> None:
    print(
        f"  {preset} through {where}: {row['tok_s']:.1f} tokens/s, "
        f"{row['bytes_to_gpu_per_token'] / 1e3:.1f} kB to the GPU and "
        f"{row['bytes_from_gpu_per_token'] / 1e3:.1f} kB back per token "
        f"({row['vs_minimum']:.3f}x the plan's minimum); {row['ms_per_call']:.2f} ms per call "
        f"round trip, {row['server_ms'] or 0:.2f} ms of it the server's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["cmif", "secureinfer", "slalom"])
    parser.add_argument("--out", default=str(ROOT / "build" / "bench-runtime"))
    parser.add_argument("--triton", action="store_true", help="also through a real Triton")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from enclave_runtime.driver import connect, spawn_worker
    from enclave_runtime.generation import encode_prompt, generate
    from partitioner.api import load, partition
    from partitioner.errors import ArtifactError
    from partitioner.generation import capture_decoder
    from partitioner.zoo import smollm2, smollm2_tokenizer

    model, tokenizer = smollm2(), smollm2_tokenizer()
    ids, public = encode_prompt(tokenizer, PROMPT)
    n = args.new

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )

    hf()  # warm-up
    hf_s = timed(hf, args.repeats)
    rows: list[dict[str, Any]] = [
        {"preset": "transformers generate", "mode": "eager", "seconds": hf_s, "tok_s": n / hf_s}
    ]
    print(f"prompt {ids.shape[1]} tokens, {n} new; transformers: {n / hf_s:.1f} tokens/s")
    step = capture_decoder(model)
    for preset in args.presets:
        split = partition(step, preset)
        # one executor for every in-process run: its mask pool persists between them
        executor = split.executor()

        def run(program: Any = executor) -> torch.Tensor:
            return generate(program, ids, max_new_tokens=n, public_prompt=public)

        run()  # warm-up
        seconds = timed(run, args.repeats)
        rows.append(
            {
                "preset": preset,
                "mode": "in-process",
                "seconds": seconds,
                "tok_s": n / seconds,
                "vs_transformers": hf_s / seconds,
            }
        )
        print(f"  {preset} in-process: {n / seconds:.1f} tokens/s ({hf_s / seconds:.2f}x)")
        if executor.pool is not None:
            times = []
            for _ in range(args.repeats):
                prefill_pool(executor, ids.shape[1], n)
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                {
                    "preset": preset,
                    "mode": "in-process, pool prefilled",
                    "seconds": seconds,
                    "tok_s": n / seconds,
                    "vs_transformers": hf_s / seconds,
                }
            )
            print(f"  {preset} pool prefilled: {n / seconds:.1f} tokens/s")

        bundle = Path(args.out) / preset
        try:  # the benchmark's own bundles, saved unsigned just below
            saved = load(bundle, allow_unsigned=True).spec.describe()
        except ArtifactError:  # missing or unreadable
            saved = None
        if saved != split.spec.describe():  # or made by another version of the compiler
            start = time.perf_counter()
            split.save(bundle)
            print(f"  saved {bundle} in {time.perf_counter() - start:.0f} s")
        for backend in ("torch", "onnx"):  # onnx: the compute Triton's model.py runs too
            address = f"unix:{Path(tempfile.mkdtemp(prefix='teesplit-bench-')) / 'w.sock'}"
            proc, _ = spawn_worker(bundle / "gpu", address, backend)
            try:
                remote = connect(bundle, address, allow_unsigned=True)
                row = remote_row(remote, run, args.repeats, n, hf_s, split.spec, ids.shape[1])
            finally:
                proc.kill()
                proc.wait()
            mode = f"two processes (our worker, {backend}, Unix socket)"
            rows.append({"preset": preset, "mode": mode, **row})
            report(preset, f"our worker ({backend})", row)
        if args.triton:
            row = triton_row(bundle, run, args.repeats, n, hf_s, split.spec, ids.shape[1])
            rows.append({"preset": preset, "mode": "Triton (Python backend, TCP)", **row})
            report(preset, "Triton", row)

    print(
        "\n| preset | mode | tokens/s | × transformers | kB/token to GPU | kB/token back "
        "| ÷ plan minimum | ms/call round trip | ms/call server |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        to = r.get("bytes_to_gpu_per_token")
        back = r.get("bytes_from_gpu_per_token")
        ratio, trip, server = (r.get(k) for k in ("vs_minimum", "ms_per_call", "server_ms"))
        print(
            f"| {r['preset']} | {r['mode']} | {r['tok_s']:.1f} | "
            f"{r.get('vs_transformers', 1.0):.2f} | "
            f"{'' if to is None else f'{to / 1e3:,.1f}'} | "
            f"{'' if back is None else f'{back / 1e3:,.1f}'} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | "
            f"{'' if trip is None else f'{trip:.2f}'} | "
            f"{'' if server is None else f'{server:.2f}'} |"
        )
    name = "-".join(args.presets) + ("-triton" if args.triton else "")
    out = ROOT / "benchmarks" / "results" / f"runtime-{name}.json"
    out.parent.mkdir(exist_ok=True)
    document = {"prompt": PROMPT, "new_tokens": n, "repeats": args.repeats, "rows": rows}
    out.write_text(json.dumps(document, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
