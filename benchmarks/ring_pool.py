"""The mask pool's correction op on the CPU: int8 digits (``enclave_runtime/ring_gemm.py``)
against the float64 GEMM it replaced, at the shapes the pool runs.

Per layer shape (SmolLM2-135M's and Llama-2-7B's) and fill size (64 rows: a decode fill of 64
sets; 512 rows: a prefill fill of 4 sets of 128 tokens), ``W·[r_1 … r_B] mod 2**32`` on uniform
pads through both ops, compared bit for bit, and the medians of ``--repeats`` timed calls.
Weights are as large as the exact pass makes them (12 bits, less where one float64 GEMM must
stay exact at a large fan-in).

    python benchmarks/ring_pool.py [--threads 1] [--repeats 7] [--rows 64 512] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import median_time  # noqa: E402
from enclave_runtime import ring_gemm  # noqa: E402
from partitioner.ops import OPS  # noqa: E402

# (name, fan-in, fan-out)
SHAPES = [
    ("smollm2 q/o", 576, 576),
    ("smollm2 k/v", 576, 192),
    ("smollm2 gate/up", 576, 1536),
    ("smollm2 down", 1536, 576),
    ("smollm2 lm_head", 576, 49152),
    ("llama7b q/k/v/o", 4096, 4096),
    ("llama7b gate/up", 4096, 11008),
    ("llama7b down", 11008, 4096),
    ("llama7b lm_head", 4096, 32000),
]


def weights(fan_in: int, fan_out: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random integer weights as large as the exact pass makes them at this fan-in (12 bits,
    less where one float64 GEMM must stay exact: ``2**31 · max|w| · fan_in <= 2**53``)."""
    top = min(2047, 2**22 // fan_in)
    return torch.randint(-top, top + 1, (fan_out, fan_in), generator=gen, dtype=torch.int16)


def compare(
    u: torch.Tensor, w64: torch.Tensor, layer: ring_gemm.PackedLinear | None, repeats: int
) -> tuple[float, float | None, bool]:
    """Milliseconds (medians) of ``W·u`` through the float64 GEMM over ``w64`` and through
    ``layer`` (the pool's int8 op; ``None``: not timed), and whether the two are equal."""
    f64 = median_time(lambda: OPS.ring_linear.default(u, w64, None), repeats) * 1e3
    if layer is None:
        return f64, None, True
    equal = bool(torch.equal(layer(u), OPS.ring_linear.default(u, w64, None)))
    return f64, median_time(lambda: layer(u), repeats) * 1e3, equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not ring_gemm.available():
        sys.exit("ring_pool: the int8 path is not available here (make builds it)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print("| layer | rows | digits | float64 ms | int8 ms | float64 ÷ int8 | equal |")
    print("|---|---|---|---|---|---|---|")
    rows, bad = [], []
    for name, fan_in, fan_out in SHAPES:
        w = weights(fan_in, fan_out, gen)
        w64 = w.to(torch.float64)
        layer = ring_gemm.PackedLinear(w, None, False)
        for count in args.rows:
            u = torch.randint(-(2**31), 2**31, (count, fan_in), generator=gen, dtype=torch.int64)
            f64, int8, equal = compare(u.to(torch.int32), w64, layer, args.repeats)
            assert int8 is not None
            rows.append({
                "layer": name, "fan_in": fan_in, "fan_out": fan_out, "rows": count,
                "digits": layer.digits, "float64_ms": f64, "int8_ms": int8, "equal": equal,
            })  # fmt: skip
            if not equal:
                bad.append(f"{name} × {count}")
            print(
                f"| {name} ({fan_in}→{fan_out}) | {count} | {layer.digits} | {f64:.2f} | "
                f"{int8:.2f} | {f64 / int8:.2f} | {equal} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if bad:
        sys.exit(f"NOT EQUAL: {bad}")


if __name__ == "__main__":
    main()
