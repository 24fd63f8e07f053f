"""The ``teesplit::`` operators that protection inserts into stage graphs.

They are ``torch.library`` custom ops with fake (meta) kernels, so a stage that contains them
can be exported, traced and shape-propagated like any aten graph, and the runtime (issue #4)
can find them by name. Importing this module registers them.

* ``mask(x, r) = x + r`` and ``unmask(y, c) = y - c``: additive float masking.
* Exact masking works in the rings ``Z_{2^32}`` (int32 tensors) and ``Z_{2^64}`` (int64): a
  signed integer tensor *is* its residue's signed representative, and torch's integer add,
  sub and mul wrap, so ring addition is plain ``+``; narrowing int64 to int32 keeps the
  residue mod ``2**32`` (``tests/test_exact_attacks.py`` checks both on this build).
* ``ring_mask(x, r, frac_bits, limit)``: ``clamp(round(x * 2**frac_bits), ±limit) + r``.
* ``ring_unmask(y, c, inv_scale)``: ``(y - c) * inv_scale`` as float32.
* ``ring_linear(u, w, b)``: ``u @ w.T + b`` in the ring, int8 weights, at BLAS speed.
* ``ring_matmul(a, b)``: ``a @ b`` in ``Z_{2^64}`` (products of two masked activations).
* ``rnm(ids, candidates, scores, keep, noise)``: Report-Noisy-Max over each token's candidate
  set (``passes/rnm.py`` explains the mechanism and its privacy claim).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import Tensor

from partitioner.errors import InputError
from partitioner.op_table import op_name


class _Operator:
    """A ``teesplit::`` operator: a schema, one Python kernel for every device, and a fake
    kernel for tracing. Registered through ``torch.library.Library`` rather than
    ``torch.library.custom_op``: the enclave calls these ops hundreds of times per request on
    small tensors, and ``custom_op``'s autograd and dispatch wrappers cost 15-20 µs a call
    where a ``Library`` kernel costs 4 (measured on the development machine)."""

    def __init__(self, name: str, schema: str, fn: Any) -> None:
        _LIB.define(f"{name}{schema}")
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self.name = name
        self.fn = fn
        _KERNELS[name] = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def register_fake(self, fake: Any) -> Any:
        torch.library.register_fake(f"teesplit::{self.name}", fake, lib=_LIB)
        return fake


_LIB = torch.library.Library("teesplit", "DEF")
_KERNELS: dict[str, Any] = {}  # op name -> its Python kernel


def direct_calls(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``module`` whose ``teesplit::`` calls go straight to their Python kernels.

    The dispatcher's round trip (about 25 µs of a 1x576 mask's 60) is pure cost where the
    enclave only runs the graph, hundreds of calls a request; the registered ops stay what
    export, ONNX and the audit see. ``module`` (what a bundle stores) is not changed."""
    direct = with_attrs(module, lambda _, t: t)
    for node in direct.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace == "teesplit":
                node.target = _KERNELS[node.target._schema.name.split("::")[-1]]
    direct.recompile()
    return direct


def _operator(name: str, schema: str) -> Any:
    return lambda fn: _Operator(name, schema, fn)


@_operator("mask", "(Tensor x, Tensor r) -> Tensor")
def mask(x: Tensor, r: Tensor) -> Tensor:
    return x + r


@mask.register_fake
def _(x: Tensor, r: Tensor) -> Tensor:
    return torch.empty_like(x)


@_operator("unmask", "(Tensor y, Tensor c) -> Tensor")
def unmask(y: Tensor, c: Tensor) -> Tensor:
    return y - c


@unmask.register_fake
def _(y: Tensor, c: Tensor) -> Tensor:
    return torch.empty_like(y)


RING_DTYPES = (torch.int32, torch.int64)  # Z_{2^32} and Z_{2^64}: int add/sub/mul wrap


def ring_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.int32 else 64


