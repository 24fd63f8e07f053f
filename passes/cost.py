"""The cost of protection per GPU stage, for the plan and the report.

Reads a GPU stage's module, its correction and the shape context; returns MFLOP figures at the
reference sizes. Writes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from partitioner.op_table import op_name
from partitioner.plan import Correction
from partitioner.shapes import ShapeContext, node_flops


def correction_cost(
    module: torch.fx.GraphModule, corr: Correction, shapes: ShapeContext
) -> dict[str, Any]:
    """MFLOP offloaded to the GPU stage, and what its correction costs the enclave online
    (products of two activations) or offline (precomputed from the pads alone)."""

    def flops(gm: torch.fx.GraphModule) -> int:
        total = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = op_name(node)
            if name in ("ring_linear", "ring_matmul"):  # not in torch's FLOP counter
                out = node.meta["val"]
                numel = 1
                for s in out.shape:
                    numel *= shapes.evaluate(s)
                inner = node.args[1].meta["val"].shape[1 if name == "ring_linear" else -2]
                total += 2 * numel * shapes.evaluate(inner)
            elif isinstance(node.meta.get("val"), torch.Tensor):
                total += node_flops(node, shapes)
        return total

    return {
        "gpu_mflop": round(flops(module) / 1e6, 3),
        "enclave_online_mflop": 0.0 if corr.precomputable else round(flops(corr.module) / 1e6, 3),
        "enclave_offline_mflop": round(flops(corr.module) / 1e6, 3) if corr.precomputable else 0.0,
    }
