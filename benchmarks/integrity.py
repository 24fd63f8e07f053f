"""How often Freivalds catches a corrupted GPU result, on SmolLM2 under slalom with float masks.

A GPU stage's result is corrupted after it is computed (what a hostile worker can do): one
logit of the last GPU stage (``lm_head``) raised by +1, +5 or +50, or a whole row of it shifted.
For each change the script counts detections over ``--trials`` requests and prints each
corrupted row's rounding bound τ_r (the check's tolerance for that row), so the smallest
detectable change can be read off; clean requests count false alarms. Run:

    python benchmarks/integrity.py --trials 12 --seq 16
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/integrity.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from enclave_runtime import integrity
    from partitioner.api import partition
    from partitioner.errors import IntegrityError
    from partitioner.policy import Policy
    from partitioner.zoo import smollm2

    start = time.perf_counter()
    split = partition(smollm2(), Policy.preset("slalom", masking="additive"))
    print(f"partitioned in {time.perf_counter() - start:.0f} s", flush=True)
    head = [s for s in split.stages if s.side == "gpu"][-1]
    inner = head.module
    executor = split.executor()
    bounds: list[float] = []
    original_check = integrity.check

    def recording_check(
        stage: str, vectors: dict, inputs: list, outputs: list, prime: int | None
    ) -> dict:
        try:
            result = original_check(stage, vectors, inputs, outputs, prime)
        except Exception:
            if stage == head.name:  # the tolerance of the corrupted (last) row, from a clean run
                clean = original_check(stage, vectors, inputs, [inner_out[0]], prime)
                bounds.append(float(clean["row_tolerances"][0][-1]))
            raise
        if stage == head.name and prime is None:
            bounds.append(float(result["row_tolerances"][0][-1]))
        return result

    integrity.check = recording_check
    import enclave_runtime.executor as executor_module

    executor_module.integrity.check = recording_check
    inner_out: list[torch.Tensor] = [torch.empty(0)]
    gen = torch.Generator().manual_seed(0)
    results = {}
    cases = [("clean", 0.0), ("one logit +1", 1.0), ("one logit +5", 5.0),
             ("one logit +50", 50.0), ("whole row +0.5", 0.5)]  # fmt: skip
    for label, amount in cases:

        def corrupted(*xs: torch.Tensor, amount: float = amount, label: str = label) -> tuple:
            outs = [o.clone() for o in inner(*xs)]
            inner_out[0] = outs[0].clone()
            if amount:
                logits = outs[0].view(-1, outs[0].shape[-1])
                if label.startswith("whole row"):
                    logits[-1] += amount
                else:
                    col = int(torch.randint(0, logits.shape[-1], (1,), generator=gen))
                    logits[-1, col] += amount
            return tuple(outs)

        head.module = corrupted
        caught = 0
        bounds.clear()
        for _ in range(args.trials):
            ids = torch.randint(3, 49152, (1, args.seq), generator=gen)
            try:
                with torch.no_grad():
                    executor(input_ids=ids)
            except IntegrityError:
                caught += 1
        results[label] = {
            "detected": caught,
            "trials": args.trials,
            "row_bound_median": sorted(bounds)[len(bounds) // 2] if bounds else None,
        }
        print(f"{label:<16} detected {caught}/{args.trials}; row bound τ_r median "
              f"{results[label]['row_bound_median']:.3g}", flush=True)  # fmt: skip
    head.module = inner
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seq": args.seq, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
