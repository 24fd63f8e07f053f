"""Exact masking (``masking="exact"``): GPU stages rewritten to integer arithmetic in a ring.

Reads a GPU stage, which of its inputs arrive masked and the :class:`ExactSpec` being filled;
returns a new GraphModule (the stage is not edited) in which masked values are residues in
``Z_{2^32}`` (int32) or, for operands of a product of two activations, ``Z_{2^64}`` (int64):

* the enclave quantises a crossing value ``x`` to ``q = clamp(round(x * 2**f), ±limit)`` and
  sends ``q + r`` with ``r`` uniform over the whole ring: a one-time pad, so what the GPU
  receives is uniform whatever ``x`` is (perfect hiding, unlike float masks);
* each weight-linear layer becomes ``teesplit::ring_linear`` with int8 weights quantised per
  output channel (``w_q = round(w * 127 / max|w_row|)``) and the bias quantised at the output
  scale; one float64 GEMM computes it exactly on a CPU, int8 GEMMs on CUDA;
* ``limit`` is chosen so that no result can wrap: ``limit * max_row ||w_q||_1 <= 2**30`` and
  ``|b_q| < 2**30``, so ``|W q + b| < 2**31``; ``f`` is the largest number of fractional bits
  for which the calibration run's largest ``|x|`` (times ``2**MARGIN_BITS``) stays below the
  limit. A value beyond it is clamped, by the enclave and by the reference alike;
* a product of two masked activations becomes ``teesplit::ring_matmul`` in ``Z_{2^64}``, with
  limits such that ``limit_a * limit_b * K < 2**62`` for a contraction of length ``K``.

Guarantees: after the enclave subtracts the correction, the signed residue *is* the integer
result of the unmasked fixed-point computation, so the split program equals
:func:`quantised_reference` bit for bit. Anything else on a masked value (a scale by a
non-integer, a nonlinearity, a linear layer on a value that already went through one) raises
:class:`ExactRefusal` naming the node.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx

from partitioner.errors import PartitionError
from partitioner.op_table import TABLE, is_weight_linear, op_name, props
from partitioner.ops import OPS, quantize
from partitioner.plan import Edge
from partitioner.protection import ExactSpec
from passes.base import fake_like, model_weights

WEIGHT_MAX = 2047  # integer weights have at most 12 bits (fewer on wide layers)
MARGIN_BITS = 3  # headroom over the calibration run's largest activation
DEFAULT_AMAX = 64.0  # assumed largest |activation| where no calibration run is possible
LINEAR_BOUND = 2**30  # |W q| and |b_q| each stay below it: the sum never wraps Z_{2^32}
PRODUCT_BOUND = 2**62
MAX_FRAC_BITS = 24
_SHAPE_ONLY = frozenset(n for n, p in TABLE.items() if p.passes_values)
# ops that keep a per-channel scale in place: the last dim neither moves nor is cut
_KEEPS_LAST = frozenset(
    {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "clone", "alias", "contiguous",
     "detach", "expand", "slice", "select", "narrow"}
)  # fmt: skip


class ExactRefusal(PartitionError):
    """An op on a masked value that has no exact ring form; ``node`` names it."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node


@dataclasses.dataclass
class _Scale:
    frac_bits: int
    channel: torch.Tensor | None  # float64 per-output-channel multiplier, or uniform
    bound: int  # |value| is at most this, as an integer
    factor: float = 1.0  # a constant the value was scaled by (folded in, not computed)
    rows: bool = False  # each row has its own exponent, in an extra last column

    def same(self, other: _Scale) -> bool:
        if self.frac_bits != other.frac_bits or self.factor != other.factor:
            return False
        if self.channel is None or other.channel is None:
            return self.channel is None and other.channel is None
        return self.channel.shape == other.channel.shape and bool(
            torch.equal(self.channel, other.channel)
        )

    def inverse(self) -> torch.Tensor:
        inv = torch.tensor(2.0**-self.frac_bits * self.factor, dtype=torch.float64)
        return inv if self.channel is None else inv / self.channel


