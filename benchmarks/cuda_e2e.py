"""A split run end to end with its GPU stages on CUDA, against the same split on the CPU.

For a machine with an NVIDIA GPU (run there by hand: ``python3 benchmarks/cuda_e2e.py``).
The model is SmolLM2-135M's architecture with seeded random weights (the GPU host need not
hold the weights package; timing and exactness do not depend on the values); under
``private_finetune`` it carries a seeded peft LoRA, the private fine-tune of a public base
(peft's). Each preset is partitioned here, then one executor per side of the comparison runs
the same requests with the same mask pads (the same seed):

* ``cpu``: GPU stages in this process on the CPU (``InProcessRunner``);
* ``cuda``: GPU stages on the GPU, weights prepared by ``prepare_ring_weights(module, cuda)``
  as the worker prepares them, tensors moved there and back per call (as the worker does).

Checked: exact masking gives the same logits bit for bit on both (the ring products are exact
on either device); float stages agree to float32 rounding (TF32 off, as the worker sets).
Timed (medians): the call, the time inside GPU stages (synchronised), and the enclave's time
(the rest), for a 128-token prefill and a decode step at context 128. Prints a table and
writes ``benchmarks/results/cuda_e2e.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTEXT = 128


def smollm2_shape(layers: int) -> torch.nn.Module:
    """SmolLM2-135M's architecture (transformers' Llama) with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a seeded peft LoRA injected in place (rank 8 on q_proj and v_proj): the
    private fine-tune ``private_finetune`` protects, its base (peft's) public."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(2)  # peft draws lora_A from the global generator
    model = get_peft_model(model, config).get_base_model().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                torch.nn.init.normal_(param, std=0.02)
    return model


def prepared(model: torch.nn.Module, layers: int) -> tuple[Any, dict[str, Any]]:
    """``model``'s captured decoder step and the two workloads: name -> (call args, whether
    the tokens are public), a 128-token prefill and a decode step on its cache."""
    from partitioner.generation import DecoderStep, cache_shape, capture_decoder

    heads, head_dim = cache_shape(model)
    ids = torch.randint(
        0, model.config.vocab_size, (1, CONTEXT), generator=torch.Generator().manual_seed(1)
    )
    empty = [torch.zeros(1, heads, 0, head_dim) for _ in range(2 * layers)]
    whole = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        past = list(DecoderStep(model)(ids, whole, empty)[1:])
    workloads = {
        "prefill": ((ids, whole, empty), False),
        "decode": ((ids[:, -1:], whole, past), True),
    }
    return capture_decoder(model), workloads


class CudaRunner:
    """GPU stages on CUDA: each stage's module prepared once for the device, inputs moved
    there, outputs back (what ``runtime.worker.GPUWorker.run`` does per call)."""

    def __init__(self, plan: Any, device: str = "cuda") -> None:
        from partitioner.ops import prepare_ring_weights

        self.device = torch.device(device)
        self.modules = {
            s.name: prepare_ring_weights(s.module, self.device)
            for s in plan.stages
            if s.side == "gpu"
        }
        self.seconds = 0.0
        self.calls = 0

    def run(self, stage: str, tensors: list[torch.Tensor], expected: Any = None, **_: Any) -> Any:
        start = time.perf_counter()
        with torch.no_grad():
            outs = self.modules[stage](*(t.to(self.device) for t in tensors))
        outs = [o.cpu() for o in outs]  # .cpu() waits for the device
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return outs

    def release(self, stage: str, rows: Any) -> None:
        pass


class TimedRunner:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def run(self, stage: str, tensors: list[torch.Tensor], expected: Any = None, **kw: Any) -> Any:
        start = time.perf_counter()
        outs = self.inner.run(stage, tensors, expected, **kw)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return outs

    def release(self, stage: str, rows: Any) -> None:
        self.inner.release(stage, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["slalom", "cmif", "all_gpu"])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda_e2e.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # as the worker: Freivalds bounds float32
    torch.backends.cudnn.allow_tf32 = False

    from enclave_runtime.executor import InProcessRunner
    from partitioner.api import partition
    from partitioner.policy import Policy

    started = time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"torch {torch.__version__}, {device}; {args.layers} layers")
    rows = []
    models: dict[bool, tuple[Any, dict[str, Any]]] = {}  # by whether it carries the LoRA
    for preset in args.presets:
        lora = preset == "private_finetune"  # its preset names peft's base public
        if lora not in models:
            start = time.perf_counter()
            model = smollm2_shape(args.layers)
            models[lora] = prepared(with_lora(model) if lora else model, args.layers)
            name = "LoRA" if lora else "base"
            print(f"{name} model captured in {time.perf_counter() - start:.0f} s")
        step, workloads = models[lora]
        start = time.perf_counter()
        split = partition(step, Policy.preset(preset))
        print(f"{preset}: partitioned in {time.perf_counter() - start:.0f} s", flush=True)
        masking = split.protection.masking if split.protection is not None else "none"
        for workload, (call_args, public) in workloads.items():
            results = {}
            for side in ("cpu", "cuda"):
                inner = (
                    InProcessRunner(split.spec)
                    if side == "cpu"
                    else CudaRunner(split.spec, args.device)
                )
                runner = TimedRunner(inner)
                ex = split.executor(runner, seed=7)
                env = ex.signature.bind(call_args, {})
                if ex.pool is not None:
                    ex.pool.fill(ex.binding(env), args.repeats + 1, batch=args.repeats + 1)
                calls, gpu = [], []
                with torch.no_grad():
                    first = ex.run(call_args, {}, public_tokens=public)[0]
                    for _ in range(args.repeats):
                        runner.seconds = 0.0
                        start = time.perf_counter()
                        ex.run(call_args, {}, public_tokens=public)
                        calls.append(time.perf_counter() - start)
                        gpu.append(runner.seconds)
                results[side] = {
                    "logits": first,
                    "call_ms": statistics.median(calls) * 1e3,
                    "gpu_ms": statistics.median(gpu) * 1e3,
                    "enclave_ms": statistics.median(c - g for c, g in zip(calls, gpu, strict=True))
                    * 1e3,
                    "round_trips": runner.calls // (args.repeats + 1),
                }
            a, b = results["cpu"]["logits"], results["cuda"]["logits"]
            row = {
                "preset": preset,
                "masking": masking,
                "workload": workload,
                "bit_identical": bool(torch.equal(a, b)),
                "max_abs_diff": float((a - b).abs().max()),
                "argmax_equal": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
                **{
                    f"{side}_{k}": v
                    for side, r in results.items()
                    for k, v in r.items()
                    if k != "logits"
                },
            }
            row["gpu_speedup"] = (
                row["cpu_gpu_ms"] / row["cuda_gpu_ms"] if row["cuda_gpu_ms"] else None
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| preset | masking | workload | CUDA = CPU bit for bit | max |Δ| | GPU stages CPU ms "
        "| GPU stages CUDA ms | enclave ms (CUDA run) | round trips |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['masking']} | {r['workload']} | {r['bit_identical']} | "
            f"{r['max_abs_diff']:.2e} | {r['cpu_gpu_ms']:.1f} | {r['cuda_gpu_ms']:.2f} | "
            f"{r['cuda_enclave_ms']:.1f} | {r['cuda_round_trips']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"torch": torch.__version__, "device": device, "layers": args.layers, "rows": rows},
            indent=1,
        )
    )
    print(f"written to {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
