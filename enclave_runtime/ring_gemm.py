"""The mask pool's corrections ``W·[r_1 … r_B] mod 2**32`` as int8 GEMMs.

Reads a correction module made of ``teesplit::ring_linear`` layers alone (what
:meth:`enclave_runtime.pool.MaskPool._batchable` accepts); writes nothing. Guarantees: a
:class:`PackedCorrection` returns what the module returns, bit for bit
(``tests/test_ring_gemm.py``), or raises; :func:`packed` gives ``None`` where it cannot
(no oneDNN int8 matmul in this torch, the native recombination not built, a big-endian host,
a graph with anything but ring layers), and the pool then runs the float64 GEMM as before.

How: a pad ``u`` (int32) is four bytes ``b_i``; as signed digits ``d_i = b_i - 128`` (the
bytes with their top bit flipped), ``u ≡ Σ 256^i d_i + 0x80808080`` (mod ``2**32``). The integer
weights (12 bits, the exact pass's) are split once into ``D`` balanced digits ``w_j`` of ``s``
bits, ``w = Σ 2^{s j} w_j``, with ``D`` the fewest for which every digit is at most 64 in
magnitude and every row's digit sum is exact in the matmul's float32 output:
``128 · Σ_k |w_jk| <= 2**24``. The four byte rows of the pads are stacked as rows and the ``D``
digits as output columns, so one oneDNN int8 matmul (s8 x s8; AMX or VNNI where the CPU has
them) computes every ``d_i · w_jᵀ``; the native ``recombine`` folds them with their shifts
``8 i + s j`` (those ≥ 32 vanish) and ``0x80808080 · Σ w + b`` in wrapping 32-bit arithmetic.

Why signed digits and those bounds (found by an adversarial review, each a test in
``tests/test_ring_gemm.py``): with unsigned bytes and oneDNN's zero point, its AMX kernel
rounded the unsigned sum (up to ``255 · Σ|w|``) to float32 before subtracting the zero point's
share, so a bound on the signed sum did not make the output exact; and without VNNI, oneDNN's
u8 x s8 instruction adds pairs of products into saturating int16, which a digit above 64 can
overflow. The tests force every instruction-set level oneDNN may pick (``ONEDNN_MAX_CPU_ISA``).
On the development CPU (AMX) this is 1.1–4.2× the float64 GEMM at SmolLM2's and Llama-2-7B's
shapes (``benchmarks/ring_pool.py``).
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch

from enclave_runtime import native_modules
from partitioner.ops import OPS, op_name

_native = native_modules.load("teesplit_ring_gemm")
_BOUND = 2**24  # float32 holds every integer of magnitude up to here exactly
_DIGIT = 64  # the largest weight digit: without VNNI, 2 · 255 · 64 < 2**15 (int16 pair sums)
_OFFSET = 0x80808080  # Σ 128 · 256^i: what the pads' bytes lose as signed digits


def _qlinear() -> Any:
    try:
        return torch.ops.onednn.qlinear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_QLINEAR = _qlinear()


def available() -> bool:
    """Whether this process can run the int8 path (module docstring)."""
    return (
        _native is not None
        and hasattr(_native, "byte_planes")  # a library built before it: the float64 path
        and _QLINEAR is not None
        and sys.byteorder == "little"
    )


def weight_digits(w: torch.Tensor) -> tuple[int, list[torch.Tensor]] | None:
    """``(s, [w_0 … w_{D-1}])`` with ``w = Σ 2^{s j} w_j`` exactly, every digit at most 64 in
    magnitude and every row's ``128 · Σ_k |w_jk| <= 2**24``, for the fewest digits ``D`` (at
    most 4); ``None`` where no such split exists (rows too long or too large, or none)."""
    if not w.numel():
        return None
    # int32 arithmetic for int8/int16 weights (half the memory traffic of int64: packing
    # SmolLM2's 49152 x 576 output layer took 1.5 s in int64, in the first request's path)
    t = w.to(torch.int32 if w.dtype in (torch.int8, torch.int16) else torch.int64)
    top = int(t.abs().max())
    for count in range(1, 5):
        bits = -(-(top.bit_length() + 1) // count)
        # a balanced digit of b bits is at most 2**(b-1): fewer digits than these cannot fit
        if top > _DIGIT and bits > 7:
            continue
        if count == 1:
            bits, digits = 0, [t]
        else:
            half = 1 << (bits - 1)
            digits, rest = [], t
            for _ in range(count - 1):
                digit = ((rest + half) & ((1 << bits) - 1)) - half
                digits.append(digit)
                rest = (rest - digit) >> bits
            digits.append(rest)  # the top digit keeps what is left, sign included
        largest = max(int(d.abs().max()) for d in digits)
        row_sum = max(int(d.abs().sum(1).max()) for d in digits)
        if largest <= _DIGIT and 128 * row_sum <= _BOUND:
            return bits, [d.to(torch.int8) for d in digits]
    return None


class PackedLinear:
    """``ring_linear(u, w, b, carry)`` for int32 ``u`` on the CPU as int8 matmuls and native
    recombinations (module docstring), ``block`` output columns at a time so that a block's
    products stay in cache between the two; weights split and packed once, here."""

    block = 512  # columns: at 64 to 512 pad rows, about the fastest measured (stop 51)

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, carry: bool) -> None:
        self.cols, self.fan_in = w.shape
        split = weight_digits(w)
        if split is None:
            raise ValueError(f"no int8 digits of a {tuple(w.shape)} weight are exact")
        bits, digits = split
        self.digits = len(digits)
        self.shifts = [8 * i + bits * j for i in range(4) for j in range(self.digits)]
        corr = _OFFSET * w.to(torch.int64).sum(1)
        if b is not None:
            corr = corr + b.to(torch.int64)
        corr &= 0xFFFFFFFF
        self.carry = carry
        self.blocks = []
        for start in range(0, self.cols, self.block):
            stop = min(start + self.block, self.cols)
            width = self.digits * (stop - start)
            stacked = torch.cat([d[start:stop] for d in digits])
            self.blocks.append((
                start,
                torch.ops.onednn.qlinear_prepack(stacked, None),
                torch.ones(width),
                torch.zeros(width, dtype=torch.int64),
                corr[start:stop].contiguous(),
            ))  # fmt: skip

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if u.dtype != torch.int32 or u.device.type != "cpu":
            raise TypeError(f"int32 CPU pads expected, got {u.dtype} on {u.device}")
        width = u.shape[-1] - int(self.carry)
        if width != self.fan_in:
            raise ValueError(f"pads of width {width} for a fan-in of {self.fan_in}")
        # whole rows (a view of contiguous pads): the planes read the first fan_in of each
        rows = u.reshape(-1, u.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        count = rows.shape[0]
        out = torch.empty((count, self.cols + int(self.carry)), dtype=torch.int32)
        if self.carry:  # the row's masked scale exponent passes through, as in ring_linear
            out[:, -1] = rows[:, -1]
        # the pads' bytes, least significant first, top bit flipped: signed digits b - 128,
        # as four stacked row blocks
        stacked = torch.empty((4 * count, self.fan_in), dtype=torch.int8)
        _native.byte_planes(rows, stacked)
        for start, weights, scale, zero, corr in self.blocks:
            products = _QLINEAR(
                stacked, 1.0, 0, weights, scale, zero, None,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
            _native.recombine(products.contiguous(), self.shifts, corr, out, start)
        return out.reshape(*u.shape[:-1], out.shape[-1])


class PackedCorrection:
    """A correction module (``ring_linear`` layers of its inputs, nothing else) run through
    :class:`PackedLinear` layers; a layer no int8 digits fit keeps ``ring_linear`` over its
    weights made float64 once."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        self._steps: list[tuple[str, Any, tuple[str, ...]]] = []
        self._output: tuple[str, ...] = ()
        for node in module.graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val")
                if isinstance(value, torch.Tensor) and value.dtype != torch.int32:
                    # Z_{2^64} pads (a value a product reads too): the float64 path's
                    raise ValueError(f"{node.name} is {value.dtype}, not int32 pads")
                self._steps.append((node.name, None, ()))
            elif node.op == "get_attr":
                continue
            elif node.op == "call_function" and op_name(node) == "ring_linear":
                u, w = node.args[0], node.args[1]
                b = node.args[2] if len(node.args) > 2 else node.kwargs.get("b")
                carry = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("carry"))
                weight = operator.attrgetter(w.target)(module)
                bias = None if b is None else operator.attrgetter(b.target)(module)
                try:
                    layer: Any = PackedLinear(weight, bias, carry)
                except ValueError:  # no exact digits (a fan-in over 2**17)
                    layer = _Float64Layer(weight.to(torch.float64), bias, carry)
                self._steps.append((node.name, layer, (u.name,)))
            elif node.op == "output":
                outputs = node.args[0]
                if not isinstance(outputs, (tuple, list)) or not all(
                    isinstance(o, torch.fx.Node) for o in outputs
                ):
                    raise ValueError(f"output {outputs!r} is not a tuple of values")
                self._output = tuple(o.name for o in outputs)
            else:
                raise ValueError(f"{node.name} ({node.op} {node.target}) is not a ring layer")

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        places = sum(layer is None for _, layer, _ in self._steps)
        if len(inputs) != places:
            raise TypeError(f"{len(inputs)} inputs for a correction of {places}")
        env: dict[str, torch.Tensor] = {}
        feed = iter(inputs)
        for name, layer, args in self._steps:
            env[name] = next(feed) if layer is None else layer(env[args[0]])
        return tuple(env[name] for name in self._output)


class _Float64Layer:
    def __init__(self, w64: torch.Tensor, b: torch.Tensor | None, carry: bool) -> None:
        self.w64, self.b, self.carry = w64, b, carry

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return OPS.ring_linear.default(u, self.w64, self.b, self.carry)


def packed(module: Any) -> PackedCorrection | None:
    """``module`` as a :class:`PackedCorrection`, or ``None`` (module docstring)."""
    if not available() or not isinstance(module, torch.fx.GraphModule):
        return None
    try:
        return PackedCorrection(module)
    except ValueError:
        return None
