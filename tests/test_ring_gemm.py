"""The mask pool's int8 corrections (enclave_runtime.ring_gemm): bit for bit ring_linear's,
at the edges of their exactness bound, and refusing what breaks it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enclave_runtime import ring_gemm
from enclave_runtime.ring_gemm import PackedCorrection, PackedLinear, weight_digits
from partitioner.ops import OPS

RING = OPS.ring_linear.default


def _pads(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-(2**31), 2**31, (rows, width), generator=g, dtype=torch.int64)
    u = u.to(torch.int32)
    # every byte 0xff, every byte 0, and the two ends of the ring
    u[0], u[1], u[2], u[3] = -1, 0, 2**31 - 1, -(2**31)
    return u


def test_the_install_builds_the_int8_path():
    # make builds the native recombination; without it the pool silently ran float64
    assert ring_gemm.available()


@pytest.mark.parametrize(
    ("out", "fan_in", "largest", "digits"),
    [
        (48, 64, 64, 1),  # weights within a digit's bound: one digit
        (48, 64, 127, 2),  # int8 weights past it: two (no VNNI: int16 pair sums saturate)
        (96, 576, 2047, 2),  # SmolLM2's 12-bit weights
        (40, 1531, 2047, 2),  # a fan-in no multiple of anything
        (24, 5000, 2047, 3),  # past 4096, two 6-bit digits would not be exact
        (520, 80, 2047, 2),  # more columns than one block
    ],
)
def test_packed_layer_equals_ring_linear_bit_for_bit(out, fan_in, largest, digits):
    g = torch.Generator().manual_seed(out * fan_in)
    w = torch.randint(-largest, largest + 1, (out, fan_in), generator=g, dtype=torch.int16)
    w[0], w[1] = largest, -largest
    u = _pads(9, fan_in, fan_in)
    layer = PackedLinear(w, None, False)
    assert layer.digits == digits
    assert torch.equal(layer(u), RING(u, w, None))
    assert torch.equal(layer(u.view(3, 3, fan_in)), RING(u, w, None).view(3, 3, out))


def test_packed_layer_at_the_exactness_bound():
    """A digit product's sum reaches 2**24 exactly: the pads' bytes all 0 (signed digits -128)
    against weights all 32 (one digit), at a fan-in of 4096; and one more unit of weight takes
    a second digit."""
    fan_in = 4096
    w = torch.full((16, fan_in), 32, dtype=torch.int16)
    bits, digits = weight_digits(w)
    assert (bits, [int(d.max()) for d in digits]) == (0, [32])
    assert len(weight_digits(w + 1)[1]) == 2
    assert 128 * 32 * fan_in == 2**24
    u = torch.zeros((4, fan_in), dtype=torch.int32)
    u[1] = -1
    u[2] = torch.randint(-(2**31), 2**31, (fan_in,), dtype=torch.int64).to(torch.int32)
    assert torch.equal(PackedLinear(w, None, False)(u), RING(u, w, None))


def test_an_unsigned_byte_sum_past_float32_does_not_round():
    """The signed digit sums stay within 2**24, but the same bytes read unsigned sum past it,
    to an odd number no float32 holds: a kernel that summed unsigned bytes and turned the sum
    into float32 before taking 128 · Σw off (oneDNN's zero point on AMX did) rounds it. Bytes
    all 0xff, weights all 31, fan-in 4095 (small shapes; the pool's are below)."""
    fan_in = 4095
    w = torch.full((8, fan_in), 31, dtype=torch.int16)
    assert 255 * 31 * fan_in > 2**24 and (255 * 31 * fan_in) % 2 == 1
    layer = PackedLinear(w, None, False)
    assert layer.digits == 1
    u = torch.full((3, fan_in), -1, dtype=torch.int32)
    u[1, ::2] = 0x7F7F7F7F
    assert torch.equal(layer(u), RING(u, w, None))


def test_bias_and_the_carried_scale_column():
    w = torch.randint(-2047, 2048, (33, 70), dtype=torch.int16)
    b = torch.randint(-(2**31), 2**31, (33,), dtype=torch.int64).to(torch.int32)
    u = _pads(6, 71, 3)  # the last column: a row's masked scale exponent
    assert torch.equal(PackedLinear(w, b, True)(u), RING(u, w, b, True))
    assert torch.equal(PackedLinear(w, b, False)(u[:, :70]), RING(u[:, :70], w, b))
    # batched pads (the pool's), and pads whose last dimension is not contiguous
    batched = _pads(12, 71, 4).view(2, 6, 71)
    assert torch.equal(PackedLinear(w, b, True)(batched), RING(batched, w, b, True))
    strided = _pads(71, 6, 5).t()
    assert torch.equal(PackedLinear(w, b, True)(strided), RING(strided, w, b, True))


def test_a_fan_in_no_digits_fit_falls_back_to_float64():
    assert weight_digits(torch.ones((2, 140_000), dtype=torch.int16)) is None
    w = torch.randint(-2047, 2048, (3, 140_000), dtype=torch.int16)
    with pytest.raises(ValueError, match="no int8 digits"):
        PackedLinear(w, None, False)


def test_a_correction_module_runs_packed_and_equals_its_graph():
    class Correction(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w1", torch.randint(-2047, 2048, (20, 30), dtype=torch.int16))
            self.register_buffer("w2", torch.randint(-127, 128, (8, 30), dtype=torch.int8))

        def forward(self, a, b):
            return RING(a, self.w1, None), RING(b, self.w2, None, True)

    module = torch.fx.symbolic_trace(Correction())
    packed = ring_gemm.packed(module)
    assert isinstance(packed, PackedCorrection)
    a, b = _pads(5, 30, 1), _pads(5, 31, 2)
    for got, want in zip(packed(a, b), module(a, b), strict=True):
        assert torch.equal(got, want)

    class NotRing(torch.nn.Module):
        def forward(self, a):
            return (a + 1,)

    assert ring_gemm.packed(torch.fx.symbolic_trace(NotRing())) is None
    with pytest.raises(TypeError, match="1 inputs for a correction of 2"):
        packed(a)


@pytest.mark.parametrize("value", [0.5, 2.0**24 + 2, float("nan"), float("inf")])
def test_recombination_refuses_a_product_outside_the_bound(value):
    """The GEMM's float32 products are exact integers of magnitude <= 2**24 by construction;
    one that is not (a broken bound, a changed library) must raise, not wrap silently."""
    products = torch.zeros((8, 6))
    products[5, 4] = value
    out = torch.empty((2, 3), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not an integer within"):
        ring_gemm._native.recombine(products, [0, 6] * 4, torch.zeros(3, dtype=torch.int64), out, 0)


def test_recombination_refuses_shapes_it_was_not_built_for():
    out = torch.empty((2, 3), dtype=torch.int32)
    corr = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="rows"):
        ring_gemm._native.recombine(torch.zeros((4, 6)), [0, 6] * 4, corr, out, 0)
    with pytest.raises(RuntimeError, match="outside"):
        ring_gemm._native.recombine(torch.zeros((8, 6)), [0, 6] * 4, corr, out, 1)
    with pytest.raises(RuntimeError, match="shifts"):
        ring_gemm._native.recombine(torch.zeros((8, 6)), [0] * 4, corr, out, 0)
    pads = torch.zeros((2, 5), dtype=torch.int32)
    for planes in (torch.empty((8, 6), dtype=torch.int8), torch.empty((6, 5), dtype=torch.int8)):
        with pytest.raises(RuntimeError, match="byte_planes"):
            ring_gemm._native.byte_planes(pads, planes)
    with pytest.raises(RuntimeError, match="byte_planes"):
        ring_gemm._native.byte_planes(pads.t(), torch.empty((20, 2), dtype=torch.int8))


def test_one_signed_digit_rows_at_the_pools_shapes():
    """A reviewer's attack: oneDNN's AMX kernel rounded its unsigned-byte sum to float32 before
    subtracting the zero point, at the pool's shapes (64 and more rows, 24 and more columns),
    where the tests' small shapes took another kernel. Inside the exact pass's own weight range
    (fan-in 4096, |w| <= 1024): a row of 992s (low digit -32) and one 993, over random pads."""
    fan_in = 4096
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-1024, 1025, (32, fan_in), generator=g, dtype=torch.int16)
    w[0] = 992
    w[0, 1] = 993
    w[1] = -33 * 32 - 33  # both digits at one sign
    u = torch.randint(-(2**31), 2**31, (256, fan_in), generator=g, dtype=torch.int64)
    u = u.to(torch.int32)
    u[0] = -1
    assert torch.equal(PackedLinear(w, None, False)(u), RING(u, w, None))


def test_constant_rows_with_extreme_pads_at_the_pools_shapes():
    for fan_in, value in [(2047, -33), (2047, 33), (4095, 31), (1000, 64)]:
        w = torch.full((40, fan_in), value, dtype=torch.int16)
        w[1] = -value
        u = torch.full((64, fan_in), -1, dtype=torch.int32)  # every byte 0xff
        u[1] = 0
        u[2] = 0x7F7F7F7F
        u[3, ::2] = -(2**31)
        assert torch.equal(PackedLinear(w, None, False)(u), RING(u, w, None)), (fan_in, value)


_ISA_CHECK = """
import torch
from enclave_runtime.ring_gemm import PackedLinear
from partitioner.ops import OPS
bad = []
for fan_in, value in [(2048, 64), (2047, -33), (4096, 32), (300, 127)]:
    w = torch.full((40, fan_in), value, dtype=torch.int16)
    w[1] = -value
    w[2, ::2] = -value
    u = torch.full((64, fan_in), -1, dtype=torch.int32)
    u[1] = 0
    u[2] = 0x7F7F7F7F
    u[3] = torch.randint(-(2**31), 2**31, (fan_in,), dtype=torch.int64).to(torch.int32)
    if not torch.equal(PackedLinear(w, None, False)(u), OPS.ring_linear.default(u, w, None)):
        bad.append((fan_in, value))
print("BAD", bad) if bad else print("OK")
"""


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE", "AVX2_VNNI", "AVX512_CORE_VNNI", "ALL"])
def test_exact_on_every_instruction_set_onednn_may_pick(isa):
    """oneDNN picks its int8 kernel by the CPU: without VNNI its u8 x s8 pairs saturate int16
    sums (a digit above 64 was wrong there), and kernels differ in where they turn int32 into
    float32. Each level is forced with ONEDNN_MAX_CPU_ISA (a level this CPU lacks runs as its
    best below), at digits and sums at their bounds."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "OK"
