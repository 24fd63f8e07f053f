"""The Llama-2-7B projection of ``benchmarks/teebound.py``: a decode step at batch 1 and context
128, from this CPU's measured memory bandwidth, its float64 GEMM rate, and the measured time of
the mask pool's own correction op at Llama-2-7B's layer shapes (:func:`offline_ops`).

Reads nothing but what it measures; writes nothing (teebound.py stores its result). The
formulas are printed with the numbers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.ring_pool import compare, weights
from enclave_runtime import ring_gemm


def cpu_rates(quick: bool) -> dict[str, Any]:
    """This CPU's memory bandwidth (a large copy: read + write bytes over time) and float64
    GEMM rate (2·n³ FLOPs over time), medians of a few runs, all torch threads."""
    n_copy = (32 if quick else 128) * 2**20  # float32 elements: 128 MiB or 512 MiB
    src = torch.rand(n_copy)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    bw = 2 * src.nbytes / statistics.median(times)
    del src, dst
    n = 1024 if quick else 2048
    a = torch.rand(n, n, dtype=torch.float64)
    b = torch.rand(n, n, dtype=torch.float64)
    torch.mm(a, b)
    times = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    f64 = 2 * n**3 / statistics.median(times)
    return {
        "threads": torch.get_num_threads(),
        "copy_mib": n_copy * 4 / 2**20,
        "memory_bandwidth_gbs": bw / 1e9,
        "gemm_n": n,
        "float64_gemm_gflops": f64 / 1e9,
    }


# Llama-2-7B's linear layers per decoder layer (fan-out, fan-in, count; 32 KV heads, no GQA), and
# the output layer once; weights as large as the exact pass makes them where one float64 GEMM
# must stay exact (2**31 · max|w| · fan_in <= 2**53), 12 bits at most
LLAMA_LAYERS = {
    "q_k_v_o": (4096, 4096, 4),
    "gate_up": (11008, 4096, 2),
    "down": (4096, 11008, 1),
}
LLAMA_HEAD = (32000, 4096)


def offline_ops(batch: int, quick: bool) -> dict[str, Any]:
    """The mask pool's correction ``W·[r_1 … r_B]`` timed at each Llama-2-7B layer shape for
    ``B = batch`` sets of decode pads (one row each): through the op the pool runs
    (:mod:`enclave_runtime.ring_gemm`'s int8 digits where available) and through the float64
    GEMM (``ring_linear`` over weights made float64 once); random weights and pads, results
    compared bit for bit. Per set: ``(32 · Σ count · t_layer + t_head) / B``, medians."""
    repeats = 1 if quick else 3
    shapes = {**{k: (o, i) for k, (o, i, _) in LLAMA_LAYERS.items()}, "lm_head": LLAMA_HEAD}
    per_layer: dict[str, dict[str, float]] = {}
    for name, (fan_out, fan_in) in shapes.items():
        w = weights(fan_in, fan_out)
        u = torch.randint(-(2**31), 2**31, (batch, fan_in), dtype=torch.int64).to(torch.int32)
        layer = ring_gemm.PackedLinear(w, None, False) if ring_gemm.available() else None
        f64, int8, equal = compare(u, w.to(torch.float64), layer, repeats)
        if not equal:
            raise AssertionError(f"{name}: the int8 correction differs from the float64 one")
        per_layer[name] = {"float64": f64} if int8 is None else {"float64": f64, "int8": int8}
    per_set = {}
    for path in per_layer["lm_head"]:
        body = sum(per_layer[k][path] * n for k, (_, _, n) in LLAMA_LAYERS.items())
        per_set[path] = (32 * body + per_layer["lm_head"][path]) / batch
    pool = "int8" if "int8" in per_set else "float64"
    return {"batch": batch, "layer_ms": per_layer, "per_set_ms": per_set, "pool_path": pool}


def project(
    rates: dict[str, Any],
    measured: dict[str, Any] | None,
    batch: int,
    ops: dict[str, Any],
    ctx: int,
) -> dict[str, Any]:
    """Llama-2-7B decode step (batch 1, context ``ctx``): memory-bound enclave time from bytes
    touched, and the offline mask-set cost as float64 GEMMs (the pool draws ``batch`` sets at a
    time). ``measured``: the SmolLM2 slalom-like decode row, whose enclave time per layer bounds
    this implementation's fixed per-layer cost (Python dispatch of ~100 small ops, the executor
    loop). ``ops``: :func:`offline_ops`, the pool's own correction op timed at these shapes,
    which gives the offline term; the float64-rate estimate is kept beside it. See the
    printout."""
    h, layers, ffn, vocab = 4096, 32, 11008, 32000
    kv = h  # Llama-2-7B: 32 KV heads (no GQA)
    per_layer = 4 * h * h + 3 * h * ffn  # q, k, v, o; gate, up, down
    linear_params = layers * per_layer + vocab * h  # every GPU-side weight, lm_head included
    params = linear_params + vocab * h + layers * 2 * h + h  # + embedding, norms
    bw = rates["memory_bandwidth_gbs"] * 1e9
    f64 = rates["float64_gemm_gflops"] * 1e9

    # all_enclave: every weight once per token, plus the KV cache read (fp16 everywhere)
    fp16 = 2
    kv_cache_fp16 = layers * 2 * ctx * kv * fp16
    ae_bytes = params * fp16 + kv_cache_fp16
    t_ae = ae_bytes / bw

    # slalom-like split, exact masks: the enclave touches activations, pads and corrections.
    # Per layer, masked values it sends: attn input (h), attn output (h), FFN input (h),
    # SiLU(gate)·up (ffn); GPU results it unmasks: q, k, v, o, down (h each), gate, up (ffn).
    ring = 4  # int32 ring elements (and fp32 activations in the enclave)
    sent = 3 * h + ffn
    back = 3 * h + 2 * kv + 2 * ffn
    # per element: mask 3 (x, r, x+r) or unmask 3 (y', W·r, y), Freivalds 2, elementwise 4
    touches = 9
    kv_cache_enclave = layers * 2 * ctx * kv * ring  # attention stays in the enclave
    head = touches * (h + vocab) + h  # lm_head input/logits, embedding row
    split_bytes = (layers * touches * (sent + back) + head) * ring + kv_cache_enclave
    round_trips = layers * 4 + 1  # qkv, o, gate/up, down per layer; lm_head
    t_bytes = split_bytes / bw
    per_layer_s = None
    if measured is not None:
        per_layer_s = measured["enclave_online_ms"] / 1e3 / measured["layers"]
    t_impl = layers * per_layer_s if per_layer_s is not None else 0.0
    t_online = t_bytes + t_impl
    # offline per token (one mask set): the corrections W·r of every GPU linear, 2 FLOPs per
    # weight. The pool draws ``batch`` sets at a time (MaskPool.fill / draw_many), the
    # corrections of a batch as one float64 GEMM per layer, W·[r_1 … r_B], with the weights
    # converted to float64 once per executor (exact: every partial sum is an integer below
    # 2**31 · max|w| · fan-in <= 2**53). At B = 16 the GEMM is compute-bound: per set,
    # 2·params FLOP at the measured float64 GEMM rate. The float64 weights it reads, once per
    # batch, cost 8 B × params / (B · BW) per set (printed to show the bound holds).
    # Freivalds' a = Wᵀs is drawn once per executor (RingCheck), not per request.
    offline_flops = 2 * linear_params
    t_off = offline_flops / f64
    t_off_weights = linear_params * 8 / (batch * bw)
    t_measured = ops["per_set_ms"][ops["pool_path"]] / 1e3
    return {
        "shape": {"hidden": h, "layers": layers, "ffn": ffn, "vocab": vocab, "context": ctx},
        "params": params,
        "gpu_linear_params": linear_params,
        "all_enclave": {
            "weights": "fp16",
            "bytes": ae_bytes,
            "weight_gb_fp16": params * 2 / 1e9,
            "weight_gb_fp32": params * 4 / 1e9,
            "ms": t_ae * 1e3,
            "ms_fp32_weights": (params * 4 + 2 * kv_cache_fp16) / bw * 1e3,
            "ms_int8_weights": (params + kv_cache_fp16) / bw * 1e3,
        },
        "split": {
            "masking": "exact (int32 ring, int8 weights per output channel on the GPU)",
            "bytes": split_bytes,
            "kv_cache_bytes": kv_cache_enclave,
            "touches_per_element": touches,
            "round_trips": round_trips,
            "bytes_ms": t_bytes * 1e3,
            "measured_from": None if measured is None else measured["preset"],
            "overhead_per_layer_ms": None if per_layer_s is None else per_layer_s * 1e3,
            "overhead_ms": t_impl * 1e3,
            "online_ms": t_online * 1e3,
            "offline_batch": batch,
            "offline_gflop": offline_flops / 1e9,
            "offline_ms": t_measured * 1e3,
            "offline_ms_f64_rate": t_off * 1e3,
            "offline_weight_read_ms": t_off_weights * 1e3,
            "offline_float64_weights_gb": linear_params * 8 / 1e9,
        },
        "offline_ops": ops,
        "speedup_online": t_ae / t_online,
        "speedup_online_bytes_only": t_ae / t_bytes,
        # the headline: the offline term as the pool's own op measured at these shapes
        "speedup_with_offline": t_ae / (t_online + t_measured),
        "speedup_with_offline_bytes_only": t_ae / (t_bytes + t_measured),
        "speedup_with_offline_float64_op": t_ae / (t_online + ops["per_set_ms"]["float64"] / 1e3),
        "speedup_with_offline_f64_rate": t_ae / (t_online + t_off),
    }


def print_projection(rates: dict[str, Any], p: dict[str, Any]) -> None:
    s, a, sh, ops = p["split"], p["all_enclave"], p["shape"], p["offline_ops"]
    ops_line = ", ".join(f"{path} {ms:.0f} ms" for path, ms in ops["per_set_ms"].items())
    overhead = (
        f"{s['overhead_per_layer_ms']:.2f} ms per layer (the {s['measured_from']} decode row "
        "above: its enclave online time / its layers, an upper bound of this Python "
        f"implementation's fixed cost per layer) × 32 = {s['overhead_ms']:.1f} ms"
        if s["overhead_per_layer_ms"] is not None
        else "no slalom-like decode row measured: 0"
    )
    print(
        f"\n## Projection: Llama-2-7B-shaped decode step at context {sh['context']} (batch 1)\n\n"
        f"Measured here ({rates['threads']} torch thread(s), outside any enclave): memory "
        f"bandwidth BW = {rates['memory_bandwidth_gbs']:.1f} GB/s (torch copy of "
        f"{rates['copy_mib']:.0f} MiB float32, read + write bytes), float64 GEMM rate F64 = "
        f"{rates['float64_gemm_gflops']:.1f} GFLOP/s ({rates['gemm_n']}³ torch.mm).\n\n"
        "Decode at batch 1 is memory-bound: T_enclave ≈ bytes the enclave touches / BW "
        "(h = 4096, ffn = 11008, vocab = 32000, 32 layers).\n\n"
        f"* all_enclave, fp16 weights: {p['params'] / 1e9:.2f}e9 params × 2 B = "
        f"{a['weight_gb_fp16']:.1f} GB + KV cache (32 × 2 × {sh['context']} × 4096 × 2 B) = "
        f"{a['bytes'] / 1e9:.2f} GB / BW = **{a['ms']:.0f} ms** per token "
        f"(fp32 weights, {a['weight_gb_fp32']:.0f} GB: {a['ms_fp32_weights']:.0f} ms; "
        f"int8 weights: {a['ms_int8_weights']:.0f} ms)\n"
        f"* slalom-like split, exact masks (int32 ring): bytes = 4 B × [32 × "
        f"{s['touches_per_element']} touches × (sent 3h + ffn + returned 5h + 2·ffn) + "
        f"{s['touches_per_element']}·(h + vocab) + h] + the KV cache the enclave's attention "
        f"reads (32 × 2 × {sh['context']} × 4096 × 4 B = {s['kv_cache_bytes'] / 1e6:.0f} MB) = "
        f"{s['bytes'] / 1e6:.0f} MB / BW = **{s['bytes_ms']:.1f} ms**; plus {overhead}; "
        f"online **{s['online_ms']:.1f} ms** per token; {s['round_trips']} GPU round trips\n"
        "* offline per token (one mask set): the corrections W·r of every GPU linear, 2 × "
        f"{p['gpu_linear_params'] / 1e9:.2f}e9 params = {s['offline_gflop']:.1f} GOP per set. "
        f"The pool draws B = {s['offline_batch']} sets at a time, one GEMM per layer "
        "W·[r_1 … r_B]; that op, timed here at each layer shape (q/k/v/o 4096→4096 ×4, "
        "gate/up 4096→11008 ×2, down 11008→4096, per layer × 32, and lm_head 4096→32000 "
        f"once), per set: {ops_line} — the pool's ({ops['pool_path']}) **{s['offline_ms']:.0f} "
        f"ms**. (At the F64 rate alone, 2 × params / F64 = {s['offline_ms_f64_rate']:.0f} ms; "
        f"the float64 weights, {s['offline_float64_weights_gb']:.0f} GB, read once per batch: "
        f"{s['offline_weight_read_ms']:.0f} ms per set. Freivalds' a = Wᵀs is drawn once per "
        "executor, not per token.)"
        "\n\n"
        f"Speedup over all_enclave (fp16): online **{p['speedup_online']:.1f}×** "
        f"(bytes alone {p['speedup_online_bytes_only']:.0f}×); with the offline draw "
        f"**{p['speedup_with_offline']:.2f}×** ({p['speedup_with_offline_bytes_only']:.2f}× "
        "bytes alone; with the float64 op "
        f"{p['speedup_with_offline_float64_op']:.2f}×, at the F64 rate "
        f"{p['speedup_with_offline_f64_rate']:.2f}×). Against an all_enclave holding int8 "
        "weights, as the GPU does, halve them. Touches per element: mask 3 (read x, r; write "
        "x + r) or unmask 3 (read y', W·r; write y), Freivalds 2, elementwise ops (norms, "
        "SiLU, residual, RoPE) ~4. SGX's memory "
        "encryption lowers BW on both sides of the ratio; the offline term scales with the "
        "CPU's int8 (or float64) GEMM rate."
    )
