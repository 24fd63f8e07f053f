"""Report-Noisy-Max token sanitisation (CMIF), and the tables it needs.

The mechanism, per input token ``t`` (special tokens pass through unchanged):

1. the candidate set ``C(t)`` is the group of ``t`` in a *fixed partition* of the vocabulary into
   groups of ``K`` tokens (CusText's disjoint groups), built once per model by greedy clustering on
   the cosine similarity of the model's own embedding rows;
2. each candidate ``c`` scores ``u(t, c) = cos(E_t, E_c)`` min-max normalised over ``C(t)`` to
   ``[0, 1]``, so the sensitivity is ``Δ = 1``;
3. the output is ``argmax_c u(t, c) + Laplace(2Δ/ε)``.

Why this is ε-DP, and for which neighbours: take two tokens ``t, t'`` in the same group. They have
the same candidate set, and ``|u(t, c) - u(t', c)| <= 1`` for every ``c`` because both scores lie
in ``[0, 1]``. Report-Noisy-Max with ``Laplace(2Δ/ε)`` noise over a common candidate set is ε-DP
(Dwork & Roth, Claim 3.9, the non-monotone case), so
``P[out = c | t] <= e^ε · P[out = c | t']``. The candidate set depends on ``t`` only through its
group, a public function of the vocabulary fixed before any request, so it leaks nothing beyond
the group. Tokens in *different* groups are distinguishable (the output reveals the group): the
guarantee is ε-indistinguishability among the ``K`` members of a group, exactly CusText's. A
candidate set chosen per token (the ``K`` nearest neighbours of each ``t``) would break it: two
neighbours would have different supports and no ε bounds the ratio. A request of ``n``
sanitised tokens spends ``n·ε`` by sequential composition; :meth:`RNMTables.request_epsilon`
reports it.
"""

from __future__ import annotations

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
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in ("candidates", "scores", "keep")}
        except Exception as exc:  # safetensors raises several types for a bad file
            raise ArtifactError(f"cannot read RNM tables {path}: {exc}") from None
        if "epsilon" not in meta:
            raise ArtifactError(f"RNM tables {path} carry no epsilon in their metadata")
        return cls(
            tensors["candidates"], tensors["scores"], tensors["keep"], float(meta["epsilon"])
        )


def exact_distribution(
    scores: torch.Tensor, noise_scale: float, grid: int = 200_001
) -> torch.Tensor:
    """``P[argmax(score + Laplace) = j]`` for each candidate, by numerical integration.

    ``P[j] = ∫ f(t - s_j) Π_{i≠j} F(t - s_i) dt`` with Laplace pdf ``f`` and cdf ``F``; an
    independent check of the sampler (no random numbers involved). Padding slots (``-inf``) get 0.
    """
    valid = torch.isfinite(scores)
    s = scores[valid].to(torch.float64)
    b = float(noise_scale)
    t = torch.linspace(float(s.min()) - 40 * b, float(s.max()) + 40 * b, grid, dtype=torch.float64)
    z = t.unsqueeze(1) - s.unsqueeze(0)  # (grid, k)
    pdf = torch.exp(-z.abs() / b) / (2 * b)
    cdf = torch.where(z < 0, 0.5 * torch.exp(z / b), 1 - 0.5 * torch.exp(-z / b))
    log_cdf = torch.log(cdf.clamp_min(1e-300))
    total = log_cdf.sum(dim=1, keepdim=True)
    integrand = pdf * torch.exp(total - log_cdf)
    probs = torch.trapezoid(integrand, t, dim=0)
    out = torch.zeros(scores.shape, dtype=torch.float64)
    out[valid] = probs / probs.sum()
    return out
