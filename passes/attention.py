"""Attention decomposition: ``scaled_dot_product_attention`` -> QKᵀ, softmax, ·V.

torch.export keeps SDPA as one op, and it contains a softmax. A policy that pins ``nonlinear``
to the enclave but lets ``attention`` run on the GPU needs the softmax out of the op.

Reads an ExportedProgram; returns a new one (``run_decompositions`` with a table holding only
SDPA, so ``linear``, ``layer_norm`` and the rest stay whole and keep their ``nn_module_stack``).
Guarantees the same function as eager under torch's MATH SDPA backend, op for op: the
decomposition is ``aten._scaled_dot_product_attention_math`` traced into its pieces. The fused
CPU flash kernel rounds differently (measured up to ~5e-5 on SmolLM2 logits); dropout must be 0.
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
    # Op for op what aten::_scaled_dot_product_attention_math does (scale split as sqrt on q
    # and on kᵀ, boolean masks turned into additive -inf masks, _safe_softmax), so the result
    # equals eager under the MATH backend exactly rather than to within rounding.
    if dropout_p != 0.0:
        raise PartitionError(
            f"scaled_dot_product_attention with dropout_p={dropout_p} cannot be decomposed for "
            "inference; export the model in eval mode"
        )
    factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.size(-1)))
    query = query * factor
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device)
        attn_mask = keep.tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), 0.0).to(query.dtype)
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1) * factor)
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.matmul(aten._safe_softmax.default(scores, -1), value)


def decompose_attention(program: ExportedProgram) -> ExportedProgram:
    """A new program in which every SDPA op is spelled out as matmul/softmax/matmul."""
    has_sdpa = any(
        n.target is aten.scaled_dot_product_attention.default for n in program.graph.nodes
    )
    if not has_sdpa:
        return program
    return program.run_decompositions({aten.scaled_dot_product_attention.default: _sdpa_math})
