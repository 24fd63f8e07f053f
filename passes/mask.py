"""Mask rewrite: ``teesplit::mask`` at the end of the enclave stage that produces a masked
value, ``teesplit::unmask`` at the start of the enclave stage that consumes a masked GPU value.

Reads one stage, the masked values, the masked GPU values and (under ``masking="exact"``)
the ring format; returns a new stage (the one given is not edited). Guarantees: a masked
output is returned *after* the stage's outputs (``masked_outputs``) and takes its pad as an
extra ``("mask", value)`` input; a masked GPU input is unmasked with an extra
``("delta", value)`` input before any op reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from partitioner.ops import OPS
from partitioner.plan import GPU, ExactSpec, Stage
from passes.base import fake_like
from passes.graph_edit import append_placeholder, copy_graph, graph_module, input_node


def rewrite_stage(
    stage: Stage,
    masked: dict[str, Any],
    gpu_masked: set[str],
    modules: dict[str, torch.fx.GraphModule],
    exact: ExactSpec | None,
) -> Stage:
    """``stage`` with its masks and unmasks (enclave) or its field/masked module (GPU)."""
    if stage.side == GPU:
        if modules.get(stage.name, stage.module) is stage.module:
            return stage
        return dataclasses.replace(stage, module=modules[stage.name])
    mask_out = [o for o in stage.outputs if o in masked]
    unmask_in = [i for i in stage.inputs if i in gpu_masked]
    if not mask_out and not unmask_in:
        return stage
    graph, nodes = copy_graph(stage.module)
    extras = list(stage.extra_inputs)
    consts: dict[str, torch.Tensor] = {}
    for name in unmask_in:
        ph = input_node(stage, nodes, name)
        plain_val = ph.meta["val"]
        rows = exact is not None and name in exact.row_outputs
        if exact is not None:  # residues arrive as ring integers
            ph.meta["val"] = fake_like(plain_val, getattr(torch, exact.ring[name]), wider=int(rows))
        delta = append_placeholder(graph, f"delta_{name}", ph.meta["val"])
        extras.append(("delta", name))
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            if exact is None:
                plain = graph.call_function(OPS.unmask.default, (ph, delta))
            else:
                inv = _const_node(graph, consts, f"_exact_inv_scale_{name}", exact.inv_scale[name])
                if rows:
                    bias = exact.bias.get(name)
                    b = bias if bias is None else _const_node(graph, consts, f"_bias_{name}", bias)
                    plain = graph.call_function(OPS.ring_unmask_rows.default, (ph, delta, inv, b))
                else:
                    plain = graph.call_function(OPS.ring_unmask.default, (ph, delta, inv))
        plain.meta = {**ph.meta, "val": plain_val}
        ph.replace_all_uses_with(plain, delete_user_cb=lambda n, p=plain: n is not p)
    out_node = next(iter(graph.find_nodes(op="output")))
    results = list(out_node.args[0])
    for name in mask_out:
        value = results[stage.outputs.index(name)]
        val = value.meta["val"]
        r = append_placeholder(
            graph,
            f"mask_{name}",
            val if exact is None else _ring_like(val, exact, name),
        )
        extras.append(("mask", name))
        with graph.inserting_before(out_node):
            if exact is None:
                hidden = graph.call_function(OPS.mask.default, (value, r))
            elif name in exact.row_limit:
                hidden = graph.call_function(
                    OPS.ring_mask_rows.default, (value, r, exact.row_limit[name])
                )
            else:
                hidden = graph.call_function(
                    OPS.ring_mask.default, (value, r, exact.frac_bits[name], exact.limit[name])
                )
        hidden.meta["val"] = r.meta["val"]
        results.append(hidden)
    out_node.args = (tuple(results),)
    graph.lint()
    module = graph_module(stage.module, graph, consts, stage.name)
    return dataclasses.replace(
        stage,
        module=module,
        inputs=list(stage.inputs),
        outputs=list(stage.outputs),
        extra_inputs=extras,
        masked_outputs=[*stage.masked_outputs, *mask_out],
    )


def _const_node(
    graph: torch.fx.Graph, consts: dict[str, torch.Tensor], name: str, value: torch.Tensor
) -> torch.fx.Node:
    consts[name] = value
    node = graph.get_attr(name)
    node.meta["val"] = value
    return node


def _ring_like(val: torch.Tensor, exact: ExactSpec, name: str) -> torch.Tensor:
    """The fake value of ``name``'s pad: ring integers, one column wider when row-scaled."""
    return fake_like(val, getattr(torch, exact.ring[name]), wider=int(name in exact.row_limit))
