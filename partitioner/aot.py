"""Enclave stages compiled ahead of time: each stage graph as one shared object (AOTInductor).

Why: run op by op, an enclave stage pays Python's and the dispatcher's cost per op, hundreds
of times a request, and that, not arithmetic, bounds what a split saves the enclave
(``benchmarks/ceiling.py``: 2.7x for a SmolLM2 decode step eager, 19x compiled). Compiled
ahead of time, the enclave loads measured machine code and never a compiler.

Pass: reads a split's enclave stage graphs; writes, per stage, a *lowered* graph (the
``teesplit::`` mask, unmask and RNM ops spelled in aten arithmetic, so Inductor fuses them
with the model's ops), compiles each distinct lowered graph once to a ``.so``, and returns
which library and which constants each stage runs with. Guarantees:

* **The same arithmetic.** Ring operations are exact integer arithmetic (``Z_{2^32}`` sums
  done in int64 and wrapped explicitly); fixed-point scaling is by powers of two. The
  compiled stage equals the eager one bit for bit wherever both do the same float operations
  in the same order; Inductor may sum a reduction (an RMSNorm's mean) in another order, so a
  float output can differ from eager in its last bit, exactly as two BLAS builds do.
  Masking stays exact: the enclave unmasks exactly what it masked.
* **The same refusals.** The eager kernels raise :class:`InputError` for a value that is not
  finite or whose fixed point would exceed its norm limit; a compiled stage cannot raise, so
  it returns one extra flag, false in those cases, and the runtime raises the same error.
* **The same checks, where they cost less.** A stage that unmasks the whole reply of the
  Freivalds-checked GPU stage right before it (:func:`fused_check`) makes that check itself,
  on the executor's secret vectors, before its own refusals, and works on zeros in place of
  a reply that fails it; the executor then skips its numpy check of that reply (~110 us of
  Python per reply on a SmolLM2 decode step, 121 replies a step). For requests of many rows
  (a prefill) numpy's products are cheaper than the library's: the executor checks those
  replies itself and tells the library, which then unmasks the reply without checking it
  again (:func:`gated_freivalds`).
* **Compiled once per structure.** Constants (a layer's norm weights, its fixed-point scales
  and limits) become inputs, so the 30 layers of a decoder share a handful of libraries.

A compiled stage carries a :class:`~partitioner.plan.CompiledLibrary`; the runtime half
(loading a library, calling it, checking the flag) is ``enclave_runtime.compiled``, which
imports nothing from here.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._inductor.cpu_vec_isa import pick_vec_isa

from partitioner.aot_compiler import VERSION as COMPILER_VERSION
from partitioner.aot_compiler import compile_exported
from partitioner.errors import ArtifactError
from partitioner.ops import _DIRECT_NORM, _NORM_SLACK, MAX_ROW_BITS, OPS, ring_layers
from partitioner.plan import CompiledLibrary

_HALF = 1 << 31
_LOW32 = (1 << 32) - 1


def _wrap32(v: torch.Tensor) -> torch.Tensor:
    """int64 integers to their residues in ``Z_{2^32}`` as int32 (signed representative): the
    narrowing conversion keeps the low 32 bits (vectorised, a shuffle; scalar, GCC's
    modular ``static_cast``), where masking the bits by hand took four int64 passes."""
    return v.to(torch.int32)


def _ring_diff(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``y - c`` in the ring of ``y``'s dtype, in that dtype (int32: the signed residue, which
    converts to float64 natively; an int64 one has no AVX2 conversion and is emulated)."""
    if y.dtype != torch.int32:
        return y - c
    return _wrap32(y.to(torch.int64) - c.to(torch.int64))


