"""Field masking (``masking="field"``): GPU stages rewritten to exact arithmetic modulo a prime.

Reads a GPU stage and which of its inputs arrive masked; returns a new GraphModule (the stage is
not edited) in which masked values are int64 residues modulo ``PRIME``:

* the enclave quantises a crossing value to fixed point, ``q = round(x * 2**FRAC_BITS)``, and
  sends ``q + r mod p`` with ``r`` uniform on ``[0, p)``: a one-time pad, so the GPU learns
  nothing about ``q`` (perfect hiding, unlike float masks);
* ``p = 2**61 - 1``; each linear layer becomes ``teesplit::field_linear``, which splits the
  residues into two 31-bit limbs, with weights quantised to ``w_bits`` fractional bits chosen
  per weight so that ``2**31 * max|w_q| * fan_in < 2**62``: int64 sums of products never
  overflow (float32 partial sums would lose exactness at LLM fan-ins);
* biases are quantised at the output scale and added mod ``p``; shape ops are unchanged.

The result is exact: after the enclave subtracts ``L(r)`` and lifts the residue to the signed
range, it equals the fixed-point computation without masks bit for bit, as long as the true
output satisfies ``|y| * 2**(FRAC_BITS + w_bits) < p / 2`` (the plan states each bound).
Anything else on a masked value (a scale by a non-integer, a nonlinearity, a second weight
product in the same stage) raises :class:`PartitionError` naming the node.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx

from partitioner.errors import PartitionError
from partitioner.op_table import TABLE, is_weight_linear, op_name
from partitioner.ops import LIMB_BITS, OPS, PRIME, quantize
from partitioner.plan import Edge, FieldSpec
from partitioner.shapes import ShapeContext
from passes.base import fake_like

FRAC_BITS = 14
RANGE_BITS = 12  # outputs are exact while |y| < 2**RANGE_BITS; weights get the bits left over
_PRODUCT_BUDGET = 62  # log2 bound on |limb of x + r| * |w_q| * fan_in
# ops that move residues unchanged: no arithmetic, no cast (OpProps.passes_values)
_SHAPE_ONLY = frozenset(n for n, p in TABLE.items() if p.passes_values)


class FieldRefusal(PartitionError):
    """An op on a masked value that has no exact field form; ``node`` names it."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node


def new_field_spec() -> FieldSpec:
    """An empty field format with the default prime and activation bits."""
    return FieldSpec(PRIME, FRAC_BITS)


def mark_field_edges(edges: list[Edge], masked: dict[str, Any], gpu_masked: set[str]) -> list[Edge]:
    """Masked values cross as int64 residues: the edges with that dtype and the bytes it takes."""
    out = []
    for edge in edges:
        if (
            edge.crossing
            and (edge.name in masked or edge.name in gpu_masked)
            and edge.dtype != "int64"
        ):
            edge = dataclasses.replace(
                edge, nbytes=edge.nbytes * 8 // _itemsize(edge.dtype), dtype="int64"
            )
        out.append(edge)
    return out


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _weight_bits(weight: torch.Tensor, fan_in: int, prime: int, frac_bits: int) -> int:
    """Fractional bits for a weight: as many as the int64 product bound allows, capped so that
    outputs up to ``2**RANGE_BITS`` in magnitude stay below ``prime / 2``."""
    budget = _PRODUCT_BUDGET - LIMB_BITS - math.ceil(math.log2(max(fan_in, 2)))
    cap = math.floor(math.log2(prime)) - 1 - frac_bits - RANGE_BITS
    # A meta-device weight (planning at 7B scale) has no values: plan for |w| <= 1.
    largest = 1.0 if weight.device.type == "meta" else float(weight.detach().abs().max())
    if budget < 2 or largest == 0.0:
        return max(min(budget, cap), 0)
    return min(math.floor(math.log2((2**budget - 1) / largest)), cap)


