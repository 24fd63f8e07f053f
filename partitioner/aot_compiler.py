"""How the compiler calls AOTInductor: one function, shared by the stage libraries
(``partitioner.aot``) and the step library (``partitioner.aot_step``).

Pass: reads an exported program and example inputs; writes a ``.so`` (and, for a program
that calls a custom op, the proxy executor's ``.json`` beside it). Guarantees: the library
computes what Inductor's own code generation computes, bit for bit; only how a full vector
of 32- or 64-bit integers is read from memory, and how an int64 product is computed, differ
(below).

**Full-width integer loads.** Inductor's C++ code reads every vector as
``Vectorized<T>::loadu(ptr, count)``. For ``float`` that call checks ``count == size()``
and issues one unaligned load; for ``int32_t`` and ``int64_t`` (AVX2, ``vec256_int.h``,
also inside ``VectorizedN``) ATen's implementation always fills a stack buffer and
``memcpy``s into it. A masked layer's enclave work is mostly ring arithmetic on int32
and int64, and that round trip made it 3-5x slower than the same arithmetic in eager torch
(``(y - c)`` on a 128 x 1537 int32 reply: 0.38 ms compiled, 0.07 eager, 0.10 compiled
with full loads; measured on the development machine, torch 2.13.0). So while compiling,
a load of a whole vector (not the loop's tail, not a masked load) whose width equals the
loop's tiling is emitted as ``loadu(ptr)``: the same elements, one instruction. Tails and
narrower types keep the counted load.

**Wrapping int64 products.** AVX2 has no 64-bit multiply, and ATen's ``Vectorized<int64_t>``
``operator*`` (``vec256_int.h``) moves each lane to a general register, multiplies there and
moves it back. The Freivalds check a library makes (``partitioner.aot.freivalds``) is int64
products and sums, mod ``2**64``: it was the largest single kernel of a replayed SmolLM2
prefill (~19 % of its samples). So while compiling for AVX2, an int64 vector product is
emitted as three 32 x 32 -> 64-bit multiplies (``_mm256_mul_epu32``): ``a * b mod 2**64 =
lo(a) lo(b) + 2**32 (hi(a) lo(b) + lo(a) hi(b))``, the same bits for every pair of inputs
(two's complement), in 0.28 ms against 0.53 for a 128-row check of one gate/up reply.

**AVX2 everywhere.** Libraries are generated for 256-bit vectors (``cpp.simdlen``) whatever
the compiling CPU offers: the rewrites above are for AVX2, and with 512-bit vectors the
enclave's elementwise stages (unmask, SiLU, norms, mask) ran ~1.3x slower on an AVX-512 CPU.

**Single-threaded code.** Every library is generated for one thread (``cpp.threads``), so
that what it is does not depend on the compiling process's torch threads, which its key
never saw; an enclave's threads still serve the ATen calls a library makes (attention).

Both rewrites are compile-time only; the enclave loads machine code and never imports this
module. On a torch whose code generator lacks a hook replaced here, that rewrite is skipped
and the libraries are as fast as Inductor makes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# what a cached library's key must cover of this module: changing it changes the code
VERSION = "compiler-2:" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def full_vector_loads() -> Iterator[bool]:
    """While open, Inductor's CPU code generator reads whole 32/64-bit vectors with one
    unaligned load (see the module docstring). Yields whether the rewrite is in place."""
    try:
        from torch._inductor.codegen import cpp
        from torch._inductor.codegen.cpp_utils import cexpr_index

        kernel = cpp.CppVecKernel
        original = kernel._get_vec_load_line
    except (ImportError, AttributeError):
        yield False
        return

    def load_line(
        self: Any, var: str, index: Any, dtype: torch.dtype, load_mask: Any = None
    ) -> str:
        line = original(self, var, index, dtype, load_mask)
        if load_mask is not None or self.tail_size is not None or dtype == torch.bool:
            return line
        if dtype.itemsize not in (4, 8):
            return line
        # only when the vector type holds exactly the elements the loop reads: never more
        lanes = self._get_num_vectors(dtype) * self.vec_isa.bit_width() // (8 * dtype.itemsize)
        suffix = f", {cexpr_index(self.num_elems)})"
        if lanes != self.num_elems or not line.endswith(suffix):
            return line
        return line[: -len(suffix)] + ")"

    kernel._get_vec_load_line = load_line
    try:
        yield True
    finally:
        kernel._get_vec_load_line = original


# One vector of the product (above), applied to each vector of a VectorizedN: on AVX2 an
# int64 loop is tiled at least 8 wide, so its values are always VectorizedN<int64_t, N >= 2
# (any other operand fails to compile, and the stage stays eager: slower, never wrong).
# Written as an expression: Inductor gives an override no place for a helper.
_MUL64 = (
    "([](auto x, auto y) {{"
    " auto lane = [](at::vec::Vectorized<int64_t> a, at::vec::Vectorized<int64_t> b)"
    " -> at::vec::Vectorized<int64_t> {{"
    " __m256i u = a, v = b;"
    " __m256i cross = _mm256_add_epi64("
    "_mm256_mul_epu32(_mm256_srli_epi64(u, 32), v), _mm256_mul_epu32(u, _mm256_srli_epi64(v, 32)));"
    " return _mm256_add_epi64(_mm256_mul_epu32(u, v), _mm256_slli_epi64(cross, 32)); }};"
    " return x.binary_op(y, lane); }})({a}, {b})"
)


@contextlib.contextmanager
def wrapping_int64_products() -> Iterator[bool]:
    """While open, Inductor's CPU code generator emits an int64 vector product as 32-bit
    multiplies when it compiles for AVX2 (see the module docstring). Yields whether the
    rewrite is in place: not for another instruction set, whose ATen product is native or
    whose vector type this expression does not fit."""
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.codegen import cpp

        overrides = cpp.CppVecOverrides
        original = overrides.__dict__["mul"]
        avx2 = type(cpu_vec_isa.pick_vec_isa()) is cpu_vec_isa.VecAVX2
    except (ImportError, AttributeError, KeyError):
        yield False
        return
    if not avx2:
        yield False
        return

    def mul(a: Any, b: Any) -> str:
        if getattr(a, "dtype", None) == torch.int64 and getattr(b, "dtype", None) == torch.int64:
            return _MUL64.format(a=a, b=b)
        return original.__func__(a, b)

    overrides.mul = staticmethod(mul)
    try:
        yield True
    finally:
        overrides.mul = original


# Both rewrites patch Inductor's classes, which every thread shares: a compile in one thread
# must not restore the originals under another's, nor run unpatched beside one patched
_REWRITING = threading.RLock()


# the vector width every library is generated for (the module docstring: AVX2 everywhere),
# set by `rewrites` around each compile: on a CPU with AVX-512 and AMX, where Inductor picks
# 512-bit vectors, a SmolLM2 `slalom` prefill's 121 stage libraries took 131-140 ms replayed,
# against 104 ms at 256 bits (paired with all_enclave, 1.48-1.52x against 2.04-2.05x; decode
# even)
SIMDLEN = 256


@contextlib.contextmanager
def rewrites() -> Iterator[None]:
    """Both compile-time rewrites of this module, for one compile (one at a time), with
    Inductor set to :data:`SIMDLEN` first: each rewrite decides from the instruction set
    Inductor will compile for whether it applies."""
    from torch._inductor import config

    with (
        _REWRITING,
        config.patch({"cpp.simdlen": SIMDLEN}),
        full_vector_loads(),
        wrapping_int64_products(),
    ):
        yield


def _options() -> dict[str, Any]:
    """AOTInductor's options, a fresh dict per compile (Inductor may keep what it is given)."""
    return {
        "aot_inductor.package": False,
        # the library's own input checks (enabled by enclave_runtime.compiled) must take a
        # decode step's seq = 1: export's example sizes start at 2
        "aot_inductor.check_lowerbound": False,
        # single-threaded code, whatever the compiling process's torch threads: Inductor
        # otherwise generates OpenMP regions sized for that count (an ambient setting the
        # library's key never saw, so the first compile's count won for every later use),
        # and a region costs a decode step's small kernels more than it gives them (a
        # SmolLM2 `slalom` stage library, hot: 20.0 us a call without, 23.7 us with, at
        # one enclave thread)
        "cpp.threads": 1,
        "cpp.dynamic_threads": False,  # else its environment variable brings regions back
        # Inductor's graph cache keys on its config, which does not see the rewrite above:
        # this entry (metadata the library carries, read by nothing) puts it in the key, so
        # a graph compiled without the rewrite is never reused for one compiled with it
        "aot_inductor.metadata": {"teesplit.compiler": VERSION},
    }


def compile_exported(
    ep: torch.export.ExportedProgram, args: tuple[Any, ...], path: Path, calls: bool = False
) -> Path:
    """Compile ``ep`` (exported from ``args``) with AOTInductor to ``path``. ``calls``: the
    program calls a custom op, and the proxy executor's call list Inductor writes beside
    the library is copied to ``path`` with ``.json`` (the runner reads it from there).
    Returns ``path``."""
    import torch._inductor

    with rewrites():
        built = Path(torch._inductor.aot_compile(ep.module(), args, options=_options()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if calls:
        shutil.copyfile(built.with_suffix(".json"), path.with_suffix(".json"))
    shutil.copyfile(built, path)
    return path
