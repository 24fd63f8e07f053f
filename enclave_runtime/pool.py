"""The mask pool: pads, RNM noise and precomputable corrections, drawn ahead of requests.

Reads a :class:`~partitioner.plan.Protection`; writes nothing. A :class:`MaskSet` holds, for one
request at one shape binding, a fresh pad for every masked value, RNM noise for the token input,
and the correction of every stage whose correction depends on the pads alone (Slalom's ``W·r``),
so a request's online cost is one add per masked value and one subtract per unmasked one.
Each set is handed out once (``take`` pops it): a pad is never reused. A request whose shapes
have no precomputed set draws one on the spot and counts a ``miss``. ``fill`` draws sets in
batches (the corrections of a batch are one GEMM per layer); ``refill_in_background`` keeps a
binding stocked from a thread while requests are served.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from enclave_runtime import integrity, ring_gemm
from enclave_runtime.randomness import CSPRNG
from partitioner.dims import concrete_shape, names_in
from partitioner.ops import OPS, prepare_ring_weights
from partitioner.plan import Protection

Binding = tuple[tuple[str, int], ...]


@dataclass
class MaskSet:
    pads: dict[str, torch.Tensor] = field(default_factory=dict)
    noise: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    freivalds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # exact masking: numpy views of the pads and precomputed corrections (the same memory),
    # which the Freivalds checks read; made once per batch here rather than per check online
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _split(result: torch.Tensor, count: int) -> list[tuple[torch.Tensor, np.ndarray]]:
    """A batched correction's rows back per set: each a tensor and its numpy view."""
    rows = result.shape[0] // count
    # views made in C (split, and iterating a reshaped array), not sliced one by one: a
    # decode fill splits ~200 results into 64 sets each
    arrays = result.numpy().reshape(count, rows, *result.shape[1:])
    return list(zip(result.unflatten(0, (count, rows)).unbind(0), arrays, strict=True))


