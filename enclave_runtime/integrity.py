"""Freivalds integrity checks of GPU results (``integrity="freivalds"``).

For a GPU stage that is affine in its (masked) inputs, ``y = L(x) + c``, the enclave draws a
random vector ``s`` over the outputs and precomputes, ahead of the request, ``a = Lᵀs`` (the
generalisation of Slalom's ``sᵀW`` to a stage with several inputs, outputs and shape ops; a
vector-Jacobian product of the stage's correction graph, which *is* ``L``) and ``κ = ⟨s, c⟩``.
Online it checks ``⟨s, y'⟩ = ⟨a, x'⟩ + κ`` on the values the GPU got and returned: two dot
products, linear in the tensor sizes, instead of the stage's matrix products.

False negatives. ``masking="field"``: ``s`` is uniform on ``[0, 2**20)`` and the check is exact
mod ``p``; a wrong result ``y' = y + e`` with ``e != 0 mod p`` passes only if ``⟨s, e⟩ = 0 mod p``,
which by Schwartz–Zippel has probability at most ``2**-20`` per check (fresh ``s`` per request).
``masking="additive"`` (floats): the check is made per *row* (the positions a stage maps
independently, found by a probe: ``Lᵀs`` of an ``s`` on one row must vanish on the others), with
``FLOAT_CHECKS`` independent standard-normal ``s``. Each row's tolerance comes from a
floating-point error bound for that row: the GPU's honest error ``δ`` in a row has
``‖δ‖ <= λ·√n·u·‖L_r‖_F·‖x'_r‖ + u·‖c_r‖`` (``n`` the longest reduction, ``u`` the float32
unit roundoff; each entry's dot product errs by at most ``λ·√n·u·‖W_j‖·‖x‖`` except with
probability ``2·exp(-λ²/2)``, the probabilistic bound of Higham & Mary, 2019; the worst case
``n·u`` is 6× larger on a 576-wide layer and hides a +50 logit), and since ``s`` is secret
and Gaussian, ``⟨s_r, δ⟩ ~ N(0, ‖δ‖²)``; the check allows ``τ_r = FLOAT_Z`` of those standard
deviations. ``‖L_r‖_F`` is estimated offline from ``‖Lᵀs‖`` of the *other* draws (Hutchinson),
with a margin of ``NORM_MARGIN``; ``a`` is computed in float64. Not one scalar for the whole
tensor. An error ``e`` in row ``r`` passes one check when
``|⟨s_r, e⟩| <= τ_r``; for a change larger than ``10·τ_r`` that is ``P(|N(0,1)| < 0.1) ≈ 8 %``
per check, so at most 0.64 % with two. A stage whose rows mix is checked as one row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from partitioner.errors import IntegrityError
from partitioner.op_table import op_name
from partitioner.ops import mul_pow2_mod

FIELD_S_BITS = 20
FLOAT_CHECKS = 2  # independent s per request for float masks
FLOAT_Z = 6.0  # standard deviations of the honest error a row's check allows (2e-9 one-sided)
FLOAT_UNIT = 2.0**-24  # float32 unit roundoff: the GPU stages compute in float32
NORM_MARGIN = 2.0  # headroom on the sampled estimate of ‖L‖_F
FLOAT_LAMBDA = 4.0  # λ of the probabilistic rounding bound λ·√n·u (Higham & Mary, 2019)


def _linear64_by(limb: str) -> Any:
    """``field_linear`` as a float64 linear map using one 11-bit limb of the int weights."""

    def linear(x: torch.Tensor, w: torch.Tensor, b: Any = None, prime: int = 0) -> torch.Tensor:
        part = (w >> _W_LIMB) if limb == "high" else (w & ((1 << _W_LIMB) - 1))
        return torch.nn.functional.linear(x, part.to(torch.float64))

    return linear


def _add64(a: torch.Tensor, b: torch.Tensor, prime: int = 0) -> torch.Tensor:
    return a + b


def float64_linear_part(module: torch.fx.GraphModule, limb: str) -> torch.fx.GraphModule:
    """A field correction graph as plain float64 ops, with one limb of each weight.

    ``w = high * 2**11 + low``; with ``s < 2**20`` each limb's ``Lᵀs`` stays below 2**53, so
    autograd computes it exactly; the two are recombined in int64 mod p.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(module.graph, env)
    graph.output(out)
    for node in graph.nodes:
        if node.op == "call_function" and op_name(node) == "field_linear":
            node.target = _linear64_by(limb)
        elif node.op == "call_function" and op_name(node) == "field_add":
            node.target = _add64
    return torch.fx.GraphModule(module, graph)


