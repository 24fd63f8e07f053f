"""What the GPU learns from RNM-sanitised tokens: the attacker's best guess of each original.

Under ``cmif`` the GPU receives the embedding rows of the sanitised tokens; the embedding is
public (it is the model's), so inverting it gives the sanitised token ``y`` itself. RNM's
candidate set is a fixed public partition of the vocabulary, so ``y`` names the group of the
original ``x``, and within that group ``x`` is hidden by an ε-DP choice. An attacker who also
knows a unigram prior ``π`` (any English corpus) guesses:

* **exact match**: ``x̂ = y`` (what "RNM leaves N % of tokens unchanged" measures);
* **group prior**: ``x̂ = argmax_{x ∈ group(y)} π(x)``, which ignores the noise;
* **Bayes**: ``x̂ = argmax_{x ∈ group(y)} π(x) · P(y | x)``, the guess that maximises the
  chance of being right given everything the GPU sees (for one token in isolation).

:class:`GroupAttack` computes the mechanism's exact output distribution ``P(y | x)`` inside each
group (RNM: numerical integration of the noisy max, no sampling; :func:`custext_channel`: the
exponential mechanism), the three guesses for every possible output, and each text token's
*expected* recovery (the probability, over the mechanism's noise, that each guess is the
original). :meth:`GroupAttack.recovered` scores actually sanitised outputs instead, which is
what an independent re-run checks.

The DP bound: ε-indistinguishability among the K members of a group caps any guess at
``e^ε / (e^ε + K − 1)`` when the prior is uniform over the group
(:func:`uniform_bound`); a skewed prior inside a group raises what the GPU recovers above it,
which is what issue 16 measured (45 % at ε = 1, K = 20, against 12.5 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from partitioner.rnm_tables import RNMTables

Channel = Callable[[torch.Tensor], torch.Tensor]  # (g, g) scores -> (g, g) P[out = col | row]


def uniform_bound(epsilon: float, k: int) -> float:
    """The most any guess recovers from an ε-DP choice among ``k`` under a uniform prior."""
    return math.exp(epsilon) / (math.exp(epsilon) + k - 1)


def rnm_channel(noise_scale: float, grid: int = 4001) -> Channel:
    """``P[argmax(score + Laplace(b)) = j]`` for each row of scores, by numerical integration
    of ``∫ f(t − s_j) Π_{i≠j} F(t − s_i) dt`` (Laplace pdf ``f``, cdf ``F``)."""
    b = float(noise_scale)

    def channel(scores: torch.Tensor) -> torch.Tensor:
        s = scores.to(torch.float64)  # (rows, g), finite
        lo, hi = float(s.min()) - 25 * b, float(s.max()) + 25 * b
        t = torch.linspace(lo, hi, grid, dtype=torch.float64)
        z = t[None, :, None] - s[:, None, :]  # (rows, grid, g)
        pdf = torch.exp(-z.abs() / b) / (2 * b)
        log_cdf = torch.where(z < 0, math.log(0.5) + z / b, torch.log1p(-0.5 * torch.exp(-z / b)))
        others = torch.exp(log_cdf.sum(dim=2, keepdim=True) - log_cdf)
        probs = torch.trapezoid(pdf * others, t, dim=1)
        return probs / probs.sum(dim=1, keepdim=True)

    return channel


def custext_channel(epsilon: float) -> Channel:
    """CusText's exponential mechanism: ``P(y | x) ∝ exp(ε · u(x, y) / 2)``."""

    def channel(scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(epsilon * scores.to(torch.float64) / 2, dim=1)

    return channel


@dataclass
class Recovery:
    """Shares of text tokens recovered by each guess (expected over the mechanism's noise)."""

    tokens: int
    exact: float
    group_prior: float
    bayes: float

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "exact": self.exact,
            "group_prior": self.group_prior,
            "bayes": self.bayes,
        }


