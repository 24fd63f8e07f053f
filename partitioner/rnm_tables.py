"""RNM's candidate tables: per token its group, scores, and whether it passes through.

Plain tensors with the mechanism's runtime arithmetic (``request_epsilon``, ``identity_noise``)
and safetensors I/O; ``build`` groups a vocabulary (see ``passes/rnm.py`` for the mechanism and
why it is ε-DP). Imports only ``errors``: the enclave loads these tables without the compiler.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from partitioner.errors import ArtifactError

_BATCH = 256


@dataclass
class RNMTables:
    """Per-token candidates (``-1`` pads short groups), scores, and the pass-through mask."""

    candidates: torch.Tensor  # (V, K) int64
    scores: torch.Tensor  # (V, K) float32, -inf in padding slots
    keep: torch.Tensor  # (V,) bool: special tokens, emitted unchanged
    epsilon: float

    @property
    def noise_scale(self) -> float:
        return 2.0 / self.epsilon  # Laplace(2Δ/ε) with Δ = 1

    @property
    def k(self) -> int:
        return int(self.candidates.shape[1])

    def request_epsilon(self, ids: torch.Tensor) -> float:
        """Total ε of one request: ε per sanitised (non-special) token, by composition."""
        return float(self.epsilon * int((~self.keep[ids]).sum()))

    def identity_noise(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Noise under which RNM returns ``ids`` unchanged, for tokens the GPU already knows.

        A generated token comes from logits the GPU computed in the clear, so sanitising it
        again would spend ε to hide nothing. A huge score on each token's own slot makes it the
        arg-max whatever the ties between group members.
        """
        own = self.candidates[ids] == ids[..., None]
        return torch.where(own, 1e30, 0.0).to(dtype)

    def group_of(self, token: int) -> list[int]:
        return [int(c) for c in self.candidates[token] if c >= 0]

    @classmethod
    def build(
        cls, embedding: torch.Tensor, k: int, epsilon: float, special_ids: Iterable[int] = ()
    ) -> RNMTables:
        """Group the vocabulary and score each token's group (deterministic, no randomness)."""
        weight = embedding.detach().to(torch.float32)
        vocab = weight.shape[0]
        unit = torch.nn.functional.normalize(weight, dim=1)
        keep = torch.zeros(vocab, dtype=torch.bool)
        special = [i for i in special_ids if 0 <= i < vocab]
        keep[special] = True
        assigned = keep.clone()
        candidates = torch.full((vocab, k), -1, dtype=torch.int64)
        scores = torch.full((vocab, k), float("-inf"), dtype=torch.float32)
        candidates[keep, 0] = torch.nonzero(keep).flatten()
        scores[keep, 0] = 1.0
        while not bool(assigned.all()):
            # One matmul for the next batch of unassigned seeds (in id order), then the groups
            # one seed at a time; a seed taken by an earlier group of its batch is skipped.
            seeds = torch.nonzero(~assigned).flatten()[:_BATCH]
            sims = unit[seeds] @ unit.t()
            for row, seed in zip(sims, seeds.tolist(), strict=True):
                if assigned[seed]:
                    continue
                row = row.masked_fill(assigned, float("-inf"))
                row[seed] = float("inf")  # the seed is always in its own group
                free = int((~assigned).sum())
                group = torch.topk(row, min(k, free)).indices
                assigned[group] = True
                members = unit[group]
                cos = members @ members.t()  # (g, g): row i scores every member for token i
                lo = cos.min(dim=1, keepdim=True).values
                hi = cos.max(dim=1, keepdim=True).values
                normed = (cos - lo) / (hi - lo).clamp_min(1e-12)
                g = len(group)
                candidates[group, :g] = group.unsqueeze(0).expand(g, g)
                scores[group, :g] = normed
        return cls(candidates, scores, keep, float(epsilon))

    @classmethod
    def on_meta(cls, vocab: int, k: int, epsilon: float) -> RNMTables:
        """Tables of the right shapes and no contents, for planning a meta-device model."""
        return cls(
            torch.empty((vocab, k), dtype=torch.int64, device="meta"),
            torch.empty((vocab, k), dtype=torch.float32, device="meta"),
            torch.empty((vocab,), dtype=torch.bool, device="meta"),
            float(epsilon),
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {"candidates": self.candidates, "scores": self.scores, "keep": self.keep},
            str(path),
            metadata={"epsilon": repr(self.epsilon)},
        )

    @classmethod
    def load(cls, path: str | Path) -> RNMTables:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read RNM tables {path}: {exc.strerror}") from None
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> RNMTables:
        """Tables from a safetensors file's bytes, checked to be well formed: a table that
        passes every token through (or indexes outside the vocabulary) is refused."""
        from safetensors.torch import load as load_tensors

        try:
            tensors = load_tensors(data)
            size = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
            epsilon = float(meta["epsilon"])
            candidates, scores, keep = (tensors[n] for n in ("candidates", "scores", "keep"))
        except Exception as exc:  # safetensors, json, float() raise several types
            raise ArtifactError(f"cannot read RNM tables {what}: {exc}") from None
        vocab = keep.shape[0] if keep.dim() == 1 else -1
        if candidates.numel() == 0 or candidates.dim() != 2 or candidates.shape[1] < 1:
            raise ArtifactError(f"RNM tables {what} are empty")
        if (
            keep.dtype != torch.bool
            or candidates.dtype != torch.int64
            or scores.dtype != torch.float32
            or candidates.dim() != 2
            or candidates.shape != scores.shape
            or candidates.shape[0] != vocab
            or not 0 < epsilon < float("inf")
            or int(candidates.min()) < -1
            or int(candidates.max()) >= vocab
        ):
            raise ArtifactError(f"RNM tables {what} are malformed (shapes, dtypes, ids or ε)")
        return cls(candidates, scores, keep, epsilon)
