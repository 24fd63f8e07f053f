"""Batching: the calls that concurrent sessions make to one GPU stage, run as one call.

Reads, per GPU stage, its input and output shapes from the plan (:class:`Layout`), and the
calls of sessions on their own streams (each with its own inputs, of one or more rows, and its
own held state already in place). Writes nothing but the calls' results. Guarantees:

- each call gets exactly its own rows of the batched result, in its own order;
- calls are batched only when the stage's program computes each row from that row alone: every
  input and output has the batch dim first, and every other size is the same, except the
  length of a held state when the stage also reads the plan's padding input (``Plan.padding``,
  a decoder step's left-padding count per row). Then each row's state is left-padded with
  zeros to the longest and its padding count raised by as much: the step masks those positions
  and does not count them in its positions, so the row computes what it computes alone (up to
  floating-point summation order);
- a call waits at most ``max_delay`` seconds for others to join it, and not at all when no
  other session is expected (``expected``: the sessions that use the stage now);
- one batch of a stage runs at a time, so a stage's calls never compete for its device;
- a call cannot fail its batch-mates: one whose inputs disagree on their row count runs
  alone, and a batch whose run fails is run again call by call, so only the calls that fail
  alone get the error.

This is a dynamic batcher (Triton's ``dynamic_batching`` with ``max_queue_delay``), plus the
ragged-length rule that lets decode steps of caches of different lengths share a call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.state import left_padded

Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """How a stage's calls may be batched: ``batchable`` (batch dim first everywhere),
    ``ragged`` (held input index -> the dim that may differ) and ``padding`` (the index of
    the padding input, raised by each row's left pad), both empty unless lengths may differ."""

    batchable: bool
    ragged: dict[int, int] = field(default_factory=dict)
    padding: int | None = None

    @classmethod
    def of(
        cls,
        inputs: Sequence[tuple[str, Sequence[int | str]]],
        outputs: Sequence[Sequence[int | str]],
        held: dict[int, int],
        padding: str | None,
    ) -> Layout:
        """``inputs``: the stage's (name, plan shape) in order; ``outputs``: its output
        shapes; ``held``: held input index -> its state dim; ``padding``: the plan's padding
        input name."""
        shapes = [shape for _, shape in inputs] + list(outputs)
        if not shapes or any(not shape or shape[0] != "batch" for shape in shapes):
            return cls(False)
        names = [name for name, _ in inputs]
        lengths = {inputs[i][1][dim] for i, dim in held.items()}
        if not held or padding not in names or len(lengths) != 1:
            return cls(True)
        (length,) = lengths
        if not isinstance(length, str):
            return cls(True)
        # any other size that names the state's length would have to be padded as well, by a
        # rule we cannot know here: such a stage batches equal lengths only
        others = [shape for i, (_, shape) in enumerate(inputs) if i not in held] + list(outputs)
        if any(isinstance(d, str) and length in d for shape in others for d in shape):
            return cls(True)
        return cls(True, dict(held), names.index(padding))

    def key(self, inputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Calls with equal keys may share a batch."""
        out: list[Any] = []
        lengths = set()
        for i, tensor in enumerate(inputs):
            shape = list(tensor.shape[1:])
            dim = self.ragged.get(i)
            if dim is not None:
                lengths.add(shape[dim - 1])
                shape[dim - 1] = -1
            out.append((tensor.dtype, tensor.device, tuple(shape)))
        rows = {int(t.shape[0]) for t in inputs}
        if len(lengths) > 1 or len(rows) > 1:  # a call out of step with itself runs alone
            out.append(object())
        return tuple(out)


class _Call:
    def __init__(self, inputs: list[torch.Tensor], key: tuple[Any, ...]) -> None:
        self.inputs = inputs
        self.key = key
        self.rows = int(inputs[0].shape[0])
        self.outputs: list[torch.Tensor] | None = None
        self.error: BaseException | None = None
        self.finished = False


class StageBatcher:
    """Runs one stage's calls, batching those that arrive together (see the module)."""

    def __init__(
        self,
        run: Run,
        layout: Layout,
        *,
        expected: Callable[[], int] = lambda: 1,
        max_delay: float = 0.02,
        max_rows: int = 64,
    ) -> None:
        self._run = run
        self.layout = layout
        self.expected = expected
        self.max_delay = max_delay
        self.max_rows = max_rows
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._running = False
        self.batches = 0  # runs of the stage, for statistics

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The stage's outputs for ``inputs``."""
        if not self.layout.batchable:  # a run of its own, as before batching
            with self._cond:
                self.batches += 1
            return self._run(inputs)
        call = _Call(inputs, self.layout.key(inputs))
        with self._cond:
            self._queue.append(call)
            self._cond.notify_all()
        while True:
            with self._cond:
                while self._running and not call.finished:
                    self._cond.wait()
                if call.finished:
                    break
                self._running = True
                batch = self._gather()
                self.batches += 1
            try:
                outputs = self._execute(batch)
                for c, out in zip(batch, outputs, strict=True):
                    c.outputs = out
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    # one call's values (a token id out of range) may fail the whole run: run
                    # each alone, so a bad call fails itself only, never its batch-mates
                    for c in batch:
                        try:
                            c.outputs = self._run(c.inputs)
                        except Exception as alone:
                            c.error = alone
            with self._cond:
                for c in batch:
                    c.finished = True
                self._running = False
                self._cond.notify_all()
        if call.error is not None:
            raise call.error
        assert call.outputs is not None
        return call.outputs

    def _gather(self) -> list[_Call]:
        """With the lock held: wait (at most ``max_delay``) until the expected calls are
        queued, then take the oldest call and those that may join it."""
        deadline = time.monotonic() + self.max_delay
        while len(self._queue) < self.expected():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        first = self._queue[0]
        batch, rows = [], 0
        for c in list(self._queue):
            if c.key == first.key and rows + c.rows <= max(self.max_rows, first.rows):
                batch.append(c)
                rows += c.rows
                self._queue.remove(c)
        return batch

    def _execute(self, batch: list[_Call]) -> list[list[torch.Tensor]]:
        if len(batch) == 1:
            return [self._run(batch[0].inputs)]
        pads = self._pads(batch)
        inputs = []
        for i in range(len(batch[0].inputs)):
            tensors = [c.inputs[i] for c in batch]
            if i in self.layout.ragged:
                dim = self.layout.ragged[i]
                inputs.append(left_padded(tensors, dim, int(tensors[0].shape[dim]) + pads[0]))
            elif i == self.layout.padding:
                inputs.append(torch.cat([t + pad for t, pad in zip(tensors, pads, strict=True)]))
            else:
                inputs.append(torch.cat(tensors))
        outputs = self._run(inputs)
        rows = [c.rows for c in batch]
        split = [torch.split(out, rows) for out in outputs]
        return [[parts[j] for parts in split] for j in range(len(batch))]

    def _pads(self, batch: list[_Call]) -> list[int]:
        """Each call's left pad: how much shorter its held state is than the longest."""
        if not self.layout.ragged:
            return [0] * len(batch)
        index, dim = next(iter(self.layout.ragged.items()))
        lengths = [int(c.inputs[index].shape[dim]) for c in batch]
        return [max(lengths) - n for n in lengths]


__all__ = ["Layout", "StageBatcher"]