class GroupAttack:
    """The three guesses for RNM-style tables (a fixed partition into groups), given a prior.

    ``tables`` are the mechanism's groups and scores; ``prior`` is a count (or probability) per
    token id of the same vocabulary; ``channel`` maps a group's score matrix to its output
    distribution (default: RNM's at the tables' ε). Only groups that hold a token of
    ``relevant`` are analysed (a full vocabulary has thousands of groups no text touches).
    Pass-through tokens (``tables.keep``) are recovered by every guess: the GPU sees them.
    """

    def __init__(
        self,
        tables: RNMTables,
        prior: torch.Tensor,
        relevant: Iterable[int],
        channel: Channel | None = None,
    ) -> None:
        self.tables = tables
        self.channel = channel or rnm_channel(tables.noise_scale)
        self.prior = prior.to(torch.float64)
        vocab = tables.candidates.shape[0]
        # per token: its expected recovery under each guess (filled for relevant groups)
        self.p_exact = torch.ones(vocab, dtype=torch.float64)
        self.p_group = torch.ones(vocab, dtype=torch.float64)
        self.p_bayes = torch.ones(vocab, dtype=torch.float64)
        # per possible output token: each guess of the original
        self.bayes_guess = torch.arange(vocab)
        self.group_guess = torch.arange(vocab)
        done = tables.keep.clone()
        for token in sorted(set(int(t) for t in relevant)):
            if not done[token]:
                group = self._analyse(token)
                done[group] = True

    def _analyse(self, token: int) -> torch.Tensor:
        t = self.tables
        row = t.candidates[token]
        group = row[row >= 0]
        # every member's candidate row is the group in the same order: columns align
        scores = t.scores[group][:, : len(group)]
        if not torch.equal(t.candidates[group][:, : len(group)], group.expand(len(group), -1)):
            raise ValueError(f"token {token}: its group's candidate rows differ (not a partition)")
        p = self.channel(scores)  # (g, g): P[out = group[j] | x = group[i]]
        # a pass-through member (a kept stopword) is emitted as itself; the others may still
        # be sanitised into it, which is what leaves the guess in doubt
        kept = t.keep[group]
        p[kept] = torch.eye(len(group), dtype=p.dtype)[kept]
        pi = self.prior[group]
        joint = pi[:, None] * p  # ∝ P(x = i, y = j)
        bayes = joint.argmax(dim=0)  # per output j, the most likely original (row index)
        top = int(pi.argmax())
        self.bayes_guess[group] = group[bayes]
        self.group_guess[group] = group[top]
        rows = torch.arange(len(group))
        self.p_exact[group] = p[rows, rows]
        self.p_group[group] = (rows == top).to(torch.float64)
        self.p_bayes[group] = (p * (bayes[None, :] == rows[:, None])).sum(dim=1)
        return group

    def expected(self, text: torch.Tensor) -> Recovery:
        """Each guess's expected share of ``text``'s tokens recovered (exact, no sampling)."""
        return Recovery(
            tokens=int(text.numel()),
            exact=float(self.p_exact[text].mean()),
            group_prior=float(self.p_group[text].mean()),
            bayes=float(self.p_bayes[text].mean()),
        )

    def recovered(self, text: torch.Tensor, sanitised: torch.Tensor) -> Recovery:
        """Each guess's share of ``text`` recovered from one actual sanitised output."""
        return Recovery(
            tokens=int(text.numel()),
            exact=float((sanitised == text).double().mean()),
            group_prior=float((self.group_guess[sanitised] == text).double().mean()),
            bayes=float((self.bayes_guess[sanitised] == text).double().mean()),
        )


class SanTextAttack:
    """The Bayes guess against SanText+ (not a partition: every sensitive token may become any
    sensitive token), over a universe of ``n`` tokens.

    ``q(y | x) ∝ exp(−ε·‖x − y‖/2)`` over the sensitive tokens ``S``; a sensitive ``x`` is always
    resampled, any other with probability ``p``. An output outside ``S`` can only be its own
    input (recovered for sure); for ``y ∈ S`` the guess is ``argmax_x π(x)·c(x)·q(y | x)``
    with ``c(x) = 1`` on ``S`` and ``p`` elsewhere. Computed in chunks of outputs (the full
    ``n × |S|`` matrix of a real universe is ~1 GB).
    """

    def __init__(
        self,
        embedding: torch.Tensor,
        sensitive: torch.Tensor,
        epsilon: float,
        p: float,
        prior: torch.Tensor,
        chunk: int = 1024,
    ) -> None:
        emb = embedding.to(torch.float64)
        rows = torch.nonzero(sensitive).flatten()
        targets = emb[rows]
        n = emb.shape[0]
        # log normaliser of q(. | x) for every x
        log_z = torch.full((n,), -math.inf, dtype=torch.float64)
        for start in range(0, len(rows), chunk):
            logits = -epsilon * torch.cdist(emb, targets[start : start + chunk]) / 2
            log_z = torch.logaddexp(log_z, torch.logsumexp(logits, dim=1))
        weight = torch.log(prior.to(torch.float64)) + torch.where(
            sensitive, 0.0, math.log(p) if p > 0 else -math.inf
        )
        self.guess = torch.arange(n)  # per output (universe row): the Bayes guess
        self.p_bayes = torch.where(sensitive, 0.0, 1.0 - p).to(torch.float64)
        for start in range(0, len(rows), chunk):
            ys = rows[start : start + chunk]
            log_q = -epsilon * torch.cdist(emb, targets[start : start + chunk]) / 2 - log_z[:, None]
            best = (weight[:, None] + log_q).argmax(dim=0)  # per output y: the likeliest x
            self.guess[ys] = best
            # x is recovered from y when y's guess is x: add P(resampled, y | x)
            reach = torch.where(sensitive[best], 1.0, p) * torch.exp(
                log_q[best, torch.arange(len(ys))]
            )
            self.p_bayes.index_add_(0, best, reach.to(torch.float64))

    def expected(self, text: torch.Tensor) -> float:
        """The Bayes guess's expected share of ``text`` (universe rows) recovered."""
        return float(self.p_bayes[text].mean())


def unigram_prior(
    sequences: Iterable[Iterable[int]], vocab: int, smoothing: float = 0.01
) -> torch.Tensor:
    """Token counts over ``sequences`` (plus ``smoothing``, so unseen tokens tie at a small
    value and the mechanism's own odds break the tie), as a float64 tensor of ``vocab``."""
    counts = torch.full((vocab,), smoothing, dtype=torch.float64)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.int64)
        counts += torch.bincount(ids, minlength=vocab).to(torch.float64)
    return counts


__all__ = [
    "GroupAttack",
    "Recovery",
    "SanTextAttack",
    "custext_channel",
    "rnm_channel",
    "uniform_bound",
    "unigram_prior",
]
