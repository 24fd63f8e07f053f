"""The mask pool: pads, RNM noise and precomputable corrections, drawn ahead of requests.

Reads a :class:`~partitioner.plan.Protection`; writes nothing. A :class:`MaskSet` holds, for one
request at one shape binding, a fresh pad for every masked value, RNM noise for the token input,
and the correction of every stage whose correction depends on the pads alone (Slalom's ``W·r``),
so a request's online cost is one add per masked value and one subtract per unmasked one.
Each set is handed out once (``take`` pops it): a pad is never reused. A request whose shapes
have no precomputed set draws one on the spot and counts a ``miss``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from enclave_runtime import integrity
from enclave_runtime.randomness import CSPRNG
from partitioner.dims import concrete_shape
from partitioner.plan import Protection

Binding = tuple[tuple[str, int], ...]


@dataclass
class MaskSet:
    pads: dict[str, torch.Tensor] = field(default_factory=dict)
    noise: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    freivalds: dict[str, dict[str, Any]] = field(default_factory=dict)


class MaskPool:
    """Precomputed :class:`MaskSet` objects per shape binding."""

    def __init__(self, protection: Protection, rng: CSPRNG | None = None) -> None:
        self.protection = protection
        self.rng = rng or CSPRNG()
        self._sets: dict[Binding, deque[MaskSet]] = {}
        self.misses = 0
        self.drawn = 0
        # exact masking checks with one secret vector per executor (integrity.RingCheck),
        # float masks with vectors drawn per mask set
        self._checks = (
            {}
            if protection.exact is not None
            else {
                name: integrity.FreivaldsStage(protection.corrections[name], module, outputs)
                for name, (module, outputs) in protection.freivalds.items()
            }
        )

    @staticmethod
    def key(binding: Mapping[str, int]) -> Binding:
        return tuple(sorted((str(s), int(v)) for s, v in binding.items()))

    def draw(self, binding: Mapping[str, int]) -> MaskSet:
        prot = self.protection
        out = MaskSet()
        for name, (shape_spec, dtype) in prot.masked.items():
            shape = concrete_shape(shape_spec, binding)
            if prot.exact is not None:
                out.pads[name] = self.rng.ring(shape, getattr(torch, dtype))
            else:
                scale = prot.mask_scale
                out.pads[name] = self.rng.uniform(shape, -scale, scale).to(getattr(torch, dtype))
        if prot.rnm is not None:
            site = prot.rnm
            shape = [*concrete_shape(prot.token_shape, binding), site.candidates]
            out.noise[site.token_input] = self.rng.laplace(shape, site.noise_scale)
        deltas: dict[str, torch.Tensor] = dict(out.pads)
        for stage in prot.pooled:
            corr = prot.corrections[stage]
            results = corr.module(*(deltas[n] for n in corr.delta_inputs))
            deltas.update(zip(corr.delta_outputs, results, strict=True))
            out.deltas.update(zip(corr.delta_outputs, results, strict=True))
        for name, check in self._checks.items():
            corr = check.corr
            out.freivalds[name] = check.draw(
                [deltas[n] for n in corr.delta_inputs],
                [deltas[n] for n in corr.delta_outputs],
                self.rng,
            )
        self.drawn += 1
        return out

    def fill(self, binding: Mapping[str, int], count: int) -> None:
        queue = self._sets.setdefault(self.key(binding), deque())
        with torch.no_grad():
            for _ in range(count):
                queue.append(self.draw(binding))

    def take(self, binding: Mapping[str, int]) -> MaskSet:
        queue = self._sets.get(self.key(binding))
        if queue:
            return queue.popleft()
        self.misses += 1
        return self.draw(binding)

    def available(self, binding: Mapping[str, int]) -> int:
        return len(self._sets.get(self.key(binding), ()))
