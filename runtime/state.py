"""Held state: the KV caches a GPU stage keeps between the calls of one sequence.

A plan's state input may have a ``holder`` (:class:`~partitioner.plan.StateSpec`): a GPU stage
that computes the state's refill in the clear and is the only stage that reads its values. The
enclave then neither sends the cache nor receives its new positions; it passes the executor a
*stand-in* of the cache's shape (:func:`stand_in`, no memory), which still gives the enclave's
own stages the positions they need, and the runner of the stage (in this process, our worker,
Triton's implicit state) keeps the real tensors.

Reads :class:`~partitioner.plan.HeldSlot` records; guarantees that a held tensor grows only by
what its stage computed, that a sequence starts from an empty state (a call whose state is
0 long), and that a call whose state length is not what the holder keeps is refused, never
run on the wrong cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from partitioner.errors import TeesplitError
from partitioner.plan import HeldSlot


class StateError(TeesplitError):
    """A held state is out of step with the call: no sequence was started, or its length
    differs from what the call says."""


def stand_in(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A tensor of ``shape`` that holds no data (every stride 0): a held state's place."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def is_stand_in(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a stand-in (or empty): the holder's state is meant, not it."""
    return tensor.numel() == 0 or all(s == 0 for s in tensor.stride())


def grown(shape: Sequence[int], dim: int, more: int) -> list[int]:
    out = list(shape)
    out[dim] += more
    return out


class HeldState:
    """One stage's held tensors for one sequence, by slot."""

    def __init__(self, stage: str, slots: Sequence[HeldSlot]) -> None:
        self.stage = stage
        self.slots = list(slots)
        self.tensors: dict[int, torch.Tensor] = {}

    def inputs(self, given: list[torch.Tensor]) -> list[torch.Tensor]:
        """``given`` (the stage's inputs) with each held slot's stand-in replaced by the held
        tensor. A 0-long state starts the sequence; a real tensor replaces what is held."""
        out = list(given)
        for slot in self.slots:
            tensor = given[slot.input]
            if tensor.shape[slot.dim] == 0:
                self.tensors[slot.input] = tensor.new_zeros(tensor.shape)
            elif not is_stand_in(tensor):
                self.tensors[slot.input] = tensor
            held = self.tensors.get(slot.input)
            if held is None:
                raise StateError(
                    f"stage {self.stage} holds no {slot.state}: the sequence was not started "
                    "(its first call has an empty state)"
                )
            if list(held.shape) != list(tensor.shape) or held.dtype != tensor.dtype:
                raise StateError(
                    f"stage {self.stage} holds {slot.state} of shape {list(held.shape)}, the "
                    f"call says {list(tensor.shape)}"
                )
            out[slot.input] = held
        return out

    def held_shape(self, slot: HeldSlot) -> list[int] | None:
        """The shape of what is held for ``slot`` (None before the sequence starts)."""
        held = self.tensors.get(slot.input)
        return None if held is None else list(held.shape)

    def keep(
        self, inputs: list[torch.Tensor], outputs: list[torch.Tensor], *, stand_ins: bool = True
    ) -> list[torch.Tensor]:
        """Grow each held tensor by its refill; returns ``outputs`` with the refills as
        stand-ins (they stay here; a holder in the enclave's own process returns them as they
        are, ``stand_ins=False``: a caller appending them to its cache gets the real one)."""
        out = list(outputs)
        for slot in self.slots:
            refill = outputs[slot.output]
            self.tensors[slot.input] = torch.cat([inputs[slot.input], refill], dim=slot.dim)
            if stand_ins:
                out[slot.output] = stand_in(refill.shape, refill.dtype)
        return out


MAX_ROWS = 1024  # sequences one stream may hold at once, per stage
_ROW_ID = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def row_ids(text: str) -> list[str]:
    """The sequence ids of a row-addressed call (``"a,b,c"``), checked: 1 to 64 characters
    of ``[0-9A-Za-z_-]`` each, no repeats."""
    ids = text.split(",")
    for row in ids:
        if not 0 < len(row) <= 64 or not set(row) <= _ROW_ID:
            raise StateError(f"{row[:64]!r} is not a sequence id (1-64 of [0-9A-Za-z_-])")
    if len(set(ids)) != len(ids):
        raise StateError("a sequence id names two rows of one call")
    return ids


