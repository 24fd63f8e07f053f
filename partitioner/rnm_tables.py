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


# The strata's count ratio (measured on SST-2, ε = 1, K = 20, greedy groups before _refine;
# benchmarks/README.md): wider strata give back the accuracy narrow ones cost (0.591 at 8
# against 0.560 at 2 with a corpus prior) while recovery stays under the uniform bound with a
# corpus like the traffic (12.2 % at 8, 9.2 % at 2); with wordfreq's counts the prior's error,
# not the strata's width, sets the recovery (22.1 % at 8, 22.0 % at 2 on SmolLM2).
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
        cosine clusters inside a stratum, refined by swaps (``_refine``). A group's members are
        then about equally likely a priori, so the group says little and the ε-noisy choice
        inside it hides the word.
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
            groups = _greedy(unit, stratum, k)
            if prior is not None:  # see _refine; the grouping without a prior is as it was
                groups = _refine(unit, groups)
            _score(unit, groups, candidates, scores)
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

    def to_bytes(self, salted: bool = False) -> bytes:
        """The tables as a safetensors file's bytes (what :meth:`from_bytes` reads);
        ``salted``: with 16 random bytes in the metadata, so that the file's hash is no
        fingerprint of the embedding it was built from."""
        import os

        from safetensors.torch import save

        metadata = {"epsilon": repr(self.epsilon)}
        if salted:
            metadata["salt"] = os.urandom(16).hex()
        return save(
            {"candidates": self.candidates, "scores": self.scores, "keep": self.keep},
            metadata=metadata,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

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


def _score(
    unit: torch.Tensor,
    groups: list[torch.Tensor],
    candidates: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """Write the ``groups`` into ``candidates`` and ``scores``: min-max normalised cosine
    scores, so that every score is in [0, 1] (Δ = 1)."""
    for group in groups:
        members = unit[group]
        cos = members @ members.t()  # (g, g): row i scores every member for token i
        lo = cos.min(dim=1, keepdim=True).values
        hi = cos.max(dim=1, keepdim=True).values
        normed = (cos - lo) / (hi - lo).clamp_min(1e-12)
        g = len(group)
        candidates[group, :g] = group.unsqueeze(0).expand(g, g)
        scores[group, :g] = normed


def _greedy(unit: torch.Tensor, stratum: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Greedy cosine groups of ``k``: seeds come in the stratum's order (most frequent first
    under a prior, else id order), each taking its ``k − 1`` nearest free tokens. Greedy groups
    get worse as the free tokens run out, so the frequent tokens, which are most of a text,
    seed first; ``_refine`` then trades members between groups for the stratum as a whole."""
    assigned = torch.ones(unit.shape[0], dtype=torch.bool)
    assigned[stratum] = False
    order, groups = stratum, []
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
            groups.append(group)
        order = order[~assigned[order]]
    return groups


# A swap must raise the summed similarity by more than float32 rounding of a few hundred
# products: rounding alone never makes a swap (nor an endless exchange of like tokens).
_GAIN = 1e-3
_ROUNDS = 6
_TARGETS = 4  # groups each token tries per sweep: those its summed similarity is highest to
_PROPOSE = 512  # tokens whose target groups come from one GEMM
# Tokens swapping at once: smaller batches see fresher group sums and clash less.
_SWAP_BATCH = 16


def _refine(unit: torch.Tensor, groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Swap tokens between the ``groups`` (sizes kept) while a swap raises the two groups'
    summed pairwise cosine similarity, for up to ``_ROUNDS`` sweeps.

    Greedy groups serve their seeds: the last groups of a stratum are its leftovers, and a
    member may sit nearer another group than its own. RNM emits a group's members, so what
    its noise costs the text is how far apart they are. With ``C_G`` the sum of group ``G``'s
    unit vectors, token ``t``'s summed similarity to ``G`` is ``t·C_G``; swapping ``a ∈ A``
    with ``b ∈ B`` changes the objective by ``a·(C_B − C_A) + b·(C_A − C_B) + |a − b|²`` (the
    last term is ``2 − 2·a·b`` for unit rows; a zero embedding row normalises to zero).
    Each token tries every member of the ``_TARGETS`` groups it is nearest (by summed
    similarity) and makes the best swap; swaps of one batch touch disjoint groups, so each gain is
    exact when made. A sweep that makes no swap ends the search: then no token gains by
    swapping with a member of those groups (of any group, in a stratum of at most
    ``_TARGETS + 1`` groups); the sweeps are capped, so a large stratum may stop before.
    A group of one (``k = 2``, an odd stratum: the token the greedy pass left alone, which
    goes out in the clear) takes no part. Deterministic: no randomness.

    Measured in the issue-5 harness (SST-2, ε = 1, K = 20, 16 seeds): 0.614 accuracy against
    0.591 for the greedy groups of a corpus's strata, 0.600 against 0.570 for wordfreq's.
    Only strata are refined: without a prior the whole vocabulary is one stratum, and the
    cosine grouping stays the reference it was.
    """
    alone = [g for g in groups if len(g) < 2]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < 2:
        return groups + alone
    members = torch.cat(groups)
    u = unit[members]  # stratum-local rows
    group_of = torch.cat([torch.full((len(g),), i) for i, g in enumerate(groups)])
    width = max(len(g) for g in groups)
    table = torch.full((len(groups), width), -1, dtype=torch.int64)  # group -> local ids
    start = 0
    for i, g in enumerate(groups):
        table[i, : len(g)] = torch.arange(start, start + len(g))
        start += len(g)
    sums = torch.zeros(len(groups), u.shape[1]).index_add_(0, group_of, u)
    home = (u * sums[group_of]).sum(dim=1)
    square = (u * u).sum(dim=1)
    targets = min(_TARGETS, len(groups) - 1)
    for _ in range(_ROUNDS):
        swaps = 0
        for first in range(0, len(members), _PROPOSE):
            rows = torch.arange(first, min(first + _PROPOSE, len(members)))
            near = u[rows] @ sums.t()
            near[torch.arange(len(rows)), group_of[rows]] = float("-inf")
            proposed = near.topk(targets, dim=1).indices  # (c, T), from this chunk's sums
            for sub in range(0, len(rows), _SWAP_BATCH):
                a = rows[sub : sub + _SWAP_BATCH]
                chosen = proposed[sub : sub + _SWAP_BATCH]
                swaps += _swap(u, a, chosen, group_of, table, sums, home, square)
        if not swaps:
            break
    return [members[row[row >= 0]] for row in table] + alone


def _swap(
    u: torch.Tensor,
    a: torch.Tensor,
    proposed: torch.Tensor,
    group_of: torch.Tensor,
    table: torch.Tensor,
    sums: torch.Tensor,
    home: torch.Tensor,
    square: torch.Tensor,
) -> int:
    """For each token of ``a`` the best swap with a member of its ``proposed`` groups, from
    the current ``sums`` (``home[t] = t·C_{group of t}``, ``square[t] = |t|²``); make those
    that gain over ``_GAIN`` in order, skipping a swap whose groups an earlier one of the batch
    changed. Returns how many were made."""
    own = group_of[a]
    ua, mine = u[a], sums[own]
    slots = table[proposed].flatten(1)  # (m, T·w) local ids, -1 padding
    b = slots.clamp(min=0)
    to_a = torch.bmm(sums[proposed], ua[:, :, None])[..., 0] - home[a, None]  # (m, T)
    dots = torch.bmm(u[b], torch.stack((mine, ua), dim=2))  # b·C_A and b·a
    to_b = dots[..., 0] - home[b]
    width = table.shape[1]
    apart = square[a, None] + square[b] - 2 * dots[..., 1]  # |a − b|²
    gain = to_a.repeat_interleave(width, dim=1) + to_b + apart
    # a proposal made before a swap of this sweep may name the token's own group now
    stale = (proposed == own[:, None]).repeat_interleave(width, dim=1)
    gain = gain.masked_fill((slots < 0) | stale, float("-inf"))
    top, best = gain.max(dim=1)
    touched: set[int] = set()
    made = 0
    for i in torch.nonzero(top > _GAIN).flatten().tolist():
        ga, gb = int(own[i]), int(proposed[i, int(best[i]) // width])
        if ga in touched or gb in touched:
            continue
        touched.update((ga, gb))
        ta, tb = int(a[i]), int(slots[i, best[i]])
        sums[ga] += u[tb] - u[ta]
        sums[gb] += u[ta] - u[tb]
        group_of[ta], group_of[tb] = gb, ga
        table[ga][table[ga] == ta] = tb
        table[gb][table[gb] == tb] = ta
        for g in (ga, gb):
            row = table[g][table[g] >= 0]
            home[row] = u[row] @ sums[g]
        made += 1
    return made


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