def weight_max(fan_in: int) -> int:
    """The largest integer weight a layer may use: ``2**31 * max|w| * fan_in <= 2**53`` keeps
    every partial sum of the float64 GEMM exact; at most 2047 (12 bits, int16)."""
    return max(1, min(WEIGHT_MAX, (2**53) // (2**31 * max(fan_in, 1))))


def quantise_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights per output channel (int8, or int16 beyond 127) and each channel's
    multiplier ``M / max|w_row|``, with ``M`` from :func:`weight_max`.

    A meta-device weight (planning at 7B scale) has no values: it plans for ``|w| <= 1``.
    """
    top_int = weight_max(int(weight.shape[1]))
    dtype = torch.int8 if top_int <= 127 else torch.int16
    if weight.device.type == "meta":
        rows = weight.shape[0]
        return torch.zeros(weight.shape, dtype=dtype), torch.full((rows,), float(top_int))
    w = weight.detach().to(torch.float64)
    top = w.abs().amax(dim=1)
    channel = torch.where(top > 0, top_int / top, torch.ones_like(top))
    q = torch.round(w * channel[:, None]).clamp(-top_int, top_int).to(dtype)
    return q, channel


def new_exact_spec() -> ExactSpec:
    return ExactSpec()


def mark_exact_edges(edges: list[Edge], spec: ExactSpec) -> list[Edge]:
    """Masked values cross as residues: the edges get the ring's dtype and the bytes it takes."""
    out = []
    rows = set(spec.row_limit) | set(spec.row_outputs)
    for edge in edges:
        ring = spec.ring.get(edge.name)
        carried = edge.crossing or edge.direction == "gpu->gpu"  # masked from GPU to GPU too
        if carried and ring is not None and edge.dtype != ring:
            size = 4 if ring == "int32" else 8
            nbytes = edge.nbytes * size // _itemsize(edge.dtype)
            shape = list(edge.shape)
            if edge.name in rows:  # one more column: each row's exponent
                nbytes = nbytes * (shape[-1] + 1) // shape[-1]
                shape[-1] += 1
            edge = dataclasses.replace(edge, nbytes=nbytes, dtype=ring, shape=shape)
        out.append(edge)
    return out


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def calibrate(program: Any, names: set[str]) -> dict[str, float]:
    """The largest ``|value|`` of each named value on the program's example inputs.

    Empty when there is nothing to run: no example inputs, or meta-device weights.
    """
    example = getattr(program, "example_inputs", None)
    state = {**program.state_dict, **program.constants}
    if not example or any(
        isinstance(t, torch.Tensor) and t.device.type == "meta" for t in state.values()
    ):
        return {}
    import torch.utils._pytree as pytree

    args, kwargs = example
    flat = iter(pytree.tree_leaves((args, kwargs)))
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            inputs.append(next(flat))
        else:
            inputs.append(state[spec.target])
    found: dict[str, float] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if node.name in names and isinstance(value, torch.Tensor) and value.numel():
                found[node.name] = float(value.detach().abs().max())
            return value

    try:
        with torch.no_grad():
            _Recorder(program.graph_module).run(*inputs)
    except Exception:  # a calibration run that cannot execute leaves the defaults in place
        return {}
    return found


def _trace(node: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(consumer, operand) pairs reached from ``node`` through shape-only ops."""
    out = []
    for user in node.users:
        if user.op == "output":
            out.append((user, node))
            continue
        if user.op != "call_function":
            continue
        if op_name(user) in _SHAPE_ONLY and user.args and user.args[0] is node:
            out.extend(_trace(user))
        else:
            out.append((user, node))
    return out


def _const(module: torch.fx.GraphModule, a: Any, depth: int = 0) -> torch.Tensor | None:
    """The value of ``a`` if it is a constant of the stage: an attribute, or a view, transpose
    or cast computed from constants alone (``W.T``, ``W.t()``), folded here."""
    if not isinstance(a, torch.fx.Node) or depth > 8:
        return None
    if a.op == "get_attr":
        return operator.attrgetter(a.target)(module)
    if a.op != "call_function" or op_name(a) not in _FOLDABLE:
        return None
    args = []
    for arg in a.args:
        if isinstance(arg, torch.fx.Node):
            value = _const(module, arg, depth + 1)
            if value is None:
                return None
            args.append(value)
        else:
            args.append(arg)
    return a.target(*args, **a.kwargs)


# weight views a model may spell its linear layers with (x @ W.T, matmul(x, W.t()))
_FOLDABLE = frozenset(
    {"t", "numpy_T", "transpose", "permute", "mT", "contiguous", "clone", "alias", "detach",
     "_to_copy", "to", "view", "reshape"}
)  # fmt: skip


def _weight_of(module: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight as [out, in] or None, bias node or None) of a weight-linear node,
    however it is spelled: ``linear``, ``addmm``, ``mm``/``matmul`` with a constant (or a
    folded view of one), a two-operand ``einsum`` that contracts the input's last dim with a
    constant matrix, ``bmm`` with a constant matrix expanded over the batch."""
    name = op_name(node)
    if name == "einsum":
        return _einsum_weight(module, node)
    if name == "bmm":
        x, w = node.args[0], node.args[1]
        if isinstance(w, torch.fx.Node) and op_name(w) in ("expand", "expand_as"):
            base = _const(module, w.args[0])
            if base is not None and base.dim() == 2:  # the same matrix for every batch row
                return x, base.t(), None
        return x, None, None
    if name == "addmm":
        bias, x, w = node.args[0], node.args[1], node.args[2]
        weight = _const(module, w)
        return x, (weight.t() if weight is not None else None), bias
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if name == "linear" and len(node.args) > 2 else None
    weight = _const(module, w)
    if weight is not None and name != "linear":
        weight = weight.t()
    return x, weight, bias


def _einsum_weight(module: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Any, Any, Any]:
    """``einsum("...i,oi->...o", x, W)`` (or ``"...i,io->...o"``) as a linear layer."""
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None, None, None
    inputs, out = equation.replace(" ", "").split("->")
    left, right = [*inputs.split(","), ""][:2]
    x, w = operands
    weight = _const(module, w)
    if weight is None or weight.dim() != 2 or len(right) != 2 or "." in right or not left:
        return x, None, None
    inner = left[-1]
    if right[1] == inner and out.strip() == left[:-1] + right[0]:
        return x, weight, None
    if right[0] == inner and out.strip() == left[:-1] + right[1]:
        return x, weight.t(), None
    return x, None, None


def _contraction(node: torch.fx.Node, upper: dict[str, int]) -> int:
    """The length of a product's contracted dim (its upper bound where it is symbolic)."""
    size = node.args[0].meta["val"].shape[-1]
    if isinstance(size, int):  # never int() a SymInt: that guards, specialising the dim
        return size
    bounds = [v for v in upper.values() if v]
    return max(bounds) if bounds else 2**16


def plan_inputs(
    gpu_stages: list[Any],
    masked: dict[str, Any],
    spec: ExactSpec,
    amax: dict[str, float],
    upper: dict[str, int],
) -> None:
    """Choose each masked value's ring, limit and fractional bits from all its GPU consumers."""
    needs: dict[str, list[tuple[str, int]]] = {name: [] for name in masked}
    row_norms: dict[str, list[float]] = {name: [] for name in masked}
    rows_ok = {name: isinstance(masked[name][0][-1], int) for name in masked}
    readers: dict[str, list[tuple[Any, torch.fx.Node]]] = {}  # value -> (stage, placeholder)
    for stage in gpu_stages:
        for ph in stage.module.graph.find_nodes(op="placeholder"):
            readers.setdefault(ph.name, []).append((stage, ph))
    # every GPU use of each masked value, following it through later GPU stages unmasked
    work = [(name, stage, ph) for name in masked for stage, ph in readers.get(name, [])]
    seen: set[tuple[str, str, str]] = set()
    while work:
        origin, stage, ph = work.pop()
        if (origin, stage.name, ph.name) in seen:
            continue
        seen.add((origin, stage.name, ph.name))
        module = stage.module
        for user, operand in _trace(ph):
            if user.op == "output":
                rows_ok[origin] = False
                for value, node in zip(stage.outputs, user.args[0], strict=True):
                    if node is operand:
                        work.extend((origin, s, p) for s, p in readers.get(value, []))
                continue
            name = op_name(user)
            x, weight, _ = (
                _weight_of(module, user)
                if is_weight_linear(name) or name in ("einsum", "bmm")
                else (None, None, None)
            )
            linear = weight is not None and x is operand
            # row scaling: read by linear layers only, directly, whose results leave
            rows_ok[origin] &= (
                linear and operand is ph and all(u.op == "output" for u in user.users)
            )
            if linear:
                q, _ = spec.weights.setdefault(user.name, quantise_weight(weight))
                if weight.device.type == "meta":  # no values: plan for |w_q| = max
                    top, fan_in = weight_max(int(q.shape[1])), int(q.shape[1])
                    l1, l2 = top * fan_in, top * fan_in**0.5
                else:
                    q64 = q.to(torch.int64)
                    l1, l2 = int(q64.abs().sum(1).max()), float(q64.pow(2).sum(1).max()) ** 0.5
                needs[origin].append(("linear", l1))
                row_norms[origin].append(l2)
            elif props(name).bilinear:
                needs[origin].append(("product", _contraction(user, upper)))
    for name, uses in needs.items():
        if rows_ok[name] and row_norms[name]:
            # Cauchy-Schwarz: |w . q| <= ||w|| ||q|| <= 2**30 for every row of every layer
            spec.ring[name] = "int32"
            spec.row_limit[name] = int(LINEAR_BOUND // max(max(row_norms[name]), 1.0))
            continue
        products = [k for kind, k in uses if kind == "product"]
        norms = [k for kind, k in uses if kind == "linear"]
        if products:
            limit = math.isqrt(PRODUCT_BOUND // max(products))
            ring = "int64"
        else:
            limit = LINEAR_BOUND
            ring = "int32"
        if norms:
            limit = min(limit, LINEAR_BOUND // max(max(norms), 1))
        top = amax.get(name, DEFAULT_AMAX) * 2**MARGIN_BITS
        bits = math.floor(math.log2(limit / top)) if top > 0 else MAX_FRAC_BITS
        spec.ring[name] = ring
        spec.limit[name] = int(limit)
        spec.frac_bits[name] = max(0, min(bits, MAX_FRAC_BITS))


def to_exact(stage: Any, masked_inputs: list[str], spec: ExactSpec) -> torch.fx.GraphModule:
    """The stage with masked values carried as ring residues (see the module docstring)."""
    module: torch.fx.GraphModule = stage.module
    graph = torch.fx.Graph()
    env: dict[str, Any] = {}
    scale: dict[str, _Scale] = {}
    attrs: dict[str, torch.Tensor] = {}
    ring: dict[str, str] = {}

    def refuse(node: torch.fx.Node, why: str) -> ExactRefusal:
        return ExactRefusal(
            node.name,
            f"masking='exact': GPU stage {stage.name} runs {node.name} ({op_name(node)}) on a "
            f"masked value, and {why}; exact masking supports linear layers, bias adds, shape "
            "ops and products of two masked activations on the GPU. Pin its label to the "
            "enclave, or opt in to masking='additive' (float masks, which leak)",
        )

    def new_attr(prefix: str, tensor: torch.Tensor) -> torch.fx.Node:
        name = f"_exact_{prefix}"
        attrs[name] = tensor
        node = graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    def emit(node: torch.fx.Node, target: Any, args: tuple[Any, ...]) -> torch.fx.Node:
        out = graph.create_node("call_function", target, args, name=node.name)
        out.meta = dict(node.meta)
        env[node.name] = out
        return out

    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = graph.placeholder(node.name)
            env[node.name].meta = dict(node.meta)
            if node.name in masked_inputs:
                if node.name in spec.row_limit:  # row-scaled: one more column, the exponent
                    val = node.meta["val"]
                    env[node.name].meta["val"] = fake_like(val, torch.int32, wider=1)
                    scale[node.name] = _Scale(0, None, spec.row_limit[node.name], rows=True)
                elif node.name in spec.frac_bits:  # masked by the enclave
                    bits, limit = spec.frac_bits[node.name], spec.limit[node.name]
                    scale[node.name] = _Scale(bits, None, limit)
                else:  # a masked result of an earlier GPU stage
                    scale[node.name] = spec.scales[node.name]
                ring[node.name] = spec.ring[node.name]
            continue
        if node.op == "get_attr":
            env[node.name] = graph.get_attr(node.target)
            env[node.name].meta = dict(node.meta)
            attrs[node.target] = operator.attrgetter(node.target)(module)
            continue
        if node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], lambda a: env[a.name]))
            continue
        varying = [a for a in node.all_input_nodes if a.name in scale]
        if (
            not varying
            or not isinstance(node.meta.get("val"), torch.Tensor)
            or props(op_name(node)).factory
        ):
            # sizes are public: the same for a value and its masked residues (a factory such
            # as new_empty reads only its operand's shape)
            env[node.name] = graph.node_copy(node, lambda a: env[a.name])
            continue
        name = op_name(node)
        first = node.args[0] if node.args else None
        if any(scale[a.name].rows for a in varying) and node.name not in spec.weights:
            raise refuse(node, "a row-scaled value may only feed linear layers")
        if name in _SHAPE_ONLY or (
            name == "_to_copy" and node.kwargs.get("dtype") in (None, *_FLOATS)
        ):
            if varying != [first]:
                raise refuse(node, "a shape op may take only one masked operand")
            src = scale[first.name]
            if src.channel is not None and not _keeps_last_dim(node, name):
                raise refuse(node, "it moves the channel dim of a per-channel-scaled result")
            if name == "_to_copy":  # residues have no float dtype: keep the node as an alias
                emit(node, torch.ops.aten.alias.default, (env[first.name],))
            else:
                env[node.name] = graph.node_copy(node, lambda a: env[a.name])
            scale[node.name], ring[node.name] = src, ring[first.name]
            continue
        if node.name in spec.weights:  # a weight-linear layer, however it is spelled
            x, weight, bias = _weight_of(module, node)
            if weight is None or weight.dim() != 2 or x.name not in scale:
                raise refuse(node, "its weight is not a constant matrix")
            src = scale[x.name]
            if src.channel is not None or ring[x.name] != "int32":
                raise refuse(node, "its input already went through a weight product")
            w_q, channel = spec.weights[node.name]
            out_scale = _Scale(src.frac_bits, channel, LINEAR_BOUND, rows=src.rows)
            b_node = None
            if src.rows:  # the enclave adds the bias after unmasking: it has no fixed scale
                if bias is not None:
                    b = _const(module, bias)
                    if b is None:
                        raise refuse(node, "its bias is not a constant")
                    spec.bias[node.name] = b.detach().clone()
                w_node = new_attr(f"{node.name}_weight", w_q)
                out = emit(node, OPS.ring_linear.default, (env[x.name], w_node, None, True))
                out.meta["val"] = fake_like(node.meta["val"], torch.int32, wider=1)
                scale[node.name], ring[node.name] = out_scale, "int32"
                continue
            if bias is not None:
                b = _const(module, bias)
                if b is None:
                    raise refuse(node, "its bias is not a constant")
                b_q = quantize(b.detach() * channel, src.frac_bits)
                if b_q.numel() and int(b_q.abs().max()) >= LINEAR_BOUND:
                    raise refuse(node, f"its bias at 2**{src.frac_bits} exceeds 2**30")
                b_node = new_attr(f"{node.name}_bias", b_q.to(torch.int32))
                out_scale.bound += int(b_q.abs().max()) if b_q.numel() else 0
            w_node = new_attr(f"{node.name}_weight", w_q)
            emit(node, OPS.ring_linear.default, (env[x.name], w_node, b_node))
            scale[node.name], ring[node.name] = out_scale, "int32"
            continue
        if name == "mul" and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
            # a constant factor is folded into the scale: the integers do not change
            src = scale[first.name]
            env[node.name] = env[first.name]
            scale[node.name] = dataclasses.replace(src, factor=src.factor * float(node.args[1]))
            ring[node.name] = ring[first.name]
            continue
        if name in ("matmul", "bmm") and len(varying) == 2:
            a, b = node.args[0], node.args[1]
            sa, sb = scale[a.name], scale[b.name]
            if (
                sa.channel is not None
                or sb.channel is not None
                or ring[a.name] != "int64"
                or (ring[b.name] != "int64")
            ):
                raise refuse(node, "a product operand already went through a weight product")
            emit(node, OPS.ring_matmul.default, (env[a.name], env[b.name]))
            k = int(node.args[0].meta["val"].shape[-1]) if _static(node.args[0]) else 2**16
            scale[node.name] = _Scale(
                sa.frac_bits + sb.frac_bits, None, sa.bound * sb.bound * k, sa.factor * sb.factor
            )
            ring[node.name] = "int64"
            continue
        if name == "add" and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2:
            a, b = node.args
            if isinstance(b, torch.fx.Node) and b.name in scale and a.name in scale:
                if not scale[a.name].same(scale[b.name]) or ring[a.name] != ring[b.name]:
                    raise refuse(node, "its operands have different fixed-point scales")
                other, extra, src = env[b.name], scale[b.name].bound, scale[a.name]
                r = ring[a.name]
            else:
                masked_arg, c = (a, b) if a.name in scale else (b, a)
                tensor = _const(module, c)
                if tensor is None:
                    raise refuse(node, "it adds a value that is neither masked nor a constant")
                src, r = scale[masked_arg.name], ring[masked_arg.name]
                c_q = quantize(tensor.detach().to(torch.float64) / src.inverse(), 0)
                extra = int(c_q.abs().max()) if c_q.numel() else 0
                other = new_attr(f"{node.name}_const", c_q.to(getattr(torch, r)))
                a = masked_arg
            bound = src.bound + extra
            if bound >= 2 ** (31 if r == "int32" else 63):
                raise refuse(node, "its sum could wrap the ring")
            emit(node, torch.ops.aten.add.Tensor, (env[a.name], other))
            scale[node.name] = _Scale(src.frac_bits, src.channel, bound)
            ring[node.name] = r
            continue
        raise refuse(node, "it has no exact form in the ring")
    graph.eliminate_dead_code()  # folded weight views no ring op reads any more
    for name in scale:  # residues are integers, whatever float dtype the value had
        node = env[name]
        if scale[name].rows:  # typed (and widened) where created
            continue
        if isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor):
            node.meta = {
                **node.meta,
                "val": fake_like(node.meta["val"], getattr(torch, ring[name])),
            }
    for out in stage.outputs:
        if out in scale:
            spec.scales[out] = scale[out]
            spec.ring[out] = ring[out]
            spec.inv_scale[out] = scale[out].inverse()
            spec.output_bits[out] = scale[out].frac_bits
            if scale[out].rows:
                spec.row_outputs.append(out)
    graph.lint()
    return torch.fx.GraphModule(attrs, graph, class_name=f"{stage.name}_exact")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _static(node: torch.fx.Node) -> bool:
    return isinstance(node.meta["val"].shape[-1], int)


def _keeps_last_dim(node: torch.fx.Node, name: str) -> bool:
    if name not in _KEEPS_LAST:
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if src.dim() == 0 or out.dim() == 0 or str(src.shape[-1]) != str(out.shape[-1]):
        return False
    if name in ("slice", "select", "narrow"):
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim not in (-1, src.dim() - 1)
    return True


def quantised_reference(split: Any) -> Any:
    """The *unsplit* program with its GPU layers computed in fixed point, without masks.

    An independent executor for checking exact masking: it walks the source graph node by node
    (not the stages), quantises a value where it enters the GPU region (clamped as the enclave
    clamps it), multiplies by the same int8 weights in plain int64 (no ring, no pads) and
    dequantises where a value leaves the region. The masked split program must equal it bit
    for bit. Returns a callable taking the program's inputs.
    """
    import torch.utils._pytree as pytree

    from partitioner.ops import dequantize, dequantize_rows, quantize_rows

    spec: ExactSpec = split.protection.exact
    source = split.source
    weights = model_weights(source)
    state = {**source.state_dict, **source.constants}
    region = {n for stage in split.stages if stage.side == "gpu" for n in stage.nodes}

    def run(*args: Any, **kwargs: Any) -> Any:
        env: dict[str, Any] = split.signature.bind(args, dict(kwargs))
        ints: dict[str, tuple[torch.Tensor, _Scale]] = {}
        exponents: dict[str, torch.Tensor] = {}  # row-scaled values: each row's exponent

        def plain(name: str) -> Any:
            if name in ints:
                q, sc = ints[name]
                if sc.rows:
                    return dequantize_rows(q, exponents[name], sc.inverse(), spec.bias.get(name))
                return dequantize(q, sc.inverse())
            return env[name]

        def fixed(node: torch.fx.Node) -> tuple[torch.Tensor, _Scale] | None:
            if node.name in ints:
                return ints[node.name]
            if node.name in spec.row_limit:
                q, exponents[node.name] = quantize_rows(env[node.name], spec.row_limit[node.name])
                return q, _Scale(0, None, 0, rows=True)
            if node.name in spec.frac_bits:
                bits, limit = spec.frac_bits[node.name], spec.limit[node.name]
                return quantize(env[node.name], bits, limit), _Scale(bits, None, limit)
            return None

        for node in source.graph.nodes:
            if node.op == "placeholder":
                if node.name in weights:
                    env[node.name] = state[weights[node.name]]
                continue
            if node.op == "output":
                flat = [plain(a.name) if isinstance(a, torch.fx.Node) else a for a in node.args[0]]
                return pytree.tree_unflatten(flat, split.signature.out_spec)
            factory = node.op == "call_function" and props(op_name(node)).factory
            operands = {} if factory else {a.name: fixed(a) for a in node.all_input_nodes}
            if node.name not in region or not any(v is not None for v in operands.values()):
                env[node.name] = node.target(
                    *torch.fx.node.map_arg(node.args, lambda a: plain(a.name)),
                    **torch.fx.node.map_arg(node.kwargs, lambda a: plain(a.name)),
                )
                continue
            name = op_name(node)
            if node.name in spec.weights:
                x, _, bias = _weight_of_source(node)
                q, sc = operands[x.name]
                w_q, channel = spec.weights[node.name]
                out = torch.matmul(q, w_q.to(torch.int64).t())
                if sc.rows:
                    exponents[node.name] = exponents[x.name]
                elif bias is not None:
                    out = out + quantize(env[bias.name].detach() * channel, sc.frac_bits)
                ints[node.name] = (out, _Scale(sc.frac_bits, channel, LINEAR_BOUND, rows=sc.rows))
            elif name in ("matmul", "bmm"):
                (qa, sa), (qb, sb) = operands[node.args[0].name], operands[node.args[1].name]
                product = _Scale(sa.frac_bits + sb.frac_bits, None, 0, sa.factor * sb.factor)
                ints[node.name] = (torch.matmul(qa, qb), product)
            elif name == "mul":
                q, sc = operands[node.args[0].name]
                ints[node.name] = (q, dataclasses.replace(sc, factor=sc.factor * node.args[1]))
            elif name == "add":
                a, b = node.args[0], node.args[1]
                qa = operands.get(a.name) if isinstance(a, torch.fx.Node) else None
                qb = operands.get(b.name) if isinstance(b, torch.fx.Node) else None
                if qa is None:
                    (a, qa), (b, qb) = (b, qb), (a, qa)
                other = (
                    qb[0]
                    if qb is not None
                    else quantize(plain(b.name).to(torch.float64) / qa[1].inverse(), 0)
                )
                ints[node.name] = (qa[0] + other, qa[1])
            elif name == "_to_copy":
                ints[node.name] = operands[node.args[0].name]
            else:  # a shape op: the same op on the integers
                q, sc = operands[node.args[0].name]
                rest = torch.fx.node.map_arg(node.args[1:], lambda a: plain(a.name))
                kwargs_ = torch.fx.node.map_arg(node.kwargs, lambda a: plain(a.name))
                ints[node.name] = (node.target(q, *rest, **kwargs_), sc)
        raise AssertionError("the source graph has no output node")

    return run


def _weight_of_source(node: torch.fx.Node) -> tuple[Any, Any, Any]:
    if op_name(node) == "einsum":
        return node.args[1][0], node.args[1][1], None
    if op_name(node) == "addmm":
        return node.args[1], node.args[2], node.args[0]
    bias = node.args[2] if op_name(node) == "linear" and len(node.args) > 2 else None
    return node.args[0], node.args[1], bias