_W_LIMB = 11
_LIMB = 21  # residues < 2**61 as three 21-bit limbs
_CHUNK = 1 << 20  # products of two 21-bit limbs summed over 2**20 elements stay below 2**62


def _limbs(t: torch.Tensor, count: int) -> list[torch.Tensor]:
    low = (1 << _LIMB) - 1
    return [(t >> (_LIMB * i)) & low for i in range(count)]


def _dot_mod(a: torch.Tensor, b: torch.Tensor, prime: int, a_limbs: int = 3) -> int:
    """``⟨a, b⟩ mod prime`` for residues below 2**61, exact in int64.

    Both operands are cut into 21-bit limbs (``a`` may need fewer, e.g. the 20-bit Freivalds
    vector), so every product and every chunked sum fits in int64; Python integers combine them.
    """
    total = 0
    for a_part, b_part in zip(a.flatten().split(_CHUNK), b.flatten().split(_CHUNK), strict=True):
        b_limbs = _limbs(b_part, 3)
        for i, al in enumerate(_limbs(a_part, a_limbs)):
            for j, bl in enumerate(b_limbs):
                total += int((al * bl).sum()) << (_LIMB * (i + j))
    return total % prime


def _dot_small_mod(s: torch.Tensor, b: torch.Tensor, prime: int) -> int:
    return _dot_mod(s, b, prime, a_limbs=1)