def _finite(x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(
            "a value to be masked holds NaN or inf: fixed point cannot carry it (refused, "
            "rather than sending the GPU a residue that stands for nothing)"
        )


def quantize(x: Tensor, frac_bits: int, limit: int | None = None) -> Tensor:
    """Fixed point: ``round(x * 2**frac_bits)`` as int64 (the scaling is exact in float64),
    clamped to ``[-limit, limit]`` when a limit is given. NaN or inf: :class:`InputError`."""
    _finite(x)
    q = torch.round(x.to(torch.float64) * float(2**frac_bits))
    if limit is not None:
        q = q.clamp(-float(limit), float(limit))
    return q.to(torch.int64)


def dequantize(q: Tensor, inv_scale: Tensor | float) -> Tensor:
    """Integers back to float32: ``q * inv_scale`` in float64, then rounded once to float32."""
    return (q.to(torch.float64) * inv_scale).to(torch.float32)


def wrap(q: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 integers to their residues in the ring of ``dtype``, as its signed representative."""
    if dtype == torch.int64:
        return q
    return ((q + 2**31) & (2**32 - 1)).sub_(2**31).to(torch.int32)


@_operator("ring_mask", "(Tensor x, Tensor r, int frac_bits, int limit) -> Tensor")
def ring_mask(x: Tensor, r: Tensor, frac_bits: int, limit: int) -> Tensor:
    """``clamp(round(x * 2**frac_bits)) + r`` in the ring of ``r``'s dtype."""
    return wrap(quantize(x, frac_bits, limit) + r.to(torch.int64), r.dtype)


@ring_mask.register_fake
def _(x: Tensor, r: Tensor, frac_bits: int, limit: int) -> Tensor:
    return torch.empty_like(r)


@_operator("ring_unmask", "(Tensor y, Tensor c, Tensor inv_scale) -> Tensor")
def ring_unmask(y: Tensor, c: Tensor, inv_scale: Tensor) -> Tensor:
    """``(y - c)`` in the ring (its signed representative is the exact integer result), times
    the value's inverse fixed-point scale (a scalar or one per output channel)."""
    return dequantize(y - c, inv_scale)


@ring_unmask.register_fake
def _(y: Tensor, c: Tensor, inv_scale: Tensor) -> Tensor:
    return torch.empty_like(y, dtype=torch.float32)


MAX_ROW_BITS = 40  # a row of zeros (or tiny values) gets at most this many fractional bits


def quantize_rows(x: Tensor, norm_limit: int) -> tuple[Tensor, Tensor]:
    """Each row (last dim) in fixed point with its own exponent: ``q_r = round(x_r * 2**e_r)``
    with ``e_r`` the largest integer (at most ``MAX_ROW_BITS``; no lower bound, so a huge row
    gets a very negative exponent rather than integers beyond the limit) such that
    ``2**e_r * ||x_r|| <= norm_limit - sqrt(n)/2 - 1``. Rounding moves each entry by at most 1/2,
    so ``||q_r||_2 <= norm_limit``; the relative margin ``_NORM_SLACK`` covers float64's error in
    computing the norm (at most ``n`` units in the last place). Returns ``(q, e)`` as int64."""
    q, e = _quantize_rows(x, norm_limit)
    return torch.from_numpy(q.astype(np.int64)), torch.from_numpy(e.astype(np.int64))


def _quantize_rows(x: Tensor, norm_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_rows` in numpy float64 (exact integers), in place on one float64 copy:
    the enclave calls it per layer on small tensors, where numpy's per-call cost is a fraction
    of torch's."""
    a = x.detach().cpu().numpy().astype(np.float64)
    n = a.shape[-1]
    slack = (norm_limit - 0.5 * n**0.5 - 1.0) * _NORM_SLACK
    top = np.abs(a).max(axis=-1) if a.size else np.zeros(a.shape[:-1])
    if not np.isfinite(top).all():  # max propagates NaN
        _finite(x)
    if a.size and top.max() > _DIRECT_NORM:  # the norm could overflow: scale by the row's max
        safe = np.where(top > 0, top, 1.0)
        unit = a / safe[..., None]
        norm = np.sqrt(np.einsum("...i,...i->...", unit, unit)) * safe
    else:
        norm = np.sqrt(np.einsum("...i,...i->...", a, a))
    if slack <= 0 or not np.isfinite(norm).all():  # a limit below the rounding, or a row
        # whose norm overflows float64: no exponent carries it (refused, not garbage)
        raise InputError("row quantisation: no exponent fits this row under its norm limit")
    with np.errstate(divide="ignore"):  # a zero row: +inf, clipped
        e = np.minimum(np.floor(np.log2(slack / norm)), MAX_ROW_BITS)
    a *= np.exp2(e)[..., None]
    q = np.rint(a, out=a)
    if (np.einsum("...i,...i->...", q, q) > float(norm_limit) ** 2).any():  # never, by the bound
        raise InputError("row quantisation exceeded its norm limit (refused: it could wrap)")
    return q, e


_DIRECT_NORM = 1e150  # rows whose max is below this have a sum of squares far from overflow
_NORM_SLACK = 1.0 - 1e-9


def dequantize_rows(q: Tensor, e: Tensor, inv_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``q_r * 2**-e_r * inv_scale (+ bias)`` in float64, rounded once to float32."""
    return torch.from_numpy(_dequantize_rows(q.numpy(), e.numpy(), inv_scale.numpy(), bias))


def _dequantize_rows(
    q: np.ndarray, e: np.ndarray, inv_scale: np.ndarray, bias: Tensor | None
) -> np.ndarray:
    out = q.astype(np.float64)
    out *= np.exp2(-e.astype(np.float64))[..., None]
    out *= inv_scale
    if bias is not None:
        out += bias.numpy()
    return out.astype(np.float32)


@_operator("ring_mask_rows", "(Tensor x, Tensor r, int norm_limit) -> Tensor")
def ring_mask_rows(x: Tensor, r: Tensor, norm_limit: int) -> Tensor:
    """Row-scaled masking in ``Z_{2^32}``: ``[q_r, e_r] + r`` with :func:`quantize_rows`, the
    row's exponent in an extra last column, masked like the values (the GPU sees neither).
    ``|q| <= norm_limit < 2**31``, so the int32 cast is exact and the int32 add wraps."""
    q, e = _quantize_rows(x, norm_limit)
    out = np.empty((*q.shape[:-1], q.shape[-1] + 1), dtype=np.int32)
    out[..., :-1] = q
    out[..., -1] = e
    out += r.numpy()  # numpy int32 addition wraps
    return torch.from_numpy(out)


@ring_mask_rows.register_fake
def _(x: Tensor, r: Tensor, norm_limit: int) -> Tensor:
    return torch.empty_like(r)


@_operator("ring_unmask_rows", "(Tensor y, Tensor c, Tensor inv_scale, Tensor? bias) -> Tensor")
def ring_unmask_rows(y: Tensor, c: Tensor, inv_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The inverse of row-scaled masking after a linear layer: ``y - c`` holds ``W q_r`` and,
    in its last column, ``e_r``."""
    d = y.numpy() - c.numpy()  # int32: wraps, leaving the exact integers
    scale = inv_scale.numpy().astype(np.float64, copy=False)
    return torch.from_numpy(_dequantize_rows(d[..., :-1], d[..., -1], scale, bias))


@ring_unmask_rows.register_fake
def _(y: Tensor, c: Tensor, inv_scale: Tensor, bias: Tensor | None) -> Tensor:
    return y.new_empty((*y.shape[:-1], y.shape[-1] - 1), dtype=torch.float32)


_LIMB = 16  # float64 limb products stay exact: 2**16 * 2**16 * fan-in < 2**53 for fan-in < 2**21


def ring_limbs(u: Tensor, count: int) -> list[Tensor]:
    """The low ``count`` 16-bit limbs of ``u``'s two's-complement bit pattern, as float64."""
    wide = u.to(torch.int64)
    return [((wide >> (_LIMB * k)) & (2**_LIMB - 1)).to(torch.float64) for k in range(count)]


def ring_recombine(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``sum(parts[k] * 2**(16 k))`` in the ring of ``dtype`` (exact integers in float64 in)."""
    total = torch.zeros(parts[0].shape, dtype=torch.int64, device=parts[0].device)
    for k, part in enumerate(parts):
        total = total + part.to(torch.int64) * (1 << (_LIMB * k))  # int64 products wrap mod 2**64
    return wrap(total, dtype)


def _balanced_bytes(u: Tensor, count: int = 4) -> list[Tensor]:
    """Integers as ``count`` signed base-256 digits (int8), ``u = sum d_k 256**k``
    (mod ``2**(8 count)``; exactly for int16 weights with two digits)."""
    t = u.to(torch.int64)
    digits = []
    for _ in range(count):
        d = ((t + 128) & 255) - 128
        digits.append(d.to(torch.int8))
        t = (t - d) >> 8
    return digits


def _int8_linear_cuda(u: Tensor, w: Tensor) -> Tensor | None:
    """``u @ w.T mod 2**32`` as int8 GEMMs with int32 accumulation (``torch._int_mm``): four
    digits of ``u`` times one (int8) or two (int16) digits of ``w``, each exact while
    ``128 * 128 * fan_in < 2**31``; None where ``_int_mm`` takes no such shape."""
    rows = u.reshape(-1, u.shape[-1])
    m, k = rows.shape
    n = w.shape[0]
    if w.dtype not in (torch.int8, torch.int16) or m <= 16 or k % 8 or n % 8 or k >= 2**17:
        return None
    w_digits = [w] if w.dtype == torch.int8 else _balanced_bytes(w, 2)
    out = torch.zeros((m, n), dtype=torch.int32, device=u.device)
    for i, digit in enumerate(_balanced_bytes(rows)):
        for j, w_digit in enumerate(w_digits):
            if i + j < 4:  # higher digits vanish mod 2**32
                part = torch._int_mm(digit.contiguous(), w_digit.contiguous().t())
                out = out + part * (1 << (8 * (i + j)))
    return out.reshape(*u.shape[:-1], n)


def prepare_ring_weights(module: torch.nn.Module, device: torch.device | str = "cpu") -> Any:
    """``module`` on ``device`` with each ``ring_linear``'s integer weights converted once to
    the form that device multiplies fastest: float64 (one exact GEMM, no conversion per call)
    on a CPU and on GPUs with full-rate FP64 (compute capability 8.0 and 9.x: A100, H100,
    H200; measured on an H200, ``benchmarks/results/cuda_ring-h200.md``: 1.2-1.7x a float32
    GEMM, where int8 ``_int_mm`` digits took 9-20x); int8/int16 on other GPUs, whose FP64 runs
    at a fraction of the rate (``torch._int_mm``). Returns a new GraphModule; ``module``
    (whose integer weights are what a bundle stores) is not changed."""
    device = torch.device(device)
    if not isinstance(module, torch.fx.GraphModule):
        return module.to(device) if isinstance(module, torch.nn.Module) else module
    weights = {
        node.args[1].target
        for node in module.graph.find_nodes(op="call_function", target=OPS.ring_linear.default)
    }
    if not weights or (device.type == "cuda" and not _fast_fp64(device)):
        # a copy: ``module.to`` would move parameters it shares with other stages (a tied
        # embedding the enclave's stage reads too) along with it
        copy = with_attrs(module, lambda _, t: t.to(device))
    else:
        copy = with_attrs(
            module, lambda target, t: (t.to(torch.float64) if target in weights else t).to(device)
        )
    return _on_device(copy, device)


def _on_device(module: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """``module`` with every device its graph names made ``device`` (export records the
    capture's ``cpu`` on the tensors a graph creates, positions and masks, on ``.to`` calls
    and in its metadata asserts), so that a stage captured on the CPU runs on a GPU."""
    if device.type == "cpu":
        return module

    def moved(value: Any) -> Any:
        return device if isinstance(value, torch.device) else value

    for node in module.graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, moved)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, moved)
    module.recompile()
    return module


def with_attrs(module: torch.fx.GraphModule, convert: Any) -> torch.fx.GraphModule:
    """A copy of ``module``'s graph over its attributes passed through
    ``convert(target, tensor)`` (a dtype, a device); ``module`` is not changed."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    root = torch.nn.Module()
    for node in graph.find_nodes(op="get_attr"):
        value = operator.attrgetter(node.target)(module)
        owner = root
        *path, leaf = node.target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, convert(node.target, value.detach()), persistent=False)
        else:
            setattr(owner, leaf, value)
    return torch.fx.GraphModule(root, graph)


def _fast_fp64(device: torch.device) -> bool:
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) == (8, 0) or major == 9


@_operator("ring_linear", "(Tensor u, Tensor w, Tensor? b, bool carry=False) -> Tensor")
def ring_linear(u: Tensor, w: Tensor, b: Tensor | None, carry: bool = False) -> Tensor:
    """``u @ w.T + b`` in the ring of ``u``'s dtype, for integer weights ``w`` (int8/int16).

    int32 (``Z_{2^32}``): on the CPU one float64 GEMM, exact because every partial sum is an
    integer below ``2**31 * max|w| * fan_in <= 2**53`` (the exact pass sizes ``max|w|`` per
    layer so); on CUDA int8 GEMMs. int64 (``Z_{2^64}``): four float64 GEMMs over 16-bit limbs.
    ``carry``: the last column of ``u`` is a row's masked scale exponent
    (:func:`ring_mask_rows`), passed through to the last column of the result.
    """
    if u.dtype == torch.int32 and u.device.type == "cpu":
        return _ring_linear32_cpu(u, w, b, carry)
    if carry:
        body = ring_linear(u[..., :-1], w, b)
        return torch.cat([body, u[..., -1:]], dim=-1)
    if u.dtype == torch.int32:
        out = _int8_linear_cuda(u, w)
        if out is None:  # w may come prepared as float64 (prepare_ring_weights)
            prod = torch.matmul(u.to(torch.float64), w.to(torch.float64).t())
            out = wrap(prod.to(torch.int64), torch.int32)
        if b is not None:
            out = out + b
        return out
    wt = w.to(torch.float64).t()
    out = ring_recombine([torch.matmul(limb, wt) for limb in ring_limbs(u, 4)], torch.int64)
    return out if b is None else out + b


def _ring_linear32_cpu(u: Tensor, w: Tensor, b: Tensor | None, carry: bool) -> Tensor:
    """:func:`ring_linear` in ``Z_{2^32}`` on the CPU with as few passes over the result as
    exactness allows: the GEMM's float64 integers to int64 (exact), the bias added there (no
    int64 sum can overflow), then one narrowing copy into the int32 result, which keeps the
    low 32 bits: the residue mod ``2**32`` (``tests/test_exact_attacks.py`` checks this build
    narrows so). The pool computes every layer's correction this way, ``W·[r_1 … r_B]``, and
    the four wrapping passes after the GEMM were about a quarter of its time."""
    n = w.shape[0]
    body = u[..., :-1] if carry else u
    prod = torch.matmul(body.to(torch.float64), w.to(torch.float64).t()).to(torch.int64)
    if b is not None:
        prod += b
    out = torch.empty((*u.shape[:-1], n + int(carry)), dtype=torch.int32, device=u.device)
    if carry:
        out[..., :n] = prod
        out[..., n] = u[..., -1]
    else:
        out.copy_(prod)
    return out


@ring_linear.register_fake
def _(u: Tensor, w: Tensor, b: Tensor | None, carry: bool = False) -> Tensor:
    return u.new_empty((*u.shape[:-1], w.shape[0] + int(carry)))


def ring_layers(module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Per output of a GPU stage graph, its ``ring_linear`` node, when every output is a
    ``ring_linear`` of one of the stage's inputs: what a Freivalds check in the ring verifies
    (``enclave_runtime.integrity.RingCheck`` in the executor, ``partitioner.aot``'s check
    compiled into the enclave stage that unmasks the reply). Raises ``ValueError`` naming the
    first output that is not."""
    out_node = next(iter(module.graph.find_nodes(op="output")))
    layers = []
    for index, node in enumerate(out_node.args[0]):
        if not (
            isinstance(node, torch.fx.Node)
            and node.op == "call_function"
            and op_name(node) == "ring_linear"
            and node.args[0].op == "placeholder"
        ):
            raise ValueError(f"output {index} ({getattr(node, 'name', node)}) is not")
        layers.append(node)
    return layers


@_operator("ring_matmul", "(Tensor a, Tensor b) -> Tensor")
def ring_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in ``Z_{2^64}`` (int64 operands): ten float64 GEMMs over 16-bit limbs, the
    products of limbs ``i + j < 4`` (higher ones vanish mod 2**64); exact for contractions
    shorter than ``2**21``."""
    la, lb = ring_limbs(a, 4), ring_limbs(b, 4)
    parts = []
    for shift in range(4):
        # each limb product is exact in float64, their sum need not be: add them as int64
        terms = [torch.matmul(la[i], lb[shift - i]).to(torch.int64) for i in range(shift + 1)]
        parts.append(sum(terms[1:], terms[0]))
    total = parts[0]
    for shift in range(1, 4):
        total = total + parts[shift] * (1 << (_LIMB * shift))
    return total


@ring_matmul.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return torch.empty(
        (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]),
        dtype=torch.int64,
        device=a.device,
    )


@_operator(
    "rnm", "(Tensor ids, Tensor candidates, Tensor scores, Tensor keep, Tensor noise) -> Tensor"
)
def rnm(ids: Tensor, candidates: Tensor, scores: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    cand = candidates[ids]  # (..., K); padding slots hold -inf scores and are never chosen
    noisy = scores[ids].to(noise.dtype) + noise
    pick = cand.gather(-1, noisy.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(keep[ids], ids, pick)


@rnm.register_fake
def _(ids: Tensor, candidates: Tensor, scores: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    return torch.empty_like(ids)


OPS = torch.ops.teesplit
