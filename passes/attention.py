"""Attention decomposition: ``scaled_dot_product_attention`` -> QKᵀ, softmax, ·V.

torch.export keeps SDPA as one op, and it contains a softmax. A policy that pins ``nonlinear``
to the enclave but lets ``attention`` run on the GPU needs the softmax out of the op.

Reads an ExportedProgram; returns a new one (``run_decompositions`` with a table holding only
SDPA, so ``linear``, ``layer_norm`` and the rest stay whole and keep their ``nn_module_stack``).
Guarantees the same function up to float rounding: the math is SDPA's reference definition
(scale, boolean or additive mask, causal mask, grouped-query heads); dropout must be 0.
"""

from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

from partitioner.errors import PartitionError

aten = torch.ops.aten


def _sdpa_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if dropout_p != 0.0:
        raise PartitionError(
            f"scaled_dot_product_attention with dropout_p={dropout_p} cannot be decomposed for "
            "inference; export the model in eval mode"
        )
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(query.size(-1))
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def decompose_attention(program: ExportedProgram) -> ExportedProgram:
    """A new program in which every SDPA op is spelled out as matmul/softmax/matmul."""
    has_sdpa = any(
        n.target is aten.scaled_dot_product_attention.default for n in program.graph.nodes
    )
    if not has_sdpa:
        return program
    return program.run_decompositions({aten.scaled_dot_product_attention.default: _sdpa_math})