class MaskPool:
    """Precomputed :class:`MaskSet` objects per shape binding."""

    def __init__(self, protection: Protection, rng: CSPRNG | None = None) -> None:
        self.protection = protection
        self.rng = rng or CSPRNG()
        self._sets: dict[Binding, deque[MaskSet]] = {}
        self._modules: dict[tuple[str, bool], Any] = {}
        self._ring_only: dict[str, bool] = {}  # stage -> _batchable's answer (the plan's)
        self._layouts: dict[Binding, tuple[list[Any], int]] = {}
        shapes = [shape for shape, _ in protection.masked.values()]
        if protection.rnm is not None and protection.token_shape is not None:
            shapes.append(protection.token_shape)
        self._dims = {
            name for shape in shapes for size in shape if isinstance(size, str)
            for name in names_in(size)
        }  # fmt: skip
        self._lock = threading.Lock()  # one draw at a time: the CSPRNG's counter is shared
        self.misses = 0
        self.drawn = 0
        self.rate = 0.0  # sets per second drawn by the background refill
        self.failure: str | None = None  # why the background refill stopped, if it did
        self._taken = threading.Event()
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

    def key(self, binding: Mapping[str, int]) -> Binding:
        """The dims a set depends on: those in its pads' and noise's shapes. A decode step's
        linear-layer inputs do not grow with the cache (``past``), so one set serves a step
        at any context length, and the pool can be filled ahead without knowing it."""
        return tuple(sorted((str(s), int(v)) for s, v in binding.items() if s in self._dims))

    def _prepared(self, stage: str, batched: bool = True) -> Any:
        """A correction module with its integer weights converted once (not per draw). For a
        batch of sets (``batched``) of ring layers alone: int8 digits packed for oneDNN
        (:mod:`enclave_runtime.ring_gemm`, 1.1-4.2x the float64 GEMM here) where this process
        can run them. For one set drawn on the spot, and otherwise: float64. A set drawn on
        the spot is a request waiting, and oneDNN makes its kernels for each new shape at
        first use: `make demo`'s `slalom` answer took 9.9 s with every draw int8 (packing
        and kernels in the request's path), 5.3 s with every draw float64. A batch is the
        background refill's throughput."""
        key = (stage, batched and self._batchable(stage))
        if key not in self._modules:
            module = self.protection.corrections[stage].module
            packed = ring_gemm.packed(module) if key[1] else None
            self._modules[key] = packed or prepare_ring_weights(module)
        return self._modules[key]

    def _batchable(self, stage: str) -> bool:
        """A correction that is ``ring_linear`` layers alone maps each row on its own, so the
        pads of many mask sets go through it as one batch: one GEMM ``W·[r_1 … r_n]``,
        compute-bound, instead of ``n`` memory-bound ones."""
        if stage not in self._ring_only:  # asked per stage on every draw: walk the graph once
            graph = self.protection.corrections[stage].module.graph
            self._ring_only[stage] = all(
                n.op in ("placeholder", "get_attr", "output") or n.target == OPS.ring_linear.default
                for n in graph.nodes
            )
        return self._ring_only[stage]

    def draw(self, binding: Mapping[str, int]) -> MaskSet:
        return self.draw_many(binding, 1)[0]

    def draw_many(self, binding: Mapping[str, int], count: int) -> list[MaskSet]:
        """``count`` fresh mask sets; the corrections of ring-linear stages are computed for
        all of them at once."""
        sets, batched = self._pads(binding, count)
        exact = self.protection.exact is not None  # float masks keep no numpy views
        for stage in self.protection.pooled:
            corr = self.protection.corrections[stage]
            batch = count > 1 and self._batchable(stage)
            module = self._prepared(stage, batched=batch)
            if batch:
                inputs = [
                    batched[n] if n in batched else torch.cat([m.deltas[n] for m in sets])
                    for n in corr.delta_inputs
                ]
                results = [_split(r, count) for r in module(*inputs)]
                per_set = [[r[i] for r in results] for i in range(count)]
            else:
                per_set = [
                    [
                        (t, t.numpy() if exact else None)
                        for t in module(*(m.deltas[n] for n in corr.delta_inputs))
                    ]
                    for m in sets
                ]
            for m, outs in zip(sets, per_set, strict=True):
                for name, (tensor, array) in zip(corr.delta_outputs, outs, strict=True):
                    m.deltas[name] = tensor
                    if array is not None:
                        m.arrays[name] = array
        for m in sets:
            deltas = m.deltas
            m.deltas = {k: v for k, v in deltas.items() if k not in m.pads}
            for name, check in self._checks.items():
                corr = check.corr
                m.freivalds[name] = check.draw(
                    [deltas[n] for n in corr.delta_inputs],
                    [deltas[n] for n in corr.delta_outputs],
                    self.rng,
                )
        self.drawn += count
        return sets

    def _layout(self, binding: Mapping[str, int]) -> tuple[list[Any], int]:
        """Each masked value's shape, dtype, offset and length in bytes in one set (8-byte
        aligned; a batch of ``count`` sets holds the value's pads at ``offset * count``), and
        the set's length in bytes; computed once per key."""
        key = self.key(binding)
        cached = self._layouts.get(key)
        if cached is None:
            entries, offset = [], 0
            for name, (shape_spec, dtype) in self.protection.masked.items():
                shape = concrete_shape(shape_spec, binding)
                dt = getattr(torch, dtype)
                nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
                entries.append((name, shape, dt, offset, nbytes))
                offset += -(-nbytes // 8) * 8
            cached = self._layouts[key] = (entries, offset)
        return cached

    def _pads(
        self, binding: Mapping[str, int], count: int
    ) -> tuple[list[MaskSet], dict[str, torch.Tensor]]:
        """``count`` sets of fresh pads (and RNM noise), and per masked value the ``count``
        pads as one tensor (exact masking), for batched corrections. Exact pads are uniform
        over their ring: slices of one keystream, each used once, laid out value by value
        (a value's pads of all sets are adjacent, so a batch of them needs no copy)."""
        prot = self.protection
        entries, length = self._layout(binding)
        stream = self.rng.ring([length * count], torch.uint8) if prot.exact is not None else None
        sets = [MaskSet() for _ in range(count)]
        batched: dict[str, torch.Tensor] = {}
        for name, shape, dtype, offset, nbytes in entries if stream is not None else ():
            start = offset * count
            block = stream[start : start + nbytes * count].view(dtype)
            batched[name] = block.reshape(count * shape[0], *shape[1:]) if shape else block
            # per set, a tensor and its numpy view of the same memory
            arrays = block.numpy().reshape(count, *shape)
            if not shape:  # iterating would give numpy scalars (copies), not 0-d views
                arrays = [a.reshape(()) for a in arrays.reshape(count, 1)]
            for out, tensor, array in zip(sets, block.view(count, *shape), arrays, strict=True):
                out.pads[name] = tensor
                out.arrays[name] = array
        for out in sets:
            if stream is None:
                for name, shape, dtype, _, _ in entries:
                    scale = prot.mask_scale
                    out.pads[name] = self.rng.uniform(shape, -scale, scale).to(dtype)
            if prot.rnm is not None:
                site = prot.rnm
                shape = [*concrete_shape(prot.token_shape, binding), site.candidates]
                out.noise[site.token_input] = self.rng.laplace(shape, site.noise_scale)
            out.deltas = dict(out.pads)  # the pads, then the corrections drawn from them
        return sets, batched

    def fill(self, binding: Mapping[str, int], count: int, batch: int = 16) -> None:
        """Draw ``count`` sets for ``binding``, ``batch`` at a time."""
        queue = self._sets.setdefault(self.key(binding), deque())
        with torch.no_grad():
            while count > 0:
                size = min(batch, count)
                with self._lock:
                    sets = self.draw_many(binding, size)
                queue.extend(sets)  # deque appends are atomic: safe beside take()
                count -= size

    def take(self, binding: Mapping[str, int]) -> MaskSet:
        queue = self._sets.get(self.key(binding))
        try:
            if queue:
                return queue.popleft()
        except IndexError:  # a concurrent take emptied it
            pass
        finally:
            self._taken.set()  # a background refill waits for this, not on a timer
        self.misses += 1
        with self._lock:
            return self.draw(binding)

    def refill_in_background(
        self, binding: Mapping[str, int], keep: int, batch: int = 16
    ) -> threading.Event:
        """Keep at least ``keep`` sets for ``binding`` ready from a daemon thread, drawing
        ``batch`` at a time while requests are served; set the returned event to stop it.
        ``rate`` (sets per second drawn) is updated as it goes."""
        stop = threading.Event()
        missing = self._dims - set(binding)
        if missing:  # a set's shapes would need sizes the binding does not give
            raise ValueError(f"cannot stock sets for {dict(binding)}: {sorted(missing)} unbound")
        # the first batch here, in the caller (a server starting): what is paid once, the
        # weights packed as int8 digits and oneDNN's kernels made for the batch's shapes,
        # then does not land on the first requests (make demo's `slalom` answer: 10.5 s
        # with it in the refill thread, which competed with the request, against 5.3 s
        # with float64 corrections)
        try:
            self.fill(binding, batch, batch)
        except Exception as exc:  # as in the thread below: requests still draw on the spot
            self.failure = f"{type(exc).__name__}: {exc}"
            return stop

        def loop() -> None:
            while not stop.is_set():
                if self.available(binding) >= keep:
                    self._taken.wait(0.5)  # woken by a take; the timeout only rechecks stop
                    self._taken.clear()
                    continue
                start = time.perf_counter()
                try:
                    self.fill(binding, batch, batch)
                except Exception as exc:  # the refill is an optimisation: requests still draw
                    self.failure = f"{type(exc).__name__}: {exc}"
                    return
                self.rate = batch / (time.perf_counter() - start)

        threading.Thread(target=loop, name="teesplit-mask-pool", daemon=True).start()
        return stop

    def available(self, binding: Mapping[str, int]) -> int:
        return len(self._sets.get(self.key(binding), ()))
