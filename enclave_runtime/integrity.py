"""Freivalds integrity checks of GPU results (``integrity="freivalds"``).

For a GPU stage that is affine in its (masked) inputs, ``y = L(x) + c``, the enclave draws a
random vector ``s`` over the outputs and precomputes, ahead of the request, ``a = Lᵀs`` (the
generalisation of Slalom's ``sᵀW`` to a stage with several inputs, outputs and shape ops; a
vector-Jacobian product of the stage's correction graph, which *is* ``L``) and ``κ = ⟨s, c⟩``.
Online it checks ``⟨s, y'⟩ = ⟨a, x'⟩ + κ`` on the values the GPU got and returned: two dot
products, linear in the tensor sizes, instead of the stage's matrix products.

False negatives. ``masking="exact"`` (:class:`RingCheck`): the check is made on the unmasked
integers, which equal ``W q + b`` exactly (the exact pass rules out wrap-around), in
``Z_{2^64}`` with ``s`` uniform over it: a wrong result changes some ``y_j`` by ``e_j != 0``
with ``|e_j| < 2**33``, and ``⟨s, e⟩ = 0 mod 2**64`` has probability at most ``2**-31``. ``s``
is drawn once per executor, kept secret, and drawn again after any failed check (the GPU
learns nothing about ``s`` from a check that passes); ``Wᵀs`` is then computed once, not per
request.
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

import numpy as np
import torch
import torch.fx

from partitioner.errors import IntegrityError
from partitioner.ops import ring_layers, ring_limbs, ring_recombine, with_attrs

FLOAT_CHECKS = 2  # independent s per request for float masks
FLOAT_Z = 6.0  # standard deviations of the honest error a row's check allows (2e-9 one-sided)
FLOAT_UNIT = 2.0**-24  # float32 unit roundoff: the GPU stages compute in float32
NORM_MARGIN = 2.0  # headroom on the sampled estimate of ‖L‖_F
FLOAT_LAMBDA = 4.0  # λ of the probabilistic rounding bound λ·√n·u (Higham & Mary, 2019)


class FreivaldsStage:
    """One checked GPU stage: draws ``s`` per request and precomputes ``a = Lᵀs`` and
    ``κ = ⟨s, f(0)⟩`` offline.

    What does not change between requests is built once: the bias term ``f(0)`` per input
    shape (computed with the enclave's own copy of the stage, never by asking the GPU).
    """

    def __init__(
        self,
        corr: Any,
        stage_module: torch.fx.GraphModule,
        stage_outputs: list[str],
    ) -> None:
        self.corr = corr
        self.stage_module = stage_module
        self.output_index = [stage_outputs.index(o) for o in corr.delta_outputs]
        self._biases: dict[tuple[tuple[int, ...], ...], list[torch.Tensor]] = {}
        self._rows: dict[tuple[tuple[int, ...], ...], int] = {}
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
        return self._draw_float(pads, deltas, self.biases(pads), rng)

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
    return with_attrs(module, lambda _, t: t.to(torch.float64) if t.dtype.is_floating_point else t)


def check(
    stage: str,
    vectors: dict[str, Any],
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
) -> dict[str, float]:
    """Float masks: raise :class:`IntegrityError` unless ``⟨s, y'⟩ = ⟨a, x'⟩ + κ`` within
    each row's τ.

    A NaN or inf in a result is refused first: it would make the comparison false and the
    tolerance NaN (so it would pass).
    """
    for i, y in enumerate(outputs):
        if not bool(torch.isfinite(y).all()):
            raise IntegrityError(f"GPU stage {stage} output {i} holds NaN or inf (refused)")
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


class RingCheck:
    """Freivalds for one exactly masked GPU stage whose outputs are ``ring_linear`` layers
    of its inputs (``y_o = W_o x_p + b_o``), checked per row in ``Z_{2^64}``.

    Built from the enclave's own copy of the stage (its int8 weights and quantised biases);
    ``s`` per output is secret, ``a = Wᵀs`` and ``κ = ⟨s, b⟩`` are computed once per draw.
    """

    def __init__(
        self, stage: str, module: torch.fx.GraphModule, inputs: list[str], rng: Any
    ) -> None:
        self.stage = stage
        self.rng = rng
        placeholders = [n.name for n in module.graph.find_nodes(op="placeholder")]
        try:
            nodes = ring_layers(module)
        except ValueError as exc:
            raise IntegrityError(
                f"GPU stage {stage}: integrity='freivalds' with masking='exact' checks "
                f"stages whose outputs are linear layers of their inputs; {exc}"
            ) from None
        # (output, input, weights, bias, carry: the last column passes through unchanged)
        self.layers: list[tuple[int, int, torch.Tensor, torch.Tensor | None, bool]] = []
        for index, node in enumerate(nodes):
            weight = _get_attr(module, node.args[1].target)
            bias = node.args[2]
            b = _get_attr(module, bias.target) if bias is not None else None
            source = placeholders.index(node.args[0].name)
            carry = len(node.args) > 3 and bool(node.args[3])
            self.layers.append((index, source, weight, b, carry))
        self.inputs = [inputs[i] for i in range(len(placeholders))]
        self.draw()

    def draw(self) -> None:
        """A fresh secret ``s`` per output, with ``a = Wᵀs`` and ``κ = ⟨s, b⟩`` mod 2**64."""
        self.vectors = []
        for _, _, weight, bias, carry in self.layers:
            s = self.rng.ring([weight.shape[0] + int(carry)], torch.int64)
            w64 = weight.to(torch.float64).t()
            rows = s[: weight.shape[0]]
            a = ring_recombine([w64 @ limb for limb in ring_limbs(rows, 4)], torch.int64)
            if carry:  # the identity on the exponent column: its a is its s
                a = torch.cat([a, s[-1:]])
            kappa = (rows * bias.to(torch.int64)).sum() if bias is not None else torch.tensor(0)
            self.vectors.append((s, a, kappa))
        # per input: the outputs that read it, and their a and κ summed (mod 2**64)
        by_source: dict[int, tuple[list[tuple[int, np.ndarray]], np.ndarray, Any]] = {}
        for (index, source, *_), (s, a, kappa) in zip(self.layers, self.vectors, strict=True):
            outs, a_sum, k_sum = by_source.get(source, ([], 0, 0))
            by_source[source] = (
                [*outs, (index, _u64(s.numpy()))],
                _u64(a.numpy()) + a_sum,
                _u64(kappa.numpy()) + k_sum,
            )
        # one tuple per equation, read by expect and verify in the same order: a request's
        # checks are ~240 per decode step, so what is per equation is worked out here once
        self.equations = [
            (source, a, kappa, [(index, s, (s.shape[0],)) for index, s in outs])
            for source, (outs, a, kappa) in by_source.items()
        ]
        # the same vectors as int64 tensors (the same bits) for the check compiled into the
        # enclave stage that unmasks the reply (partitioner.aot): per equation a and κ, then
        # each output's s
        self.sources = tuple(source for source, *_ in self.equations)
        parts = [np.append(a, np.asarray(k, dtype=np.uint64)) for _, a, k, _ in self.equations]
        parts += [_u64(s.numpy()) for s, _, _ in self.vectors]
        # and last, whether the library makes the check (1) or the executor made it (0)
        vector = np.concatenate([*parts, np.ones(1, dtype=np.uint64)]).view(np.int64)
        self._fused = {True: torch.from_numpy(vector), False: torch.from_numpy(vector.copy())}
        self._fused[False][-1] = 0

    def fused_vector(self, here: bool = True) -> torch.Tensor:
        """The compiled check's vector alone (``fused_args``' last tensor): a step library
        (``partitioner.aot_step``) takes what was sent and its pads from its own values."""
        return self._fused[here]

    def fused_args(
        self, sent: list[torch.Tensor], pads: list[torch.Tensor], here: bool = True
    ) -> list[torch.Tensor]:
        """The compiled check's inputs: per equation the value sent (the enclave's own
        tensor, never one a runner was handed) and its pad; then one vector holding, per
        equation, ``a`` and ``κ``, then each output's ``s`` (the same bits as int64), then
        ``here``: whether the library makes the check (``False``: the executor has made it,
        and the library unmasks the reply without checking it again). ``sent`` and ``pads``
        per stage input."""
        out: list[torch.Tensor] = []
        for source in self.sources:
            out += [sent[source], pads[source]]
        out.append(self.fused_vector(here))
        return out

    def expect(self, sent: list[torch.Tensor], pads: list[Any]) -> list[Any]:
        """The right-hand sides ``<sum_o W_oᵀ s_o, x> + sum_o κ_o`` per row, one per input,
        from what is about to be sent and its pads (``x = sent - pad``; a pad may be given as
        the numpy view of its tensor). Computed *before* the GPU gets ``sent``: the check then
        never reads a tensor a runner was handed."""
        # numpy over uint64: products and sums wrap mod 2**64 by definition, at a fraction of
        # torch's per-call cost on a decode step's one-row tensors; int32 -> uint64 casts
        # sign-extend (C conversion), so a residue reads as its signed value mod 2**64
        out = []
        for source, a, kappa, _ in self.equations:
            x, pad = sent[source].numpy(), pads[source]
            if pad is not None:  # wraps in the residues' ring
                x = x - (pad if isinstance(pad, np.ndarray) else pad.numpy())
            out.append(x.astype(np.uint64) @ a + kappa)
        return out

    def _refuse(self, why: str) -> IntegrityError:
        return IntegrityError(f"GPU stage {self.stage} returned results the check refuses: {why}")

    def verify(self, expected: list[Any], outputs: list[torch.Tensor], deltas: list[Any]) -> None:
        """Raise :class:`IntegrityError` unless, for every input, ``sum_o <s_o, y_o>`` (the
        unmasked outputs ``y_o = reply_o - delta_o``; a delta may be a numpy view) equals what
        :meth:`expect` computed.

        With independent uniform ``s_o`` a wrong result in any output still passes with
        probability ``<= 2**-31``, and the input is unmasked once instead of once per layer
        (q, k and v share one)."""
        for (_, _, _, outs), rhs in zip(self.equations, expected, strict=True):
            lhs = None
            for index, s, width in outs:
                y, delta = outputs[index].numpy(), deltas[index]
                # a reply whose shape the plan leaves open (check_reply knew no size) must
                # still fit the check: refused as such, never a numpy broadcasting error
                if y.shape[-1:] != width or (delta is not None and delta.shape != y.shape):
                    raise self._refuse(f"output {index} has shape {list(y.shape)}")
                if delta is not None:
                    y = y - (delta if isinstance(delta, np.ndarray) else delta.numpy())
                term = y.astype(np.uint64) @ s
                if lhs is None:
                    lhs = term
                elif term.shape == lhs.shape:
                    lhs += term
                else:
                    raise self._refuse(f"output {index} has {list(y.shape)[:-1]} rows")
            if lhs.shape != np.shape(rhs):
                raise self._refuse(f"outputs {[i for i, *_ in outs]} do not match the input's rows")
            if not (lhs == rhs).all():
                self.draw()  # the failed check told the GPU something about s: replace it
                row = [int(i) for i in np.argwhere(lhs != rhs)[0]] if np.ndim(lhs) else []
                raise IntegrityError(
                    f"GPU stage {self.stage} returned results that fail the Freivalds check "
                    f"(outputs {[i for i, *_ in outs]}, row {row}; exact: an honest result "
                    "always passes, a wrong one passes with probability <= 2**-31)"
                )

    def check(
        self,
        sent: list[torch.Tensor],
        outputs: list[torch.Tensor],
        pads: list[Any],
        deltas: list[Any],
    ) -> None:
        """``sent``/``pads`` per stage input, ``outputs``/``deltas`` per stage output: the
        outputs that read one input are checked as one equation,
        ``sum_o <s_o, y_o> = <sum_o W_oᵀ s_o, x> + sum_o κ_o`` (:meth:`expect`, then
        :meth:`verify`)."""
        self.verify(self.expect(sent, pads), outputs, deltas)


def _u64(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64, copy=False).view(np.uint64)
