"""The ceiling on a split's TEE-bound speedup: the ``all_enclave`` step with every weight-linear
layer made free.

Every preset keeps the model's non-linear work (norms, rotary embeddings, attention over the
cache, SiLU, residual adds) in the enclave; only weight-linear layers (``aten.linear``) go to
the GPU. So no preset's online speedup can beat ``T(all_enclave) / T(all_enclave, linears
free)``, whatever its masking costs. Measured two ways, on the same inputs:

* ``eager``: the stage's GraphModule as the executor runs it (one Python-dispatched aten op
  per node);
* ``compiled``: the same graphs through ``torch.compile`` (Inductor, C++ kernels on this CPU):
  what fusing the enclave's non-linear work would buy. The full step is compiled too, so the
  compiled ceiling compares compiled with compiled.

A linear layer is made free by replacing its node with ``torch.empty`` of the output's shape.

    python benchmarks/ceiling.py [--repeats 10] [--no-compile]   # SmolLM2-135M, context 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)


def linears_free(module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A copy of ``module`` whose ``aten.linear`` nodes cost nothing; and how many there were."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    count = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default):
        node.target = _free_linear
        count += 1
    return torch.fx.GraphModule(module, graph), count


def _median_ms(fn: Any, args: list[Any], repeats: int) -> float:
    with torch.no_grad():
        fn(*args)  # warm-up (and, compiled, the compilation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ceiling(split: Any, args: tuple[Any, ...], repeats: int, compile: bool) -> dict[str, Any]:
    """Times of ``split``'s single enclave stage (an ``all_enclave`` split) with and without
    its linear layers, eager and (``compile``) compiled, and the ceilings they imply."""
    (stage,) = split.stages
    ex = split.executor()
    env = ex.signature.bind(args, {})
    flat = [env[name] for name in stage.inputs]
    free, count = linears_free(stage.module)
    out: dict[str, Any] = {"linear_layers": count}
    out["eager_ms"] = _median_ms(stage.module, flat, repeats)
    out["eager_linears_free_ms"] = _median_ms(free, flat, repeats)
    out["eager_ceiling"] = out["eager_ms"] / out["eager_linears_free_ms"]
    if compile:
        start = time.perf_counter()
        full = torch.compile(stage.module, dynamic=False)
        out["compiled_ms"] = _median_ms(full, flat, repeats)
        out["compiled_linears_free_ms"] = _median_ms(
            torch.compile(free, dynamic=False), flat, repeats
        )
        out["compiled_ceiling"] = out["compiled_ms"] / out["compiled_linears_free_ms"]
        out["compile_s"] = time.perf_counter() - start
    return out


def print_ceiling(results: dict[str, dict[str, Any]]) -> None:
    print(
        "\n## The ceiling: all_enclave with every linear layer free (ms; any preset that keeps "
        "the non-linear work in the enclave stays below it)\n"
    )
    print(
        "| workload | all_enclave eager | linears free, eager | ceiling eager "
        "| all_enclave compiled | linears free, compiled | ceiling compiled |"
    )
    print("|---|---|---|---|---|---|---|")
    for workload, c in results.items():
        print(
            f"| {workload} | {c['eager_ms']:.1f} | {c['eager_linears_free_ms']:.1f} "
            f"| {c['eager_ceiling']:.2f}x | {c.get('compiled_ms', float('nan')):.1f} "
            f"| {c.get('compiled_linears_free_ms', float('nan')):.1f} "
            f"| {c.get('compiled_ceiling', float('nan')):.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from benchmarks.teebound import workloads_for
    from partitioner.api import partition
    from partitioner.policy import Policy

    step, workloads = workloads_for()
    split = partition(step, Policy.preset("all_enclave"))
    results = {
        name: ceiling(split, call_args, args.repeats, args.compile)
        for name, (call_args, _) in workloads.items()
    }
    print_ceiling(results)


if __name__ == "__main__":
    main()
