"""RNM's candidate tables: per token its group, scores, and whether it passes through.

Plain tensors with the mechanism's runtime arithmetic (``request_epsilon``, ``identity_noise``)
and safetensors I/O; ``build`` groups a vocabulary (see ``passes/rnm.py`` for the mechanism and
why it is ε-DP). Imports only ``errors``: the enclave loads these tables without the compiler.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from partitioner.errors import ArtifactError, PolicyError

_BATCH = 256


# The strata's count ratio (measured on SST-2, ε = 1, K = 20; benchmarks/README.md): wider
# strata give back the accuracy narrow ones cost (0.591 at 8 against 0.560 at 2 with a corpus
# prior; free cosine groups 0.595) while recovery stays under the uniform bound with a corpus
# like the traffic (12.2 % at 8, 9.2 % at 2); with wordfreq's counts the prior's error, not the
# strata's width, sets the recovery (22.1 % at 8, 22.0 % at 2 on SmolLM2; 18.8 % / 19.4 % on
# MiniLM).
RATIO = 8.0


def check_ratio(ratio: float, what: str) -> float:
    """``ratio``, refused unless a finite number above 1 (NaN included)."""
    if not 1.0 < ratio < float("inf"):
        raise PolicyError(f"{what}: ratio must be a number > 1, got {ratio}")
    return ratio


@dataclass(frozen=True)
class TokenPrior:
    """A public count per token id, which RNM groups are built against (``RNMTables.build``).

    ``source`` says where the counts come from (``wordfreq``, ``corpus:NAME``); ``ratio`` is
    the most two members of one frequency stratum may differ by. The plan records both and
    the counts' SHA-256, so a reader can rebuild the groups and check them.
    """

    source: str
    counts: torch.Tensor  # (V,) float64, finite, non-negative
    ratio: float = RATIO

    def __post_init__(self) -> None:
        c = self.counts
        if c.dim() != 1 or not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise PolicyError(f"token prior {self.source}: counts must be finite, >= 0, one per id")
        check_ratio(self.ratio, f"token prior {self.source}")

    def describe(self) -> dict[str, object]:
        digest = hashlib.sha256(self.counts.to(torch.float64).numpy().tobytes()).hexdigest()
        return {"method": "strata", "prior": self.source, "prior_sha256": digest,
                "ratio": self.ratio}  # fmt: skip


COSINE = {"method": "cosine"}  # the grouping without a prior: similarity only


@dataclass
class RNMTables:
    """Per-token candidates (``-1`` pads short groups), scores, and the pass-through mask."""

    candidates: torch.Tensor  # (V, K) int64
    scores: torch.Tensor  # (V, K) float32, -inf in padding slots
    keep: torch.Tensor  # (V,) bool: special tokens, emitted unchanged
    epsilon: float
    grouping: dict = field(default_factory=lambda: dict(COSINE))  # how the groups were built

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
        cls,
        embedding: torch.Tensor,
        k: int,
        epsilon: float,
        special_ids: Iterable[int] = (),
        prior: TokenPrior | None = None,
    ) -> RNMTables:
        """Group the vocabulary and score each token's group (deterministic, no randomness).

        Without ``prior``, the groups are greedy cosine clusters over the whole vocabulary:
        one frequent word among rare ones, so the group alone names the word. With a
        ``prior`` (a public count per token), the vocabulary is first cut into frequency
        strata, inside which no two tokens' prior counts differ by more than its ``ratio`` (a
        stratum holds at least ``k`` tokens, so the most frequent ones share one); groups are
        cosine clusters inside a stratum. A group's members are then about equally likely a
        priori, so the group says little and the ε-noisy choice inside it hides the word.
        """
        weight = embedding.detach().to(torch.float32)
        vocab = weight.shape[0]
        unit = torch.nn.functional.normalize(weight, dim=1)
        keep = torch.zeros(vocab, dtype=torch.bool)
        special = [i for i in special_ids if 0 <= i < vocab]
        keep[special] = True
        candidates = torch.full((vocab, k), -1, dtype=torch.int64)
        scores = torch.full((vocab, k), float("-inf"), dtype=torch.float32)
        candidates[keep, 0] = torch.nonzero(keep).flatten()
        scores[keep, 0] = 1.0
        if prior is not None and prior.counts.shape[0] != vocab:
            raise PolicyError(
                f"token prior {prior.source} has {prior.counts.shape[0]} counts for a "
                f"vocabulary of {vocab}"
            )
        for stratum in _strata(keep, prior, k):
            _cluster(unit, stratum, k, candidates, scores)
        # a token left alone (k = 2 and an odd count in the last stratum) is emitted as it is:
        # say so, and spend no ε on it, instead of charging for noise that cannot move it
        alone = ~keep & ((candidates >= 0).sum(dim=1) == 1)
        keep |= alone
        grouping = dict(COSINE) if prior is None else prior.describe()
        return cls(candidates, scores, keep, float(epsilon), grouping)

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
        _check_partition(candidates, scores, keep, what)
        return cls(candidates, scores, keep, epsilon)


def _strata(keep: torch.Tensor, prior: TokenPrior | None, k: int) -> list[torch.Tensor]:
    """The token ids to group, cut into frequency strata (one stratum without a prior)."""
    ids = torch.nonzero(~keep).flatten()
    if prior is None:
        return [ids]
    counts, ratio = prior.counts.to(torch.float64)[ids], prior.ratio
    order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id
    ids, counts = ids[order], counts[order].tolist()
    strata, start = [], 0
    while start < len(ids):
        end = min(start + k, len(ids))
        while end < len(ids) and counts[end] * ratio >= counts[start]:
            end += 1
        # whole groups of k inside the ratio; where even k tokens exceed it (the most
        # frequent words), the k next in frequency order, the flattest group there is
        end = min(start + max(k, (end - start) // k * k), len(ids))
        if len(ids) - end < k:  # fewer than k left: they join this stratum, not one short
            end = len(ids)
        strata.append(ids[start:end])
        start = end
    return strata


def _cluster(
    unit: torch.Tensor,
    stratum: torch.Tensor,
    k: int,
    candidates: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """Greedy cosine groups of ``k`` over the ``stratum``'s tokens, written into
    ``candidates`` and ``scores`` with min-max normalised cosine scores (Δ = 1). Seeds come
    in the stratum's order (most frequent first under a prior, else id order), each taking
    its ``k − 1`` nearest free tokens. Greedy groups get worse as the free tokens run out, so
    the frequent tokens, which are most of a text, seed first and get the closest
    neighbours."""
    assigned = torch.ones(unit.shape[0], dtype=torch.bool)
    assigned[stratum] = False
    order = stratum
    while order.numel():
        # One matmul for the next batch of unassigned seeds (in ``order``), then the groups
        # one seed at a time; a seed taken by an earlier group of its batch is skipped.
        seeds = order[:_BATCH]
        sims = unit[seeds] @ unit.t()
        for row, seed in zip(sims, seeds.tolist(), strict=True):
            if assigned[seed]:
                continue
            row = row.masked_fill(assigned, float("-inf"))
            row[seed] = float("inf")  # the seed is always in its own group
            free = int((~assigned).sum())
            # never leave one token over: a group of one would always emit its token
            size = k - 1 if free == k + 1 and k > 2 else min(k, free)
            group = torch.topk(row, size).indices
            assigned[group] = True
            members = unit[group]
            cos = members @ members.t()  # (g, g): row i scores every member for token i
            lo = cos.min(dim=1, keepdim=True).values
            hi = cos.max(dim=1, keepdim=True).values
            normed = (cos - lo) / (hi - lo).clamp_min(1e-12)
            g = len(group)
            candidates[group, :g] = group.unsqueeze(0).expand(g, g)
            scores[group, :g] = normed
        order = order[~assigned[order]]


def _check_partition(
    candidates: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, what: str
) -> None:
    """The ε claim needs the candidate sets to be a fixed partition: every sanitised token in
    a group of at least two that lists it, every member listing the same group, its scores
    finite in [0, 1] and -inf in the padding; a pass-through token lists only itself."""
    valid = candidates >= 0
    size = valid.sum(dim=1)
    vocab = candidates.shape[0]
    ids = torch.arange(vocab)
    first = candidates[:, 0]
    lists_itself = (candidates == ids[:, None]).any(dim=1)
    bad = ~lists_itself | (valid[:, :-1] < valid[:, 1:]).any(dim=1)  # padding only at the end
    bad |= ~keep & (size < 2)
    bad |= keep & ((size != 1) | (first != ids))
    # a group is named by its first member: every row equals its first member's row, every
    # member is named by the same first member, and the group holds as many tokens as a row
    # lists (so no member is listed twice); O(V·K), no V·K·K tensor in the enclave
    bad |= (candidates != candidates[first.clamp(min=0)]).any(dim=1)
    member = torch.where(valid, candidates, ids[:, None])
    bad |= (candidates[member, 0] != first[:, None]).any(dim=1)
    bad |= size != torch.bincount(first.clamp(min=0), minlength=vocab)[first.clamp(min=0)]
    in_range = torch.where(valid, scores, 0.0)
    bad |= ~(torch.isfinite(in_range) & (in_range >= 0) & (in_range <= 1)).all(dim=1)
    bad |= ~torch.where(valid, True, torch.isneginf(scores)).all(dim=1)
    if bool(bad.any()):
        token = int(torch.nonzero(bad)[0])
        raise ArtifactError(
            f"RNM tables {what}: token {token}'s candidate set is not a group of a fixed "
            "partition (groups of two or more that list each member the same way; special "
            "tokens alone); its ε-DP claim would not hold"
        )
