"""Split generation speed against transformers' ``generate`` on SmolLM2-135M (issue #4).

For each preset, greedy generation of ``--new`` tokens (EOS ignored, so every run makes the
same amount of work; tests check token equality) from a chat prompt, timed end to end
(prefill included):

* ``transformers``: ``model.generate`` with its KV cache, the reference;
* ``in-process``: the split program's stages all in this process (:func:`generate`);
* ``two processes``: the saved bundle, GPU stages in a worker process (KServe v2 gRPC over a
  Unix socket: one stream per generation),
  the enclave side here (``enclave_runtime.driver.connect``), with the bytes that crossed.

In-process, the mask pool is *not* filled ahead: each decode step has a new cache length, so
its masks, pads and precomputable corrections are drawn during the request, as a server
without idle time would. "pool prefilled" repeats the run after drawing every step's set
ahead, the best case of a server that prepares masks between requests.

Everything runs on this machine's CPU (no GPU is lent here), so "GPU" time is CPU time too.
Bundles are saved once under ``build/bench-runtime/`` and reused. Medians of ``--repeats``.

    python benchmarks/runtime.py [--new 32] [--repeats 3] [--presets cmif secureinfer slalom]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["cmif", "secureinfer", "slalom"])
    parser.add_argument("--out", default=str(ROOT / "build" / "bench-runtime"))
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
            load(bundle, allow_unsigned=True)
        except ArtifactError:  # missing or stale: save it again
            start = time.perf_counter()
            split.save(bundle)
            print(f"  saved {bundle} in {time.perf_counter() - start:.0f} s")
        address = f"unix:{Path(tempfile.mkdtemp(prefix='teesplit-bench-')) / 'w.sock'}"
        proc, _ = spawn_worker(bundle / "gpu", address)
        try:
            remote = connect(bundle, address, allow_unsigned=True)
            generate(remote, ids, max_new_tokens=2, public_prompt=public)  # warm-up
            client = remote.runner  # the WorkerClient serving the GPU stages
            sent, received = client.bytes_sent, client.bytes_received
            seconds = timed(lambda r=remote: run(r), args.repeats)
            up = (client.bytes_sent - sent) / args.repeats
            down = (client.bytes_received - received) / args.repeats
        finally:
            proc.kill()
            proc.wait()
        rows.append(
            {
                "preset": preset,
                "mode": "two processes (KServe v2 gRPC, Unix socket)",
                "seconds": seconds,
                "tok_s": n / seconds,
                "vs_transformers": hf_s / seconds,
                "bytes_to_gpu_per_token": up / n,
                "bytes_from_gpu_per_token": down / n,
            }
        )
        print(
            f"  {preset} two processes: {n / seconds:.1f} tokens/s, "
            f"{up / n / 1e3:.1f} kB to the GPU and {down / n / 1e3:.1f} kB back per token"
        )

    print("\n| preset | mode | tokens/s | × transformers | kB/token to GPU | kB/token back |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        to = r.get("bytes_to_gpu_per_token")
        back = r.get("bytes_from_gpu_per_token")
        print(
            f"| {r['preset']} | {r['mode']} | {r['tok_s']:.1f} | "
            f"{r.get('vs_transformers', 1.0):.2f} | "
            f"{'' if to is None else f'{to / 1e3:,.1f}'} | "
            f"{'' if back is None else f'{back / 1e3:,.1f}'} |"
        )
    out = ROOT / "benchmarks" / "results" / f"runtime-{'-'.join(args.presets)}.json"
    out.parent.mkdir(exist_ok=True)
    document = {"prompt": PROMPT, "new_tokens": n, "repeats": args.repeats, "rows": rows}
    out.write_text(json.dumps(document, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