def to_field(
    stage: Any, masked_inputs: list[str], plan: FieldSpec, shapes: ShapeContext
) -> torch.fx.GraphModule:
    """The stage with masked values carried as residues mod ``plan.prime``."""
    module: torch.fx.GraphModule = stage.module
    graph = torch.fx.Graph()
    env: dict[str, Any] = {}
    scale: dict[str, int] = {}  # masked value -> its fractional bits
    attrs: dict[str, torch.Tensor] = {}

    def arg(a: Any) -> Any:
        return env[a.name] if isinstance(a, torch.fx.Node) else a

    def refuse(node: torch.fx.Node, why: str) -> PartitionError:
        return FieldRefusal(
            node.name,
            f"masking='field': GPU stage {stage.name} runs {node.name} ({op_name(node)}) on a "
            f"masked value, and {why}; field masking supports linear layers, bias adds and "
            "shape ops on the GPU. Use masking='additive' or pin its label to the enclave",
        )

    def const(a: Any) -> torch.Tensor | None:
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            return operator.attrgetter(a.target)(module)
        return None

    def new_attr(prefix: str, tensor: torch.Tensor) -> torch.fx.Node:
        name = f"_field_{prefix}"
        attrs[name] = tensor
        node = graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = graph.placeholder(node.name)
            env[node.name].meta = dict(node.meta)
            if node.name in masked_inputs:
                scale[node.name] = plan.frac_bits
            continue
        if node.op == "get_attr":
            env[node.name] = graph.get_attr(node.target)
            env[node.name].meta = dict(node.meta)
            attrs[node.target] = operator.attrgetter(node.target)(module)
            continue
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], arg))
            continue
        varying = [a for a in node.all_input_nodes if a.name in scale]
        if not varying:
            env[node.name] = graph.node_copy(node, lambda a: env[a.name])
            continue
        name = op_name(node)
        if name in _SHAPE_ONLY:
            if varying != [node.args[0]]:
                raise refuse(node, "a shape op may take only one masked operand")
            env[node.name] = graph.node_copy(node, lambda a: env[a.name])
            scale[node.name] = scale[node.args[0].name]
            continue
        if name == "_to_copy" and node.kwargs.get("dtype") in (
            None,
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            # residues have no float dtype to cast to; keep the node (and its name) as an alias
            env[node.name] = graph.create_node(
                "call_function",
                torch.ops.aten.alias.default,
                (env[node.args[0].name],),
                name=node.name,
            )
            env[node.name].meta = dict(node.meta)
            scale[node.name] = scale[node.args[0].name]
            continue
        if is_weight_linear(name):
            if name == "addmm":
                bias, x, w = node.args[0], node.args[1], node.args[2]
                weight = const(w)
                weight = weight.t() if weight is not None else None
            else:
                x, w = node.args[0], node.args[1]
                bias = node.args[2] if name == "linear" and len(node.args) > 2 else None
                weight = const(w)
                if weight is not None and name != "linear":
                    weight = weight.t()
            if weight is None or weight.dim() != 2 or x.name not in scale:
                raise refuse(node, "its weight is not a constant matrix")
            if scale[x.name] != plan.frac_bits:
                raise refuse(node, "its input already went through a weight product")
            fan_in = int(weight.shape[1])
            bits = _weight_bits(weight, fan_in, plan.prime, plan.frac_bits)
            w_q = quantize(weight.detach(), bits)
            out_bits = scale[x.name] + bits
            b_node = None
            if bias is not None:
                b = const(bias)
                if b is None:
                    raise refuse(node, "its bias is not a constant")
                b_node = new_attr(f"{node.name}_bias", quantize(b.detach(), out_bits) % plan.prime)
            w_node = new_attr(f"{node.name}_weight", w_q)
            out = graph.create_node(
                "call_function",
                OPS.field_linear.default,
                (env[x.name], w_node, b_node, plan.prime),
                name=node.name,  # stage outputs and corrections refer to values by name
            )
            out.meta = dict(node.meta)
            env[node.name] = out
            scale[node.name] = out_bits
            plan.weight_bits[node.name] = bits
            continue
        if name == "add" and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args[0], node.args[1]
            if a.name in scale and isinstance(b, torch.fx.Node) and b.name in scale:
                if scale[a.name] != scale[b.name]:
                    raise refuse(node, "its operands have different fixed-point scales")
                other = env[b.name]
            else:
                masked_arg, c = (a, b) if a.name in scale else (b, a)
                tensor = const(c)
                if tensor is None:
                    raise refuse(node, "it adds a value that is neither masked nor a constant")
                a = masked_arg
                other = new_attr(
                    f"{node.name}_const", quantize(tensor.detach(), scale[a.name]) % plan.prime
                )
            out = graph.create_node(
                "call_function",
                OPS.field_add.default,
                (env[a.name], other, plan.prime),
                name=node.name,
            )
            out.meta = dict(node.meta)
            env[node.name] = out
            scale[node.name] = scale[a.name]
            continue
        raise refuse(node, "it is not exact in a prime field")
    for name in scale:  # residues are int64, whatever float dtype the original value had
        node = env[name]
        if isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor):
            node.meta = {**node.meta, "val": fake_like(node.meta["val"], torch.int64)}
    for out in stage.outputs:
        if out in scale:
            plan.output_bits[out] = scale[out]
            plan.output_range[out] = plan.prime / 2 / 2 ** scale[out]
    graph.lint()
    return torch.fx.GraphModule(attrs, graph, class_name=f"{stage.name}_field")


