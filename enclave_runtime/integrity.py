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
``masking="additive"`` (floats): ``s`` is standard normal and the check allows a rounding
tolerance ``τ = FLOAT_RTOL · (Σ|s·y'| + Σ|a·x'| + |κ|)``; an error ``e`` passes when
``|⟨s, e⟩| <= τ``, probability ``erf(τ / (‖e‖₂·√2))`` for Gaussian ``s``: negligible for
errors well above ``τ``, certain for errors below it. The tolerance is reported per check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from partitioner.errors import IntegrityError
from partitioner.op_table import op_name
from partitioner.ops import mul_pow2_mod

FIELD_S_BITS = 20
FLOAT_RTOL = 1e-5


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
            samples = [rng.normal(list(d.shape)).to(torch.float64) for d in deltas]
            _, vjp = torch.func.vjp(lambda *xs: tuple(self.corr.module(*xs)), *pads)
            a = [g.to(torch.float64) for g in vjp(tuple(s.to(pads[0].dtype) for s in samples))]
            kappa = float(sum((s * c.double()).sum() for s, c in zip(samples, biases, strict=True)))
            return {
                "s": [x.flatten().to(torch.float32) for x in samples],
                "a": [x.flatten() for x in a],
                "kappa": kappa,
            }
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
    s, a, kappa = vectors["s"], vectors["a"], vectors["kappa"]
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
        lhs = sum(_dot_small_mod(si, yi, field_prime) for si, yi in zip(s, outputs, strict=True))
        rhs = sum(_dot_mod(ai, xi, field_prime) for ai, xi in zip(a, inputs, strict=True))
        if (lhs - rhs - kappa) % field_prime != 0:
            raise IntegrityError(
                f"GPU stage {stage} returned results that fail the Freivalds check mod p "
                f"(false-positive probability 0; a wrong result passes with probability "
                f"<= 2**-{FIELD_S_BITS})"
            )
        return {"tolerance": 0.0}
    lhs = rhs = bound = 0.0
    for si, yi in zip(s, outputs, strict=True):
        # float32 products (relative error 6e-8 each, far below the tolerance), float64 sums:
        # the outputs can be large (the logits), so they are not copied to float64 first.
        y = yi.flatten()
        lhs += float((si * y).sum(dtype=torch.float64))
        bound += float(torch.dot(si.abs(), y.abs()))
    for ai, xi in zip(a, inputs, strict=True):
        x64 = xi.flatten().to(torch.float64)
        rhs += float(torch.dot(ai, x64))
        bound += float(torch.dot(ai.abs(), x64.abs()))
    rhs += kappa
    tol = FLOAT_RTOL * (bound + abs(kappa))
    if abs(lhs - rhs) > tol:
        raise IntegrityError(
            f"GPU stage {stage} returned results that fail the Freivalds check: "
            f"|<s,y'> - <a,x'> - k| = {abs(lhs - rhs):.4g} > tolerance {tol:.4g}"
        )
    return {"tolerance": tol}