class FreivaldsStage:
    """One checked GPU stage: draws ``s`` per request and precomputes ``a = Lᵀs`` and
    ``κ = ⟨s, f(0)⟩`` offline.

    What does not change between requests is built once: the float64 limb graphs of a field
    correction, and the bias term ``f(0)`` per input shape (computed with the enclave's own copy
    of the stage, never by asking the GPU).
    """

    def __init__(
        self,
        corr: Any,
        stage_module: torch.fx.GraphModule,
        stage_outputs: list[str],
        field_prime: int | None,
    ) -> None:
        self.corr = corr
        self.stage_module = stage_module
        self.output_index = [stage_outputs.index(o) for o in corr.delta_outputs]
        self.prime = field_prime
        self.limbs = (
            [float64_linear_part(corr.module, limb) for limb in ("high", "low")]
            if field_prime is not None
            else []
        )
        self._biases: dict[tuple[tuple[int, ...], ...], list[torch.Tensor]] = {}
        self._rows: dict[tuple[tuple[int, ...], ...], int] = {}
        if field_prime is None:
            self.linear64 = _float64_graph(corr.module)
            self.fan_in = _fan_in(corr.module)

    def rows(self, pads: list[torch.Tensor], deltas: list[torch.Tensor], vjp: Any) -> int:
        """How many independent rows the stage maps: the common leading positions of its
        inputs and outputs, if a probe shows that a row of outputs reads only its own row of
        inputs; else 1 (the stage is checked as a whole)."""
        key = tuple(tuple(t.shape) for t in [*pads, *deltas])
        if key in self._rows:
            return self._rows[key]
        prefix = _common_prefix([list(t.shape[:-1]) for t in [*pads, *deltas]])
        count = 1
        for size in prefix:
            count *= size
        if count > 1:
            probe = []
            for d in deltas:
                cot = torch.zeros(count, d.numel() // count, dtype=d.dtype)
                cot[0] = 1.0 + torch.arange(cot.shape[1], dtype=d.dtype) / cot.shape[1]
                probe.append(cot.reshape(d.shape))
            grads = vjp(tuple(probe))
            if any(bool(g.reshape(count, -1)[1:].abs().sum() != 0) for g in grads):
                count = 1
        self._rows[key] = count
        return count

    def biases(self, pads: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(tuple(p.shape) for p in pads)
        if key not in self._biases:
            with torch.no_grad():
                constant = self.stage_module(*(torch.zeros_like(p) for p in pads))
            self._biases[key] = [constant[i] for i in self.output_index]
        return self._biases[key]

    def draw(self, pads: list[torch.Tensor], deltas: list[torch.Tensor], rng: Any) -> dict:
        """``pads`` are the stage's inputs' pads (every input is masked), ``deltas`` the
        correction's outputs for them (only their shapes are used)."""
        biases = self.biases(pads)
        prime = self.prime
        if prime is None:
            return self._draw_float(pads, deltas, biases, rng)
        samples = [rng.field(list(d.shape), 2**FIELD_S_BITS) for d in deltas]
        cotangents = tuple(s.to(torch.float64) for s in samples)
        parts = []
        for linear in self.limbs:
            _, vjp = torch.func.vjp(
                lambda *xs, _f=linear: tuple(_f(*xs)), *(p.to(torch.float64) for p in pads)
            )
            grads = vjp(cotangents)
            for g in grads:
                if g.abs().max() >= 2**52:
                    raise IntegrityError("Freivalds precomputation left float64's exact range")
            parts.append([torch.remainder(g.round().to(torch.int64), prime) for g in grads])
        a = [
            torch.remainder(mul_pow2_mod(hi, _W_LIMB) + lo, prime)
            for hi, lo in zip(*parts, strict=True)
        ]
        kappa = sum(_dot_mod(s, c, prime) for s, c in zip(samples, biases, strict=True)) % prime
        return {"s": samples, "a": a, "kappa": kappa}

    def _draw_float(
        self,
        pads: list[torch.Tensor],
        deltas: list[torch.Tensor],
        biases: list[torch.Tensor],
        rng: Any,
    ) -> dict:
        """``FLOAT_CHECKS`` draws of ``s``, with ``a = Lᵀs`` (in float64, so ``a`` adds no
        rounding of its own) and ``κ`` per row, and the per-row size of ``L`` the bound uses."""
        pads64 = [p.to(torch.float64) for p in pads]
        _, vjp = torch.func.vjp(lambda *xs: tuple(self.linear64(*xs)), *pads64)
        rows = self.rows(pads64, [d.to(torch.float64) for d in deltas], vjp)
        draws = []
        for _ in range(FLOAT_CHECKS):
            samples = [rng.normal(list(d.shape)).to(torch.float64) for d in deltas]
            a = [g.reshape(rows, -1) for g in vjp(tuple(samples))]
            s64 = [x.reshape(rows, -1) for x in samples]
            c64 = [c.to(torch.float64).reshape(rows, -1) for c in biases]
            draws.append(
                {
                    "s": [x.to(torch.float32) for x in s64],
                    "a": a,
                    "kappa": sum((si * ci).sum(1) for si, ci in zip(s64, c64, strict=True)),
                    # ‖Lᵀs‖ estimates ‖L‖_F per row (E‖Lᵀs‖² = ‖L‖²_F for Gaussian s)
                    "norm": sum((ai * ai).sum(1) for ai in a).sqrt(),
                    "bias": sum((ci * ci).sum(1) for ci in c64).sqrt(),
                }
            )
        # each draw's bound uses the other draws' estimate of ‖L‖_F: independent of its own s
        for k, draw in enumerate(draws):
            others = [d["norm"] for j, d in enumerate(draws) if j != k] or [draw["norm"]]
            draw["size"] = NORM_MARGIN * torch.stack(others).max(0).values
        # |δ_j| <= λ·√n·u·‖W_j‖·‖x‖ for each computed entry (the probabilistic rounding bound:
        # it fails with probability <= 2·exp(-λ²/2) per entry, and ‖δ‖ averages over them)
        gamma = FLOAT_LAMBDA * math.sqrt(self.fan_in) * FLOAT_UNIT
        return {"rows": rows, "draws": draws, "gamma": gamma}


def _common_prefix(shapes: list[list[int]]) -> list[int]:
    prefix = []
    for sizes in zip(*shapes, strict=False):
        if len(set(sizes)) != 1:
            break
        prefix.append(sizes[0])
    return prefix if all(len(s) >= len(prefix) for s in shapes) else []


def _fan_in(module: torch.fx.GraphModule) -> int:
    """The longest reduction in a stage: the widest input dim of any weight it multiplies."""
    sizes = [t.shape[-1] for t in _tensors(module) if t.dim() >= 2]
    return max(sizes, default=1)


def _tensors(module: torch.fx.GraphModule) -> list[torch.Tensor]:
    out = []
    for node in module.graph.find_nodes(op="get_attr"):
        value = _get_attr(module, node.target)
        if isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _get_attr(module: Any, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _float64_graph(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The correction graph ``L`` with its weights in float64, for ``a = Lᵀs`` without
    float32 rounding."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(module.graph, env))
    root = torch.nn.Module()
    for node in graph.find_nodes(op="get_attr"):
        value = _get_attr(module, node.target)
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            value = value.detach().to(torch.float64)
        owner = root
        *path, leaf = node.target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value.detach(), persistent=False)
        else:
            setattr(owner, leaf, value)
    return torch.fx.GraphModule(root, graph)


def check(
    stage: str,
    vectors: dict[str, Any],
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    field_prime: int | None,
) -> dict[str, float]:
    """Raise :class:`IntegrityError` unless ``⟨s, y'⟩ = ⟨a, x'⟩ + κ`` (within τ for floats).

    Values the check's arithmetic cannot vouch for are refused first: a NaN or inf in a float
    result would make the comparison false and the tolerance NaN (so it would pass), and a
    field residue outside ``[0, p)`` is no residue at all.
    """
    for i, y in enumerate(outputs):
        if field_prime is not None:
            if y.dtype != torch.int64 or (
                y.numel() and (int(y.min()) < 0 or int(y.max()) >= field_prime)
            ):
                raise IntegrityError(
                    f"GPU stage {stage} output {i}: not int64 residues in [0, p) (refused)"
                )
        elif not bool(torch.isfinite(y).all()):
            raise IntegrityError(f"GPU stage {stage} output {i} holds NaN or inf (refused)")
    if field_prime is not None:
        s, a, kappa = vectors["s"], vectors["a"], vectors["kappa"]
        lhs = sum(_dot_small_mod(si, yi, field_prime) for si, yi in zip(s, outputs, strict=True))
        rhs = sum(_dot_mod(ai, xi, field_prime) for ai, xi in zip(a, inputs, strict=True))
        if (lhs - rhs - kappa) % field_prime != 0:
            raise IntegrityError(
                f"GPU stage {stage} returned results that fail the Freivalds check mod p "
                f"(false-positive probability 0; a wrong result passes with probability "
                f"<= 2**-{FIELD_S_BITS})"
            )
        return {"tolerance": 0.0}
    rows = vectors["rows"]
    ys = [y.reshape(rows, -1) for y in outputs]
    xs = [x.to(torch.float64).reshape(rows, -1) for x in inputs]
    x_norm = sum((x * x).sum(1) for x in xs).sqrt()
    worst, tolerances = 0.0, []
    for draw in vectors["draws"]:
        # float32 products with float64 sums: the outputs (the logits) are not copied whole
        lhs = sum(
            (si * yi).sum(1, dtype=torch.float64) for si, yi in zip(draw["s"], ys, strict=True)
        )
        rhs = sum((ai * xi).sum(1) for ai, xi in zip(draw["a"], xs, strict=True)) + draw["kappa"]
        # an honest error δ in a row gives <s,δ> ~ N(0, ‖δ‖²), with
        # ‖δ‖ <= γ·‖L‖_F·‖x'‖ (the products) + u·‖c‖ (the bias): Z standard deviations of it
        tol = FLOAT_Z * (vectors["gamma"] * draw["size"] * x_norm + FLOAT_UNIT * draw["bias"])
        tol = tol + 1e-9 * (1 + lhs.abs())  # the check's own float64 sums
        excess = (lhs - rhs).abs() / tol
        row = int(excess.argmax())
        if float(excess[row]) > 1.0:
            raise IntegrityError(
                f"GPU stage {stage} returned results that fail the Freivalds check in row {row}: "
                f"|<s,y'> - <a,x'> - k| = {float((lhs - rhs)[row].abs()):.4g} > that row's "
                f"rounding bound {float(tol[row]):.4g}"
            )
        worst = max(worst, float(excess.max()))
        tolerances.append(tol)
    return {"tolerance_used": worst, "row_tolerances": tolerances}