def quantised_reference(split: Any) -> Any:
    """The *unsplit* program with its GPU layers computed in fixed point, without masks.

    An independent executor for checking field masking: it walks the source graph node by node
    (not the stages), quantises a value where it enters the GPU region, multiplies by the same
    quantised weights in plain int64 (no prime, no pads) and dequantises where a value leaves
    the region. The masked split program must equal it bit for bit while every output stays in
    its exact range. Returns a callable taking the program's inputs.
    """
    import torch.utils._pytree as pytree

    from partitioner.ops import dequantize

    prot = split.protection
    plan: FieldSpec = prot.field_plan
    source = split.source
    sig = source.graph_signature
    weights = {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }
    state = {**source.state_dict, **source.constants}
    region = {n for stage in split.stages if stage.side == "gpu" for n in stage.nodes}
    entering = set(prot.masked)

    def run(*args: Any, **kwargs: Any) -> Any:
        env: dict[str, Any] = split.signature.bind(args, dict(kwargs))
        ints: dict[str, tuple[torch.Tensor, int]] = {}

        def plain(name: str) -> Any:
            if name in ints:
                q, bits = ints[name]
                return dequantize(q, bits)
            return env[name]

        def fixed(node: torch.fx.Node) -> tuple[torch.Tensor, int] | None:
            if node.name in ints:
                return ints[node.name]
            if node.name in entering:
                return quantize(env[node.name], plan.frac_bits), plan.frac_bits
            return None

        for node in source.graph.nodes:
            if node.op == "placeholder":
                if node.name in weights:
                    env[node.name] = state[weights[node.name]]
                continue
            if node.op == "output":
                flat = [plain(a.name) if isinstance(a, torch.fx.Node) else a for a in node.args[0]]
                return pytree.tree_unflatten(flat, split.signature.out_spec)
            operands = {a.name: fixed(a) for a in node.all_input_nodes}
            if node.name not in region or not any(v is not None for v in operands.values()):
                env[node.name] = node.target(
                    *torch.fx.node.map_arg(node.args, lambda a: plain(a.name)),
                    **torch.fx.node.map_arg(node.kwargs, lambda a: plain(a.name)),
                )
                continue
            name = op_name(node)
            if is_weight_linear(name):
                if name == "addmm":
                    bias, x, w = node.args
                    weight = env[w.name].t()
                else:
                    x, w = node.args[0], node.args[1]
                    bias = node.args[2] if name == "linear" and len(node.args) > 2 else None
                    weight = env[w.name] if name == "linear" else env[w.name].t()
                q, bits = operands[x.name]
                wbits = plan.weight_bits[node.name]
                out = torch.matmul(q, quantize(weight.detach(), wbits).t())
                if bias is not None:
                    out = out + quantize(env[bias.name].detach(), bits + wbits)
                ints[node.name] = (out, bits + wbits)
            elif name == "add":
                a, b = node.args[0], node.args[1]
                qa = operands.get(a.name) if isinstance(a, torch.fx.Node) else None
                qb = operands.get(b.name) if isinstance(b, torch.fx.Node) else None
                if qa is None:
                    (a, qa), (b, qb) = (b, qb), (a, qa)
                bits = qa[1]
                other = qb[0] if qb is not None else quantize(plain(b.name), bits)
                ints[node.name] = (qa[0] + other, bits)
            elif name == "_to_copy":
                ints[node.name] = operands[node.args[0].name]
            else:  # a shape op: the same op on the integers
                q, bits = operands[node.args[0].name]
                rest = torch.fx.node.map_arg(node.args[1:], lambda a: plain(a.name))
                kwargs_ = torch.fx.node.map_arg(node.kwargs, lambda a: plain(a.name))
                ints[node.name] = (node.target(q, *rest, **kwargs_), bits)
        raise AssertionError("the source graph has no output node")

    return run