def _exp2_neg(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** -e`` in float64 for integers ``e``, built from its bits (exactly ``exp2``'s
    value for every ``e``: normal, subnormal, zero or inf). Inductor evaluates a row's
    factor once per vector of the row; replacing that libm ``exp2`` call alone made a
    replayed SmolLM2 prefill 1.11x faster."""
    k = -e.to(torch.int64)  # the power; |e| < 2**31, so no overflow
    normal = torch.clamp(k + 1023, 0, 2047) << 52  # 2047: inf; 0 only where tiny, below
    tiny = torch.where(k < -1074, 0, 1 << torch.clamp(k + 1074, 0, 51))  # subnormal or zero
    return torch.where(k < -1022, tiny, normal).view(torch.float64)


def _ring_sub(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``y - c`` in the ring of ``y``'s dtype, as int64 integers."""
    d = y.to(torch.int64) - c.to(torch.int64)
    return ((d + _HALF) & _LOW32) - _HALF if y.dtype == torch.int32 else d


def _to_ring(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _wrap32(v) if dtype == torch.int32 else v


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` in float64 for integers ``e`` in ``[-1022, 1023]`` (a normal power of
    two, exactly ``exp2``'s value), built from its bits; ``e`` outside is clamped into it.
    Inductor evaluates a row's factor once per vector of the row, and libm's ``exp2`` there
    was the largest cost of a compiled prefill mask (~0.25 of a 128 x 1536 mask's 0.5 ms)."""
    k = torch.clamp(e, -1022.0, 1023.0).to(torch.int32).to(torch.int64)
    return ((k + 1023) << 52).view(torch.float64)


def mask_rows(
    x: torch.Tensor, r: torch.Tensor, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``teesplit::ring_mask_rows`` in aten (``partitioner.ops._quantize_rows``' operations in
    its order; ``limit``, the norm limit, as a float64 scalar). Returns the masked rows and a
    flag: every value finite and every row within the limit."""
    if x.dtype in _NARROW:
        return _mask_narrow_rows(x, r, limit)
    slack = (limit - 0.5 * x.shape[-1] ** 0.5 - 1.0) * _NORM_SLACK  # float64, as eager's
    limit_sq = limit * limit  # exact: the limit is below 2**31
    a = x.to(torch.float64)
    top = a.abs().amax(-1)
    huge = (top > _DIRECT_NORM).any()  # as eager: one huge row scales every row by its max
    safe = torch.where(top > 0, top, 1.0)
    unit = a / safe[..., None]
    norm = torch.where(huge, torch.sqrt((unit * unit).sum(-1)) * safe, torch.sqrt((a * a).sum(-1)))
    e = torch.clamp_max(torch.floor(torch.log2(slack / norm)), float(MAX_ROW_BITS))
    q = torch.round(a * torch.exp2(e)[..., None])
    ok = (
        torch.isfinite(top).all()
        & torch.isfinite(norm).all()
        & (slack > 0)
        & ((q * q).sum(-1) <= limit_sq).all()
    )
    rows = torch.cat([q, e[..., None]], -1).to(torch.int64)
    return _wrap32(rows + r.to(torch.int64)), ok


# float types whose finite values are far below ``_DIRECT_NORM`` (float32's max is 3.4e38)
_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _mask_narrow_rows(
    x: torch.Tensor, r: torch.Tensor, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_rows` for a float32 (or narrower) ``x``, the same integers written in
    fewer passes (a 128 x 1536 mask: 0.23 ms compiled, against 0.50):

    * a finite value's square is far from float64's overflow, so the eager kernel never
      takes its scaled-norm path (``top > _DIRECT_NORM``), and ``norm`` is finite exactly
      when every value is: no row maximum, no division per element;
    * ``e >= log2(slack) - 145`` for any finite row (``|x| < 2**128``, rows under ``2**31``
      wide), so ``2**e`` is a normal power of two (:func:`_pow2`) for any slack above
      ``2**-870`` (an integer norm limit gives at least ~``1 / (4 sqrt(n))``); an exponent
      below ``-1022`` is refused rather than clamped;
    * ``q`` (``|q| <= limit < 2**31`` when the flag holds) and ``e`` go to int32 before the
      ring addition and the exponent's column is joined last, so that Inductor writes the
      masked rows in the same loop that rounds them, instead of a float64 copy first.
    """
    slack = (limit - 0.5 * x.shape[-1] ** 0.5 - 1.0) * _NORM_SLACK  # float64, as eager's
    a = x.to(torch.float64)
    norm = torch.sqrt((a * a).sum(-1))
    e = torch.clamp_max(torch.floor(torch.log2(slack / norm)), float(MAX_ROW_BITS))
    q = torch.round(a * _pow2(e)[..., None])
    ok = (
        torch.isfinite(norm).all()
        & (slack > 0)
        & (e >= -1022.0).all()
        & ((q * q).sum(-1) <= limit * limit).all()
    )

    def add(v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return _wrap32(v.to(torch.int32).to(torch.int64) + pad.to(torch.int64))

    return torch.cat([add(q, r[..., :-1]), add(e[..., None], r[..., -1:])], -1), ok


def unmask_rows(
    y: torch.Tensor, c: torch.Tensor, inv_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``teesplit::ring_unmask_rows`` in aten (``partitioner.ops._dequantize_rows``)."""
    d = _ring_diff(y, c)
    out = d[..., :-1].to(torch.float64) * _exp2_neg(d[..., -1])[..., None]
    out = out * inv_scale.to(torch.float64)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(torch.float32)


def ring_mask(
    x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``teesplit::ring_mask`` in aten; ``scale`` is ``2**frac_bits`` (float64, exact)."""
    q = torch.round(x.to(torch.float64) * scale)
    q = torch.minimum(torch.maximum(q, -limit), limit).to(torch.int64)
    return _to_ring(q + r.to(torch.int64), r.dtype), torch.isfinite(x).all()


def ring_unmask(y: torch.Tensor, c: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``teesplit::ring_unmask`` in aten."""
    return (_ring_diff(y, c).to(torch.float64) * inv_scale).to(torch.float32)


def rnm(ids: Any, candidates: Any, scores: Any, keep: Any, noise: Any) -> torch.Tensor:
    cand = candidates[ids]
    noisy = scores[ids].to(noise.dtype) + noise
    pick = cand.gather(-1, noisy.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(keep[ids], ids, pick)


# the masks that refuse what they cannot carry, with the float64 scalars their lowerings take
# in place of their integer literals (a norm limit; ``2**frac_bits`` and a limit)
_MASKS = {
    OPS.ring_mask_rows.default: lambda limit: (limit,),
    OPS.ring_mask.default: lambda frac_bits, limit: (2**frac_bits, limit),
}
_MASK_LOWERINGS = {OPS.ring_mask_rows.default: mask_rows, OPS.ring_mask.default: ring_mask}


def _all(*flags: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.logical_and, flags)


def freivalds(
    equations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    outputs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``enclave_runtime.integrity.RingCheck``'s check in aten: per equation (a GPU stage
    input ``x' = q + r``), ``sum_o <s_o, y'_o - δ_o> == <a, x' - r> + κ`` per row, in
    ``Z_{2^64}``. int64 products and sums wrap mod ``2**64`` as the check's uint64 ones do
    (the same bits); each difference is taken in its ring first (``Z_{2^32}``: the signed
    residue, as numpy's int32 subtraction gives it). ``outputs``: (equation, reply, its
    correction, its ``s``). One flag: every row of every equation holds."""
    lhs: dict[int, torch.Tensor] = {}
    for eq, y, delta, s in outputs:
        term = (_ring_sub(y, delta) * s).sum(-1)
        lhs[eq] = term if eq not in lhs else lhs[eq] + term
    flags = []
    for eq, (x, pad, a, kappa) in enumerate(equations):
        rhs = (_ring_sub(x, pad) * a).sum(-1) + kappa
        flags.append((lhs[eq] == rhs).all())
    return _all(*flags)


def gated_freivalds(
    vector: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    replies: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """:func:`freivalds` on the check's inputs (per equation the value sent and its pad; per
    output its equation, the reply and its correction) and its ``vector``: per equation
    ``a`` and ``κ``, then each output's ``s``, then whether to check. When the last is 0 the
    flag is true without a product computed: the executor made the check. Why: compiled, the
    check's int64 products cost more per element than numpy's (AVX2 has no 64-bit
    multiply), so a library checks only calls of few rows (a decode step), where numpy's
    cost is per call; a prefill's replies are checked by the executor. ``torch.cond``: one
    library holds both paths (its operands may not alias, so ``vector`` is sliced inside)."""
    which = [eq for eq, *_ in replies]
    inputs = [int(sent.shape[-1]) for sent, _ in pairs]
    flat = [t for pair in pairs for t in pair] + [t for _, y, delta in replies for t in (y, delta)]
    split = 2 * len(pairs)

    def check(v: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        offset = 0

        def take(width: int) -> torch.Tensor:
            nonlocal offset
            offset += width
            return v[offset - width : offset]

        equations = [
            (tensors[2 * i], tensors[2 * i + 1], take(width), take(1))
            for i, width in enumerate(inputs)
        ]
        rest = tensors[split:]
        outputs = [
            (eq, rest[2 * i], rest[2 * i + 1], take(int(rest[2 * i].shape[-1])))
            for i, eq in enumerate(which)
        ]
        return freivalds(equations, outputs)

    def skip(v: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.bool)

    return torch.cond(vector[-1] != 0, check, skip, (vector, *flat))


@dataclass(frozen=True)
class FusedCheck:
    """The Freivalds check of a GPU stage's reply, compiled into the enclave stage right
    after it (which unmasks every output of the reply): ``RingCheck`` in the executor costs
    a decode step of SmolLM2 ~120 rounds of numpy calls, more than the stages' own work.

    ``sources``: per equation, the GPU stage input it reads (in ``RingCheck``'s order:
    first appearance over the outputs); ``sent``: that input's metadata (a fake tensor);
    ``outputs``: per GPU stage output, (its equation, the enclave stage's placeholder index
    of the reply, and of its correction)."""

    stage: str
    sources: tuple[int, ...]
    sent: tuple[Any, ...]
    outputs: tuple[tuple[int, int, int], ...]


@dataclass
class Lowered:
    """A stage graph in aten only. Its inputs are the stage's, then (``verifies``) the
    fused check's (per equation the value sent and its pad; then one vector of ``a``, ``κ``
    and ``s`` and whether to check), then ``constants`` in order; its outputs the stage's,
    then (``verifies``) the check's flag, then (``checks``) the masks' flag."""

    module: torch.fx.GraphModule
    constants: list[torch.Tensor]
    checks: bool
    key: str = ""
    stage_inputs: int = 0
    check_inputs: int = 0
    verifies: FusedCheck | None = None


class NotLowerable(Exception):
    """A stage holds an op this pass has no aten spelling for: it stays eager."""


def why_eager(exc: Exception) -> str:
    """Why a compile failed, in one line for a report: a :class:`NotLowerable`'s own reason,
    else the error's type and the first line of its message (export and Inductor raise many
    types, some with pages of generated code, some with no message at all)."""
    if isinstance(exc, NotLowerable):
        return str(exc)
    first = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {first[:200]}"


def lower(module: torch.fx.GraphModule, verify: FusedCheck | None = None) -> Lowered:
    """The lowered copy of ``module`` (``module`` is not changed); with ``verify``, the check
    of the reply it unmasks compiled in, every later use of the reply gated on it."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    constants: list[torch.Tensor] = []
    nodes = list(module.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
    stage_inputs = len(env)
    verified, check_inputs = None, 0
    if verify is not None:
        verified, check_inputs = _check(graph, env, list(env), verify)
    lifted: dict[str, torch.fx.Node] = {}

    def constant(value: torch.Tensor, name: str) -> torch.fx.Node:
        if name and name in lifted:
            return lifted[name]
        ph = graph.placeholder(f"const_{len(constants)}")
        ph.meta["val"] = value
        constants.append(value)
        if name:
            lifted[name] = ph
        return ph

    for node in nodes:  # placeholders first: every constant is known before any use
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(module)
            if not isinstance(value, torch.Tensor):
                raise NotLowerable(f"attribute {node.target} is not a tensor")
            env[node] = constant(value.detach(), node.target)
    flags: list[torch.fx.Node] = []
    out_node = None
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            out_node = node
            continue
        if node.op != "call_function":
            raise NotLowerable(f"{node.op} node {node.name}")
        args = torch.fx.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.map_arg(node.kwargs, lambda n: env[n])
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket):  # a traced ``OPS.name(...)``
            target = target.default
        if target in _MASKS:  # a mask that can refuse: its value, and its flag collected
            x, r, *literals = args
            scalars = [constant(torch.tensor(float(v), dtype=torch.float64), "") for v in
                       _MASKS[target](*literals)]  # fmt: skip
            pair = graph.call_function(_MASK_LOWERINGS[target], (x, r, *scalars))
            env[node] = graph.call_function(operator.getitem, (pair, 0))
            flags.append(graph.call_function(operator.getitem, (pair, 1)))
        elif target == OPS.ring_unmask_rows.default:
            env[node] = graph.call_function(unmask_rows, args, kwargs)
        elif target == OPS.ring_unmask.default:
            env[node] = graph.call_function(ring_unmask, args, kwargs)
        elif target == OPS.mask.default:
            env[node] = graph.call_function(torch.add, args, kwargs)
        elif target == OPS.unmask.default:
            env[node] = graph.call_function(torch.sub, args, kwargs)
        elif target == OPS.rnm.default:
            env[node] = graph.call_function(rnm, args, kwargs)
        elif getattr(target, "namespace", None) == "teesplit":
            raise NotLowerable(f"{target} in {node.name}")
        else:
            env[node] = graph.call_function(target, args, kwargs)
        env[node].meta = dict(node.meta)
    if out_node is None:
        raise NotLowerable("no output")
    result = out_node.args[0]
    if isinstance(result, torch.fx.Node):  # a graph that returns one value, not a tuple
        result = (result,)
    outs = list(torch.fx.map_arg(result, lambda n: env[n]))
    if verified is not None:
        outs.append(verified)
    if flags:
        outs.append(graph.call_function(_all, tuple(flags)))
    graph.output(tuple(outs))
    lowered = torch.fx.GraphModule(torch.nn.Module(), graph)
    result = Lowered(
        lowered,
        constants,
        bool(flags),
        stage_inputs=stage_inputs,
        check_inputs=check_inputs,
        verifies=verify,
    )
    result.key = structure_key(result)
    return result


def _check(
    graph: torch.fx.Graph,
    env: dict[torch.fx.Node, Any],
    placeholders: list[torch.fx.Node],
    verify: FusedCheck,
) -> tuple[torch.fx.Node, int]:
    """The fused check, made before any constant is lifted so that its inputs come right
    after the stage's: per equation the value sent and its pad (the sent value's plan shape),
    then one int64 vector (``Z_{2^64}``) of static size holding, per equation, ``a`` and
    ``κ``, then each output's ``s``, then whether to check (one input, not one per vector: a
    library's inputs cost microseconds each). Returns the check's flag and how many inputs
    it added; each reply is replaced (in ``env``) by ``where(flag, reply, δ)``: a reply that
    fails the check is unmasked to zeros, so the stage's work after it (and its time)
    depends on the enclave's data only, never on what the GPU wrote."""
    pairs = []
    for eq, sent in enumerate(verify.sent):
        pair = [graph.placeholder(f"check_{what}_{eq}") for what in ("sent", "pad")]
        for ph in pair:
            ph.meta["val"] = sent
        pairs.append(pair)
    vector = graph.placeholder("check_vector")
    inputs = [int(sent.shape[-1]) for sent in verify.sent]
    outputs = [int(placeholders[reply].meta["val"].shape[-1]) for _, reply, _ in verify.outputs]
    size = sum(inputs) + len(inputs) + sum(outputs) + 1  # the last: whether to check
    vector.meta["val"] = torch.zeros(size, dtype=torch.int64)
    replies = [
        (eq, env[placeholders[reply]], env[placeholders[delta]])
        for eq, reply, delta in verify.outputs
    ]
    flag = graph.call_function(gated_freivalds, (vector, pairs, replies))
    for _, reply, delta in verify.outputs:
        source, correction = placeholders[reply], placeholders[delta]
        env[source] = graph.call_function(torch.where, (flag, env[source], env[correction]))
    return flag, 2 * len(pairs) + 1


# what the key covers besides the graph: the compile options' version, torch's, the vector
# instruction set Inductor generates for (and the compiler's rewrites depend on), and the
# lowering itself (a library cached under an old lowering must not be reused)
_FORMAT = "|".join(
    [
        "aoti-checked-inputs-1",
        torch.__version__,
        COMPILER_VERSION,
        str(pick_vec_isa()),
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
    ]
)


def _describe(value: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        return f"%{index[value]}"
    if isinstance(value, (list, tuple)):
        return [_describe(v, index) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v, index) for k, v in sorted(value.items())}
    return repr(value)


def structure_key(lowered: Lowered) -> str:
    """A digest of what the compiled code depends on: the ops, their wiring and literal
    arguments, and each input's dtype and shape (named dims by their symbol), but not the
    constants' values."""
    index: dict[torch.fx.Node, int] = {}
    parts: list[Any] = [_FORMAT]
    for i, node in enumerate(lowered.module.graph.nodes):
        index[node] = i
        target = node.target
        name = (
            f"{target.__module__}.{target.__qualname__}"
            if callable(target) and hasattr(target, "__qualname__")
            else str(target)
        )
        val = node.meta.get("val") if node.op == "placeholder" else None
        meta = (str(val.dtype), str(list(val.shape))) if isinstance(val, torch.Tensor) else None
        parts.append(
            [
                node.op,
                name if node.op != "placeholder" else "",
                meta,
                _describe(node.args, index),
                _describe(node.kwargs, index),
            ]
        )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _example(program: Any, lowered: Lowered) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Example inputs and dynamic dims as ``partitioner.artifacts`` exports stages; the
    constants are their own values, with static shapes."""
    placeholders = list(lowered.module.graph.find_nodes(op="placeholder"))
    vals = [
        ph.meta.get("val") for ph in placeholders[: lowered.stage_inputs + lowered.check_inputs]
    ]
    try:
        args, specs = program.shapes.export_example(program.input_dims, vals)
    except ValueError as exc:
        raise NotLowerable(str(exc)) from None
    return tuple(args + lowered.constants), tuple(specs + [None] * len(lowered.constants))


def input_specs(program: Any, lowered: Lowered) -> tuple[tuple[str, tuple[int | str, ...]], ...]:
    """Each stage input's dtype name and plan shape, as the runtime checks them."""
    specs = []
    for ph in list(lowered.module.graph.find_nodes(op="placeholder"))[: lowered.stage_inputs]:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise NotLowerable(f"input {ph.name} has no tensor metadata")
        specs.append((str(val.dtype).removeprefix("torch."), tuple(program.shapes.shape(val))))
    return tuple(specs)


def compile_library(program: Any, lowered: Lowered, path: Path) -> None:
    """Export ``lowered`` with the program's dims dynamic and compile it to ``path`` (.so)."""
    args, specs = _example(program, lowered)
    ep = torch.export.export(lowered.module, args, dynamic_shapes=specs, strict=False)
    compile_exported(ep, args, path)


@dataclass
class CompileReport:
    """Which stages run compiled, which stay eager and why, and how many libraries."""

    compiled: dict[str, CompiledLibrary] = field(default_factory=dict)
    eager: dict[str, str] = field(default_factory=dict)  # stage -> why it stays eager
    libraries: dict[str, Path] = field(default_factory=dict)  # key -> .so


def _requantised(program: Any) -> set[str]:
    """Row-scaled values that ``Executor._primal`` quantises again for a correction."""
    prot = program.protection
    if prot is None or prot.exact is None:
        return set()
    return {
        name
        for corr in prot.corrections.values()
        for name in corr.primal_inputs
        if name in prot.exact.row_limit
    }


def fused_check(program: Any, position: int) -> FusedCheck | None:
    """The check to compile into the enclave stage at ``position``: the Freivalds check of
    the GPU stage just before it, when that stage is checked in the ring (exact masking,
    every output a ``ring_linear`` of a masked input) and this stage reads every output of
    it with its correction, so no stage reads the reply before the check. Else ``None``:
    the executor checks that reply itself, as it arrives."""
    prot = program.protection
    stage = program.stages[position]
    gpu = program.stages[position - 1] if position > 0 else None
    if prot is None or prot.exact is None or gpu is None or gpu.side != "gpu":
        return None
    if gpu.name not in prot.freivalds or not isinstance(stage.module, torch.fx.GraphModule):
        return None
    try:
        layers = ring_layers(prot.freivalds[gpu.name][0])
    except ValueError:
        return None
    inputs = [n.name for n in prot.freivalds[gpu.name][0].graph.find_nodes(op="placeholder")]
    sent = list(gpu.module.graph.find_nodes(op="placeholder"))
    extras = {kv: len(stage.inputs) + i for i, kv in enumerate(stage.extra_inputs)}
    sources: list[int] = []
    outputs = []
    for index, node in enumerate(layers):
        source, name = inputs.index(node.args[0].name), gpu.outputs[index]
        if name not in stage.inputs or ("delta", name) not in extras:
            return None
        if gpu.inputs[source] not in prot.masked:  # its pad is the pool's
            return None
        if source not in sources:
            sources.append(source)
        outputs.append((sources.index(source), stage.inputs.index(name), extras[("delta", name)]))
    vals = tuple(sent[source].meta.get("val") for source in sources)
    if not all(isinstance(v, torch.Tensor) and isinstance(v.shape[-1], int) for v in vals):
        return None
    return FusedCheck(gpu.name, tuple(sources), vals, tuple(outputs))


def compile_enclave(program: Any, directory: str | Path) -> CompileReport:
    """Compile ``program``'s enclave stages into ``directory`` (one ``<key>.so`` per distinct
    lowered graph) and attach each compiled stage to its :class:`~partitioner.plan.Stage`
    (``stage.compiled``), where the executor runs it instead of the graph. A stage this pass
    cannot lower or export stays eager, with the reason in the report."""
    root = Path(directory)
    report = CompileReport()
    requantised = _requantised(program)
    for position, stage in enumerate(program.stages):
        if stage.side != "enclave" or not isinstance(stage.module, torch.fx.GraphModule):
            continue
        if requantised & set(stage.outputs):
            # the executor quantises these rows again, eagerly, for a product correction: a
            # compiled row norm summed in another order could pick the neighbouring exponent
            report.eager[stage.name] = (
                f"its row-scaled outputs {sorted(requantised & set(stage.outputs))} feed a "
                "product correction that quantises them again eagerly"
            )
            continue
        try:
            lowered = lower(stage.module, fused_check(program, position))
            inputs = input_specs(program, lowered)
            library = report.libraries.get(lowered.key)
            if library is None:
                library = root / f"{lowered.key}.so"
                if not library.is_file():
                    compile_library(program, lowered, library)
                report.libraries[lowered.key] = library
        except Exception as exc:  # NotLowerable, or export's and Inductor's: the stage stays eager
            report.eager[stage.name] = why_eager(exc)
            continue
        verifies = lowered.verifies
        stage.compiled = report.compiled[stage.name] = CompiledLibrary(
            str(library),
            tuple(lowered.constants),
            lowered.checks,
            inputs,
            (verifies.stage, verifies.sources) if verifies is not None else None,
        )
    if not report.compiled and not report.eager:
        raise ArtifactError("the program has no enclave stage graph to compile")
    return report
