"""Exact masked linear layers on CUDA (or the CPU): bit for bit, and their speed.

Runs on a machine with an NVIDIA GPU (it needs only torch; ``partitioner/ops.py`` is imported
by path so the rest of the project and its dependencies need not be installed there):

1. exactness: ``teesplit::ring_linear`` on CUDA (int8 GEMMs with int32 accumulation,
   ``torch._int_mm``, four digits of the masked input times one or two digits of the weights)
   equals the CPU's float64 result on uniform residues, for int8 and int16 weights, at every
   shape below, and so does the float64-on-CUDA path;
2. speed: per shape, the float32 GEMM of the same layer (``F.linear``, TF32 off), the exact
   layer through int8 GEMMs, and through one float64 GEMM, as medians of CUDA-event timings.

    python benchmarks/cuda_ring.py [--repeats 50] [--json OUT] [--device cpu --threads 2]

On the CPU (``--device cpu``) the exact layer is one float64 GEMM over prepared weights (what
``prepare_ring_weights`` gives a CPU worker and the mask pool). The int8 column there is the
best int8 form found for the CPU, measured against it: the weights' digits made once, the
input's four digits stacked into one ``_int_mm`` per weight digit (:func:`int8_prepared`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("teesplit_ops", ROOT / "partitioner" / "ops.py")
ops = importlib.util.module_from_spec(_spec)
sys.modules["teesplit_ops"] = ops
_spec.loader.exec_module(ops)

# (name, rows, fan-in, fan-out): SmolLM2-135M and Llama-2-7B layers, prefill (128 rows) and
# decode (1 row; _int_mm takes more than 16 rows, so decode uses float64 GEMMs)
SHAPES = [
    ("smollm2 q_proj prefill", 128, 576, 576),
    ("smollm2 up_proj prefill", 128, 576, 1536),
    ("smollm2 down_proj prefill", 128, 1536, 576),
    ("smollm2 lm_head prefill", 128, 576, 49152),
    ("llama7b q_proj prefill", 128, 4096, 4096),
    ("llama7b up_proj prefill", 128, 4096, 11008),
    ("llama7b down_proj prefill", 128, 11008, 4096),
    ("llama7b up_proj decode", 1, 4096, 11008),
    ("llama7b up_proj batch32", 32, 4096, 11008),
    # a decode fill of the mask pool: the corrections of 64 sets as one GEMM per layer
    ("smollm2 up_proj fill64", 64, 576, 1536),
    ("smollm2 down_proj fill64", 64, 1536, 576),
]

_OFFSET = 128 * (1 + 2**8 + 2**16 + 2**24)  # what the input's bytes lose to signed digits


def prepare_digits(w: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``w``'s balanced base-256 digits (one for int8, two for int16), transposed for
    ``_int_mm``, and ``_OFFSET * sum(w_row)`` mod ``2**32`` as int32."""
    digits = [w] if w.dtype == torch.int8 else ops._balanced_bytes(w, 2)
    offset = (_OFFSET * w.to(torch.int64).sum(1)) % 2**32
    offset = torch.where(offset >= 2**31, offset - 2**32, offset).to(torch.int32)
    return [d.t().contiguous() for d in digits], offset


def int8_prepared(
    u: torch.Tensor, digits: list[torch.Tensor], offset: torch.Tensor
) -> torch.Tensor:
    """``u @ w.T mod 2**32`` from :func:`prepare_digits`: each byte of ``u`` less 128 is an
    int8 digit; the four digits stacked as rows, one ``_int_mm`` per weight digit (exact:
    ``128 * 128 * fan_in < 2**31``), recombined in int32 (wrapping) and the offset added."""
    m, k = u.shape
    stacked = (u.view(torch.uint8).view(m, k, 4) ^ 0x80).view(torch.int8)
    stacked = stacked.permute(2, 0, 1).reshape(4 * m, k)
    p = [torch._int_mm(stacked, d).view(4, m, -1) for d in digits]
    if len(p) == 1:
        out = p[0][0] + (p[0][1] << 8) + (p[0][2] << 16) + (p[0][3] << 24)
    else:
        out = p[0][0] + ((p[0][1] + p[1][0]) << 8) + ((p[0][2] + p[1][1]) << 16)
        out = out + ((p[0][3] + p[1][2]) << 24)
    return out + offset


def weight_max(fan_in: int) -> int:
    return max(1, min(2047, (2**53) // (2**31 * fan_in)))


def timed(fn: Callable[[], object], repeats: int) -> float:
    if not torch.cuda.is_available():  # the CPU: wall-clock medians
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    where = (
        torch.cuda.get_device_name()
        if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{where} torch {torch.__version__}")
    print(
        "| layer | weights | exact int8-GEMM = CPU | exact f64 = CPU | f32 ms | int8 ms | f64 ms "
        "| int8 ÷ f32 | f64 ÷ f32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, k, n in SHAPES:
        top = weight_max(k)
        dtype = torch.int8 if top <= 127 else torch.int16
        u = torch.randint(-(2**31), 2**31, (m, k), generator=gen, dtype=torch.int64)
        u = u.to(torch.int32)
        w = torch.randint(-top, top + 1, (n, k), generator=gen, dtype=torch.int64).to(dtype)
        cpu = torch.ops.teesplit.ring_linear(u, w, None)
        u_d, w_d = u.to(dev), w.to(dev)
        if dev.type == "cuda":
            int8 = lambda u_d=u_d, w_d=w_d: ops._int8_linear_cuda(u_d, w_d)  # noqa: E731
        else:
            digits, offset = prepare_digits(w)
            int8 = lambda u=u, d=digits, o=offset: int8_prepared(u, d, o)  # noqa: E731
        via_int8 = int8()  # None where _int_mm takes no such shape (CUDA, few rows)
        same_int8 = None if via_int8 is None else bool(torch.equal(via_int8.cpu(), cpu))
        w64 = w_d.to(torch.float64)
        f64 = torch.ops.teesplit.ring_linear(u_d, w64, None)
        same_f64 = bool(torch.equal(f64.cpu(), cpu))
        x = torch.randn(m, k, device=dev)
        wf = torch.randn(n, k, device=dev)
        t_f32 = timed(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf), args.repeats)
        t_int8 = timed(int8, args.repeats) if via_int8 is not None else None
        t_f64 = timed(lambda u_d=u_d, w64=w64: torch.ops.teesplit.ring_linear(u_d, w64, None),
                      args.repeats)  # fmt: skip
        row = {
            "layer": name, "rows": m, "fan_in": k, "fan_out": n, "weights": str(dtype),
            "int8_exact": same_int8, "f64_exact": same_f64, "f32_ms": t_f32,
            "int8_ms": t_int8, "f64_ms": t_f64,
        }  # fmt: skip
        rows.append(row)
        ratio8 = f"{t_int8 / t_f32:.2f}" if t_int8 is not None else "–"
        int8 = f"{t_int8:.4f}" if t_int8 is not None else "–"
        print(
            f"| {name} ({m}×{k}→{n}) | {dtype} (±{top}) | {same_int8} | {same_f64} | "
            f"{t_f32:.4f} | {int8} | {t_f64:.4f} | {ratio8} | {t_f64 / t_f32:.2f} |"
        )
    bad = [r["layer"] for r in rows if r["int8_exact"] is False or not r["f64_exact"]]
    print("all exact" if not bad else f"NOT EXACT: {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
