"""Randomness for masks, Freivalds vectors and RNM noise: a CSPRNG, never torch's generator.

:class:`CSPRNG` expands a 256-bit key with SHAKE-256 (an extendable-output hash, so the stream is
a cryptographic pseudo-random generator). The key comes from ``os.urandom``; a fixed ``seed`` is
for tests only and is hashed into the key. Each draw uses a fresh counter, so no output is ever
reused. torch's global generator is never touched: seeding it elsewhere cannot predict a mask.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


class CSPRNG:
    """SHAKE-256 keystream; ``seed=None`` (the default) keys it from the OS."""

    def __init__(self, seed: int | str | bytes | None = None) -> None:
        if seed is None:
            self._key = os.urandom(32)
        else:
            raw = seed if isinstance(seed, bytes) else repr(seed).encode()
            self._key = hashlib.sha256(b"teesplit-test-seed:" + raw).digest()
        self._counter = 0
        self.seeded = seed is not None

    def bytes(self, n: int) -> bytes:
        block = hashlib.shake_256(self._key + self._counter.to_bytes(16, "little")).digest(n)
        self._counter += 1
        return block

    def _uint64(self, numel: int) -> np.ndarray:
        return np.frombuffer(self.bytes(8 * numel), dtype=np.uint64)

    def uniform(self, shape: list[int] | tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """float32 uniform on [low, high) from 53 random bits per element."""
        numel = int(np.prod(shape, dtype=np.int64))
        unit = (self._uint64(numel) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        out = low + (high - low) * unit
        return torch.from_numpy(out.astype(np.float32)).reshape(shape)

    def normal(self, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
        """float32 standard normal (Box-Muller on two uniform draws)."""
        numel = int(np.prod(shape, dtype=np.int64))
        u1 = ((self._uint64(numel) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        u2 = (self._uint64(numel) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return torch.from_numpy(z.astype(np.float32)).reshape(shape)

    def field(self, shape: list[int] | tuple[int, ...], prime: int) -> torch.Tensor:
        """int64 uniform on [0, prime) by rejection sampling, so the pad is exactly uniform."""
        numel = int(np.prod(shape, dtype=np.int64))
        bits = int(prime - 1).bit_length()
        limit = np.uint64(1 << bits)
        out = np.empty(0, dtype=np.uint64)
        while out.size < numel:  # each round keeps more than half the draws
            draw = self._uint64(2 * (numel - out.size) + 8) % limit
            out = np.concatenate([out, draw[draw < np.uint64(prime)]])
        return torch.from_numpy(out[:numel].astype(np.int64)).reshape(shape)

    def laplace(self, shape: list[int] | tuple[int, ...], scale: float) -> torch.Tensor:
        """float64 Laplace(0, scale) by inverting the CDF of a uniform draw on (-1/2, 1/2)."""
        numel = int(np.prod(shape, dtype=np.int64))
        u = ((self._uint64(numel) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53 - 0.5
        out = -scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
        return torch.from_numpy(out).reshape(shape)
