"""Randomness for masks, Freivalds vectors and RNM noise: a CSPRNG, never torch's generator.

:class:`CSPRNG` expands a 256-bit key with AES-256 in counter mode (``cryptography``, AES-NI:
gigabytes a second, where a mask set for a 128-token prefill takes tens of megabytes). Draw
``i`` starts at counter block ``i * 2**64``, so no keystream block is ever used twice. The key
comes from ``os.urandom``; a fixed ``seed`` is for tests only and is hashed into the key.
torch's global generator is never touched: seeding it elsewhere cannot predict a mask.
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class CSPRNG:
    """AES-256-CTR keystream; ``seed=None`` (the default) keys it from the OS."""

    def __init__(self, seed: int | str | bytes | None = None) -> None:
        if seed is None:
            self._key = os.urandom(32)
        else:
            raw = seed if isinstance(seed, bytes) else repr(seed).encode()
            self._key = hashlib.sha256(b"teesplit-test-seed:" + raw).digest()
        self._counter = 0
        self._lock = threading.Lock()
        self.seeded = seed is not None

    def bytes(self, n: int) -> bytes:
        return self._keystream(n).numpy().tobytes()

    def _keystream(self, n: int) -> torch.Tensor:
        """``n`` keystream bytes as a uint8 tensor, written in place (no intermediate copies)."""
        with self._lock:  # two threads (the pool's refill, a check's redraw) never share a block
            start = (self._counter << 64).to_bytes(16, "big")
            self._counter += 1
        encryptor = Cipher(algorithms.AES(self._key), modes.CTR(start)).encryptor()
        out = torch.empty(n + 15, dtype=torch.uint8)  # update_into wants a block of slack
        written = encryptor.update_into(bytes(n), out.numpy())
        if written != n:
            raise RuntimeError(f"AES-CTR wrote {written} of {n} keystream bytes")
        return out[:n]

    def ring(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uniform over the whole ring of ``dtype`` (int32: ``Z_{2^32}``, int64: ``Z_{2^64}``;
        uint8: bytes a caller slices into pads of several rings): every bit pattern is equally
        likely, so a pad hides any value exactly."""
        numel = int(np.prod(shape, dtype=np.int64))
        return self._keystream(dtype.itemsize * numel).view(dtype).reshape(shape)

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

    def laplace(self, shape: list[int] | tuple[int, ...], scale: float) -> torch.Tensor:
        """float64 Laplace(0, scale) by inverting the CDF of a uniform draw on (-1/2, 1/2)."""
        numel = int(np.prod(shape, dtype=np.int64))
        u = ((self._uint64(numel) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53 - 0.5
        out = -scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
        return torch.from_numpy(out).reshape(shape)
