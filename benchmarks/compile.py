"""Compile benchmark: partition a Llama-2-7B-shaped model built on the meta device.

For each preset, in a fresh process (so peak RSS is that preset's own): the torch.export
capture time, the partition time excluding capture (decomposition, labelling, placement,
split, validation, FLOP accounting), peak RSS, and the ratio partition/capture.
Targets (issue #2): ratio <= 0.5, peak RSS <= 1.5 GB.

    python benchmarks/compile.py [--layers 32] [--presets cmif,secureinfer,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["cmif", "secureinfer", "slalom", "all_enclave", "all_gpu"]


def one(preset: str, layers: int) -> dict[str, float | int | str]:
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    from partitioner.api import partition
    from partitioner.capturing import capture
    from partitioner.zoo import llama2_7b_meta

    model = llama2_7b_meta(layers)
    start = time.perf_counter()
    captured = capture(model)
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    sp = partition(captured, preset)
    partition_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset,
        "layers": layers,
        "nodes": len(sp.placement.sides),
        "stages": len(sp.stages),
        "capture_s": round(capture_s, 2),
        "partition_s": round(partition_s, 2),
        "ratio": round(partition_s / capture_s, 3),
        "peak_rss_mb": round(peak_mb),
        "enclave_flops_share": round(sp.share()["flops"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.layers)))
        return
    rows = []
    for preset in args.presets.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", preset, "--layers", str(args.layers)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    header = (
        "preset",
        "nodes",
        "stages",
        "capture_s",
        "partition_s",
        "ratio",
        "peak_rss_mb",
        "enclave_flops_share",
    )
    print(
        f"Llama-2-7B shape (meta device, {args.layers} layers, hidden 4096, FFN 11008, "
        "vocab 32000)\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
