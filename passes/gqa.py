"""Grouped-query attention without copies: SDPA reads the shared key/value heads directly.

Models with fewer key/value heads than query heads (Llama, Qwen, SmolLM2: 9 query heads on 3
KV heads) repeat each KV head for its group before attention, as transformers' ``repeat_kv``
does: ``k[:, :, None].expand(b, kvh, g, L, d).reshape(b, kvh * g, L, d)``. That reshape of an
expanded view is a copy of the whole cache, g times over, in every step: at a decode step it is
most of what an attention stage does (two 129 x 9 x 64 float32 copies per layer on SmolLM2,
read again by the attention). ``scaled_dot_product_attention(..., enable_gqa=True)`` computes
the same function from the unrepeated heads (query head ``j`` reads KV head ``j // g``, which
is exactly the head ``repeat_kv`` put there).

Reads an ExportedProgram; returns a new one (the original is not edited; weights are shared)
in which every SDPA whose key and value are both that repeat pattern, with the same group
size, reads the repeated tensors' sources with ``enable_gqa=True``; the repeat nodes are
removed when nothing else reads them. Anything else (a key repeated differently, a value not
repeated, a repeat read elsewhere) is left as it was. Guarantees the same function: the
rewritten SDPA receives the same query, mask and scale; only its key/value operands change,
from the repeated copy to its source.

Run it only where SDPA stays one op: :func:`passes.attention.decompose_attention` spells
``enable_gqa`` out as a ``repeat_interleave``, the same copy again.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.export import ExportedProgram

from passes.graph_edit import rewritten

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default


def _repeat_source(node: object) -> tuple[torch.fx.Node, int] | None:
    """``(source, group)`` if ``node`` is ``reshape(expand(unsqueeze(source, 2)))`` repeating
    each of the source's heads ``group`` times in place (``repeat_kv``), else ``None``."""
    if not (isinstance(node, torch.fx.Node) and node.target is aten.reshape.default):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.target is aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, torch.fx.Node) and unsqueeze.target is aten.unsqueeze.default):
        return None
    source = unsqueeze.args[0]
    if not isinstance(source, torch.fx.Node) or unsqueeze.args[1] not in (2, -3):
        return None
    src, out = source.meta.get("val"), node.meta.get("val")
    unsq, exp = unsqueeze.meta.get("val"), expand.meta.get("val")
    if not all(isinstance(t, torch.Tensor) for t in (src, out, unsq, exp)):
        return None
    if src.dim() != 4 or exp.dim() != 5 or out.dim() != 4:
        return None
    group = exp.shape[2]
    if not isinstance(group, int) or group < 1:
        return None
    # the expand only widens the new axis, and the reshape merges it into the head axis
    same = [exp.shape[i] == unsq.shape[i] for i in (0, 1, 3, 4)]
    merged = [out.shape[0] == src.shape[0], out.shape[2] == src.shape[2]]
    heads = out.shape[1] == src.shape[1] * group and out.shape[3] == src.shape[3]
    if not (all(same) and all(merged) and heads and unsq.shape[2] == 1):
        return None
    return source, group


def share_kv_heads(program: ExportedProgram) -> ExportedProgram:
    """A new program whose SDPA ops read un-repeated key/value heads (``enable_gqa=True``)
    wherever the repeat is ``repeat_kv``'s; ``program`` itself if there is none."""
    found = []
    for node in program.graph.nodes:
        if node.target is not _SDPA or node.kwargs.get("enable_gqa", False):
            continue
        if len(node.args) < 3 or len(node.args) > 4:  # only q, k, v[, mask] positionally
            continue
        key, value = _repeat_source(node.args[1]), _repeat_source(node.args[2])
        if key is None or value is None or key[1] != value[1] or key[1] == 1:
            continue
        # enable_gqa maps query head j to KV head j // group: the query must have exactly
        # the repeated heads (SDPA would otherwise broadcast a query over them), and key and
        # value the same heads
        query, repeated = node.args[0].meta.get("val"), node.args[1].meta.get("val")
        heads = [key[0].meta["val"].shape[1], value[0].meta["val"].shape[1]]
        if not (
            isinstance(query, torch.Tensor)
            and query.dim() == 4
            and query.shape[1] == repeated.shape[1]
            and heads[0] == heads[1]
        ):
            continue
        found.append((node, key[0], value[0]))
    if not found:
        return program

    def rewrite(graph: torch.fx.Graph, value_map: dict[torch.fx.Node, torch.fx.Node]) -> None:
        for node, key, value in found:
            new = value_map[node]
            repeats = [new.args[1], new.args[2]]
            new.args = (new.args[0], value_map[key], value_map[value], *new.args[3:])
            new.kwargs = {**new.kwargs, "enable_gqa": True}
            # reshape <- expand <- unsqueeze, if nothing else reads it (once: k may be v)
            for repeat in dict.fromkeys(repeats):
                for dead in [repeat, repeat.args[0], repeat.args[0].args[0]]:
                    if dead.users:
                        break
                    graph.erase_node(dead)

    return rewritten(program, rewrite)
