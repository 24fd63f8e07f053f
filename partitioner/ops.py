"""The ``teesplit::`` operators that protection inserts into stage graphs.

They are ``torch.library`` custom ops with fake (meta) kernels, so a stage that contains them
can be exported, traced and shape-propagated like any aten graph, and the runtime (issue #4)
can find them by name. Importing this module registers them.

* ``mask(x, r) = x + r`` and ``unmask(y, c) = y - c``: additive float masking.
* ``field_mask(x, r, frac_bits, prime)``: ``round(x * 2**frac_bits) + r mod prime`` (int64).
* ``field_unmask(y, c, frac_bits, prime)``: ``(y - c) mod prime`` lifted to the signed range
  ``(-prime/2, prime/2]`` and divided by ``2**frac_bits`` (float32).
* ``field_linear(x, w, b, prime)``: ``x @ w.T + b mod prime`` on int64. The residues ``x`` (61
  bits) are split into two 31-bit limbs, so each int64 product sum stays exact while
  ``2**31 * max|w| * fan_in < 2**62``, which the field pass guarantees per node.
* ``field_add(a, b, prime)``: ``a + b mod prime``.
* ``rnm(ids, candidates, scores, keep, noise)``: Report-Noisy-Max over each token's candidate
  set (``passes/rnm.py`` explains the mechanism and its privacy claim).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("teesplit::mask", mutates_args=())
def mask(x: Tensor, r: Tensor) -> Tensor:
    return x + r


@mask.register_fake
def _(x: Tensor, r: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("teesplit::unmask", mutates_args=())
def unmask(y: Tensor, c: Tensor) -> Tensor:
    return y - c


@unmask.register_fake
def _(y: Tensor, c: Tensor) -> Tensor:
    return torch.empty_like(y)


def quantize(x: Tensor, frac_bits: int) -> Tensor:
    """Fixed point: ``round(x * 2**frac_bits)`` as int64 (the scaling is exact in float64)."""
    return torch.round(x.to(torch.float64) * float(2**frac_bits)).to(torch.int64)


def dequantize(q: Tensor, frac_bits: int) -> Tensor:
    return (q.to(torch.float64) / float(2**frac_bits)).to(torch.float32)


def lift(q: Tensor, prime: int) -> Tensor:
    """Residues in ``[0, prime)`` to signed integers in ``(-prime/2, prime/2]``."""
    return torch.where(q > prime // 2, q - prime, q)


@torch.library.custom_op("teesplit::field_mask", mutates_args=())
def field_mask(x: Tensor, r: Tensor, frac_bits: int, prime: int) -> Tensor:
    return torch.remainder(quantize(x, frac_bits) + r, prime)


@field_mask.register_fake
def _(x: Tensor, r: Tensor, frac_bits: int, prime: int) -> Tensor:
    return torch.empty_like(x, dtype=torch.int64)


@torch.library.custom_op("teesplit::field_unmask", mutates_args=())
def field_unmask(y: Tensor, c: Tensor, frac_bits: int, prime: int) -> Tensor:
    return dequantize(lift(torch.remainder(y - c, prime), prime), frac_bits)


@field_unmask.register_fake
def _(y: Tensor, c: Tensor, frac_bits: int, prime: int) -> Tensor:
    return torch.empty_like(y, dtype=torch.float32)


PRIME = (1 << 61) - 1  # a Mersenne prime: multiplying by a power of two is a rotation
LIMB_BITS = 31


def mul_pow2_mod(a: Tensor, k: int) -> Tensor:
    """``a * 2**k mod PRIME`` for residues ``a`` in ``[0, PRIME)`` and ``0 <= k < 61``."""
    low = (a & ((1 << (61 - k)) - 1)) << k
    total = low + (a >> (61 - k))  # < 2**62: no overflow
    return torch.where(total >= PRIME, total - PRIME, total)


@torch.library.custom_op("teesplit::field_linear", mutates_args=())
def field_linear(x: Tensor, w: Tensor, b: Tensor | None, prime: int) -> Tensor:
    if prime != PRIME:
        raise ValueError(f"field_linear works modulo 2**61 - 1, got prime={prime}")
    wt = w.t()
    high = torch.remainder(torch.matmul(x >> LIMB_BITS, wt), prime)
    low = torch.remainder(torch.matmul(x & ((1 << LIMB_BITS) - 1), wt), prime)
    out = mul_pow2_mod(high, LIMB_BITS) + low
    if b is not None:
        out = out + b
    return torch.remainder(out, prime)


@field_linear.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None, prime: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("teesplit::field_add", mutates_args=())
def field_add(a: Tensor, b: Tensor, prime: int) -> Tensor:
    return torch.remainder(a + b, prime)


@field_add.register_fake
def _(a: Tensor, b: Tensor, prime: int) -> Tensor:
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)


@torch.library.custom_op("teesplit::rnm", mutates_args=())
def rnm(ids: Tensor, candidates: Tensor, scores: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    cand = candidates[ids]  # (..., K); padding slots hold -inf scores and are never chosen
    noisy = scores[ids].to(noise.dtype) + noise
    pick = cand.gather(-1, noisy.argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(keep[ids], ids, pick)


@rnm.register_fake
def _(ids: Tensor, candidates: Tensor, scores: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    return torch.empty_like(ids)


OPS = torch.ops.teesplit
