"""Attention decomposition: ``scaled_dot_product_attention`` -> QKᵀ, softmax, ·V.

torch.export keeps SDPA as one op, and it contains a softmax. A policy that pins ``nonlinear``
to the enclave but lets ``attention`` run on the GPU needs the softmax out of the op.

Reads an ExportedProgram; returns a new one whose graph is a copy with every SDPA node
replaced in place by its pieces (the original program is not edited; weights are shared, not
copied). Each new node gets the SDPA node's ``nn_module_stack`` and a fake-tensor ``val``.
The rewrite is local, so its cost grows with the number of SDPA nodes, not the model size
(``run_decompositions`` would retrace the whole program: 10 s on Llama-2-7B shapes).

Guarantees the same function as eager under torch's MATH SDPA backend, op for op: the pieces
are those of ``aten::_scaled_dot_product_attention_math``. The fused CPU flash kernel rounds
differently (measured up to ~7e-5 on SmolLM2 logits). Dropout must be 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram

from partitioner.errors import PartitionError
from passes.graph_edit import rewritten

aten = torch.ops.aten


class _Emitter:
    """Inserts aten ops before an anchor node, giving each a fake ``val`` and the anchor's meta."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node) -> None:
        self.graph = graph
        self.anchor = anchor
        vals = [a.meta["val"] for a in anchor.all_input_nodes]
        self.fake_mode = detect_fake_mode(vals)

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.fx.Node:
        def val(a: Any) -> Any:
            return a.meta["val"] if isinstance(a, torch.fx.Node) else a

        with self.fake_mode:
            out = target(*[val(a) for a in args], **{k: val(v) for k, v in kwargs.items()})
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta = {
            k: v for k, v in self.anchor.meta.items() if k in ("nn_module_stack", "stack_trace")
        }
        node.meta["val"] = out
        return node


_SDPA_PARAMS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SDPA_DEFAULTS: dict[str, Any] = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def _rewrite_sdpa(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace one SDPA node by the ops of ``_scaled_dot_product_attention_math``.

    Same order as aten: the scale split as a square root on q and on kᵀ, a boolean or causal
    mask turned into an additive -inf mask, ``_safe_softmax``, then ·V; so the result equals
    eager under the MATH backend exactly rather than to within rounding.
    """
    bound = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMS, node.args, strict=False)), **node.kwargs}
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound["dropout_p"] != 0.0:
        raise PartitionError(
            f"{node.name}: scaled_dot_product_attention with dropout_p={bound['dropout_p']} "
            "cannot be decomposed for inference; export the model in eval mode"
        )
    emit = _Emitter(graph, node)
    qv, kv = q.meta["val"], k.meta["val"]
    scale = bound["scale"] if bound["scale"] is not None else 1.0 / math.sqrt(qv.size(-1))
    factor = math.sqrt(scale)
    mask = bound["attn_mask"]
    if bound["is_causal"]:
        length = emit(aten.sym_size.int, q, qv.dim() - 2)
        source = emit(aten.sym_size.int, k, kv.dim() - 2)
        ones = emit(aten.ones.default, [length, source], dtype=torch.bool, device=qv.device)
        mask = emit(aten.tril.default, ones)
    if mask is not None and mask.meta["val"].dtype == torch.bool:
        keep_not = emit(aten.logical_not.default, mask)
        mask = emit(aten.where.Scalar, keep_not, float("-inf"), 0.0)
        if qv.dtype != torch.float32:
            mask = emit(aten._to_copy.default, mask, dtype=qv.dtype)
    if bound["enable_gqa"] and kv.size(-3) != qv.size(-3):
        groups = qv.size(-3) // kv.size(-3)
        k = emit(aten.repeat_interleave.self_int, k, groups, -3)
        v = emit(aten.repeat_interleave.self_int, v, groups, -3)
    scaled_q = emit(aten.mul.Tensor, q, factor)
    k_t = emit(aten.transpose.int, k, -2, -1)
    scaled_k_t = emit(aten.mul.Tensor, k_t, factor)
    scores = emit(aten.matmul.default, scaled_q, scaled_k_t)
    if mask is not None:
        scores = emit(aten.add.Tensor, scores, mask)
    probs = emit(aten._safe_softmax.default, scores, -1)
    out = emit(aten.matmul.default, probs, v)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def decompose_attention(program: ExportedProgram) -> ExportedProgram:
    """A new program in which every SDPA op is spelled out as matmul/softmax/matmul."""
    targets = [
        n for n in program.graph.nodes if n.target is aten.scaled_dot_product_attention.default
    ]
    if not targets:
        return program

    def rewrite(graph: torch.fx.Graph, value_map: dict[torch.fx.Node, torch.fx.Node]) -> None:
        for node in targets:
            _rewrite_sdpa(graph, value_map[node])

    return rewritten(program, rewrite)
