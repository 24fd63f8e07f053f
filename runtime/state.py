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


__all__ = ["HeldState", "StateError", "grown", "is_stand_in", "stand_in"]