class RowStates:
    """One stage's held tensors for many sequences at once, one batch row each, addressed by
    sequence id: the cache of every session an enclave's scheduler decodes together.

    A row-addressed call (:meth:`batch`) names one sequence per row of its inputs. Either
    every row starts (the held inputs are 0 long: each row's state is created empty), or
    every row continues: each row's tensor is left-padded with zeros to the longest row's
    length and the rows stacked, which is what the call's stand-ins say (``[rows, ..., L,
    ...]``, ``L`` the longest). The caller passes the plan's padding input raised by each
    row's pad (``L - its length``), so the step masks those positions; the holder does not
    read it. After the run each row grows by its own row of the refill, unpadded.

    The rows are kept as views into the last call's stacked tensors: while the same sequences
    come back in the same order (a scheduler's steady state), the next call's inputs are those
    tensors as they are, and each step costs one ``cat`` per slot, not a copy per row."""

    def __init__(self, stage: str, slots: Sequence[HeldSlot], max_rows: int = MAX_ROWS) -> None:
        self.stage = stage
        self.slots = list(slots)
        self.max_rows = max_rows
        self.rows: dict[str, dict[int, torch.Tensor]] = {}
        # the last call's sequences (in row order) and its stacked, grown tensors per slot
        self.stacked: tuple[tuple[str, ...], dict[int, torch.Tensor]] | None = None

    def batch(self, ids: Sequence[str], start: bool) -> RowBatch:
        """The state of one call over the sequences ``ids`` (in row order)."""
        if start:
            known = [row for row in ids if row in self.rows]
            if known:
                raise StateError(f"stage {self.stage}: sequence {known[0]} was started already")
            if len(self.rows) + len(ids) > self.max_rows:
                raise StateError(
                    f"stage {self.stage} holds {len(self.rows)} sequences for this session; "
                    f"{len(ids)} more would pass its limit of {self.max_rows}"
                )
        else:
            unknown = [row for row in ids if row not in self.rows]
            if unknown:
                raise StateError(
                    f"stage {self.stage} holds no sequence {unknown[0]}: it was not started "
                    "or was released"
                )
        return RowBatch(self, list(ids), start)

    def release(self, ids: Sequence[str]) -> None:
        """Free the sequences ``ids`` (unknown ids are ignored: freeing is idempotent)."""
        for row in ids:
            self.rows.pop(row, None)
        if self.stacked is not None and set(ids) & set(self.stacked[0]):
            self.stacked = None


class RowBatch:
    """The held state of one row-addressed call (see :class:`RowStates`); used as a
    :class:`HeldState` is: ``inputs`` before the run, ``keep`` after it."""

    def __init__(self, states: RowStates, ids: list[str], start: bool) -> None:
        self.states = states
        self.ids = ids
        self.start = start

    def held_shape(self, slot: HeldSlot) -> list[int] | None:
        """The shape the call's stand-in for ``slot`` must have: the rows stacked, each as
        long as the longest."""
        if self.start:
            return None
        tensors = [self.states.rows[row][slot.input] for row in self.ids]
        shape = list(tensors[0].shape)
        shape[0] = sum(int(t.shape[0]) for t in tensors)
        shape[slot.dim] = max(int(t.shape[slot.dim]) for t in tensors)
        return shape

    def inputs(self, given: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(given)
        stage = self.states.stage
        for slot in self.states.slots:
            tensor = given[slot.input]
            if tensor.shape[0] != len(self.ids):
                raise StateError(
                    f"stage {stage}: {len(self.ids)} sequences named for {tensor.shape[0]} rows"
                )
            if self.start:
                if tensor.shape[slot.dim] != 0:
                    raise StateError(f"stage {stage}: a starting call's {slot.state} is not empty")
                out[slot.input] = tensor.new_zeros(tensor.shape)
                continue
            want = self.held_shape(slot)
            if want != list(tensor.shape) or not is_stand_in(tensor):
                raise StateError(
                    f"stage {stage} holds {slot.state} of {want} for these rows, the call says "
                    f"{list(tensor.shape)}"
                )
            stacked = self.states.stacked
            if (
                stacked is not None
                and stacked[0] == tuple(self.ids)
                and list(stacked[1][slot.input].shape) == want
            ):
                out[slot.input] = stacked[1][slot.input]  # the same rows as last time
            else:
                rows = [self.states.rows[row][slot.input] for row in self.ids]
                out[slot.input] = _left_pad(rows, slot.dim, want)
        return out

    def keep(
        self, inputs: list[torch.Tensor], outputs: list[torch.Tensor], *, stand_ins: bool = True
    ) -> list[torch.Tensor]:
        out = list(outputs)
        held = self.states.rows
        stacked: dict[int, torch.Tensor] = {}
        for slot in self.states.slots:
            refill = outputs[slot.output]
            grown = stacked[slot.input] = torch.cat([inputs[slot.input], refill], dim=slot.dim)
            end = int(grown.shape[slot.dim])
            for i, row in enumerate(self.ids):
                old = held.get(row, {}).get(slot.input)
                n = int(refill.shape[slot.dim]) + (0 if old is None else int(old.shape[slot.dim]))
                # a view of the row, its left pad cut off
                held.setdefault(row, {})[slot.input] = grown.narrow(0, i, 1).narrow(
                    slot.dim, end - n, n
                )
            if stand_ins:
                out[slot.output] = stand_in(refill.shape, refill.dtype)
        self.states.stacked = (tuple(self.ids), stacked)
        return out


def left_padded(rows: list[torch.Tensor], dim: int, length: int) -> torch.Tensor:
    """``rows`` stacked on dim 0, each left-padded with zeros along ``dim`` to ``length``."""
    shape = list(rows[0].shape)
    shape[0] = sum(int(t.shape[0]) for t in rows)
    shape[dim] = length
    return _left_pad(rows, dim, shape)


def _left_pad(rows: list[torch.Tensor], dim: int, shape: list[int]) -> torch.Tensor:
    """``rows`` stacked on dim 0, each preceded along ``dim`` by zeros up to ``shape[dim]``."""
    out = rows[0].new_zeros(shape)
    at = 0
    for t in rows:
        n = int(t.shape[dim])
        out.narrow(0, at, t.shape[0]).narrow(dim, shape[dim] - n, n).copy_(t)
        at += int(t.shape[0])
    return out


__all__ = [
    "HeldState",
    "RowBatch",
    "RowStates",
    "StateError",
    "grown",
    "is_stand_in",
    "left_padded",
    "row_ids",
    "stand_in",
]
