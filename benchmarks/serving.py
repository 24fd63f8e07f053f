"""Concurrent sessions through ``teesplit serve`` (issue 14): time to first token and tokens/s.

For each preset, SmolLM2-135M is partitioned once (saved unsigned under
``build/bench-serving/PRESET``), then served as it is deployed: a GPU worker process and the
OpenAI-compatible server process (``partitioner.deploy.local_deployment``), both on this
machine. For 1, 4 and 8 concurrent sessions, each session is the real ``openai`` client
streaming a ``/v1/completions`` request of ``--new`` tokens (temperature 0; different prompts, so
prompts and caches differ in length) started at the same moment. Reported per load:

* aggregate tokens/s: every session's completion tokens over the wall time from the start to
  the last session's end;
* per session: tokens/s of each session's decoding (after its first token), the mean;
* time to first token: mean and worst;
* the worker's calls per generated token (its ``ModelStatistics``, every stage): the server
  decodes every session in one call per step, so this falls towards 1/sessions (prefills
  are a call each).

Everything runs on this machine's CPU (the worker's stages too: no GPU is lent here), so the
worker, the server and the clients share its cores. The target (issue 14): under ``cmif`` and
``all_gpu``, 8 sessions reach at least 4x the aggregate tokens/s of one.

    python benchmarks/serving.py [--presets cmif all_gpu] [--sessions 1 4 8] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The history of the city begins",
    "Once upon a time, in a small village by the sea, there lived",
    "The recipe calls for flour, sugar and",
    "In physics, the law of conservation of energy states that",
    "My favourite film is",
    "The committee met on Tuesday to discuss the new budget, and after a long debate",
    "Photosynthesis is the process by which",
    "The train left the station at",
]


def bundle_for(preset: str, out: Path) -> Path:
    """SmolLM2 under ``preset``, saved with its tokenizer (once; reused when current)."""
    from partitioner.api import load, partition
    from partitioner.errors import ArtifactError
    from partitioner.generation import capture_decoder
    from partitioner.zoo import smollm2, smollm2_tokenizer

    path = out / preset
    split = partition(capture_decoder(smollm2()), preset)
    try:
        current = load(path, allow_unsigned=True).spec.describe() == split.spec.describe()
    except ArtifactError:
        current = False
    if not current:
        start = time.perf_counter()
        split.save(path, tokenizer=smollm2_tokenizer())
        print(f"  saved {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def one_session(
    url: str, model: str, prompt: str, new: int, start: float, out: dict[str, Any]
) -> None:
    import openai

    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    first = None
    tokens = 0
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=new,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first if first is not None else end
    out.update(
        ttft=first - start,
        end=end - start,
        tokens=tokens,
        decode_tok_s=(tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0,
    )


def load_run(url: str, sessions: int, new: int) -> dict[str, Any]:
    import openai

    # asked once, before the clock starts: not a request of each timed session
    model = openai.OpenAI(base_url=url, api_key="local").models.list().data[0].id
    results: list[dict[str, Any]] = [{} for _ in range(sessions)]
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=one_session,
            args=(url, model, PROMPTS[i % len(PROMPTS)], new, start, results[i]),
        )
        for i in range(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(not r for r in results):
        raise RuntimeError("a session failed (see the deployment log)")
    wall = max(r["end"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {
        "sessions": sessions,
        "tokens": total,
        "wall_s": wall,
        "aggregate_tok_s": total / wall,
        "per_session_tok_s": statistics.mean(r["decode_tok_s"] for r in results),
        "ttft_mean_s": statistics.mean(r["ttft"] for r in results),
        "ttft_max_s": max(r["ttft"] for r in results),
    }


def worker_calls(worker: str) -> int:
    """Calls of every stage so far, from the worker's KServe ModelStatistics."""
    import grpc

    from runtime.kserve import service, target

    pb, grpc_service = service()
    with grpc.insecure_channel(target(worker)) as channel:
        stub = grpc_service.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats
    return sum(s.inference_count for s in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cmif", "all_gpu"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch-delay-ms", type=float, default=20.0)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench-serving"))
    parser.add_argument("--results", default=None, help="JSON file to write the figures to")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from partitioner.deploy import local_deployment

    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        path = bundle_for(preset, Path(args.out))
        log = Path(args.out) / f"{preset}-serve.log"
        with local_deployment(
            path,
            max_sessions=max(args.sessions),
            batch_delay_ms=args.batch_delay_ms,
            backend=args.backend,
            log=log,
        ) as deployment:
            url = deployment.url
            load_run(url, 1, 4)  # warm-up: first calls load and compile lazily
            base = None
            for n in args.sessions:
                calls = worker_calls(deployment.worker)
                row = {"preset": preset, **load_run(url, n, args.new)}
                calls = worker_calls(deployment.worker) - calls
                row["worker_calls_per_token"] = calls / max(row["tokens"], 1)
                base = base or row["aggregate_tok_s"]
                row["vs_one_session"] = row["aggregate_tok_s"] / base
                rows.append(row)
                print(
                    f"{preset:8s} {n} session(s): {row['aggregate_tok_s']:5.1f} tok/s aggregate "
                    f"({row['vs_one_session']:.2f}x one), {row['per_session_tok_s']:5.1f} tok/s "
                    f"per session, first token {row['ttft_mean_s']:.2f} s mean / "
                    f"{row['ttft_max_s']:.2f} s worst; {row['worker_calls_per_token']:.2f} worker "
                    "calls per token",
                    flush=True,
                )
    if args.results:
        Path(args.results).write_text(json.dumps({"new_tokens": args.new, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
