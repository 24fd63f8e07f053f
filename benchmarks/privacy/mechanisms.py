"""Token sanitisation mechanisms over one shared vocabulary and embedding matrix.

All three work on the same *universe*: the MiniLM WordPiece tokens that occur in the corpus,
with MiniLM's own input-embedding rows, so that only the mechanism differs:

* :class:`RNM` is teesplit's production code: :class:`partitioner.rnm_tables.RNMTables`
  (disjoint greedy cosine groups of K, min-max normalised scores) and the ``teesplit::rnm``
  op, with ``Laplace(2/ε)`` noise from :class:`enclave_runtime.randomness.CSPRNG`.
  With CusText+'s stopword list as pass-through tokens it is "RNM + stopwords kept", which
  isolates the mechanism (noisy max against exponential) from that policy choice.
* :class:`CusTextPlus` (Chen et al., ACL Findings 2023): the *same* groups and scores, the
  exponential mechanism ``P(y|x) ∝ exp(ε·u(x,y)/2)`` (Δu = 1), and stopwords kept ("+").
  CusText+ keeps NLTK's English stopwords; NLTK needs a corpus download, so scikit-learn's
  built-in English list (318 words, a superset of most of NLTK's 179) stands in for it.
* :class:`SanTextPlus` (Yue et al., ACL Findings 2021): the rarest ``w`` fraction of the
  vocabulary (by corpus frequency) is sensitive; a sensitive token is always replaced, any
  other with probability ``p``, by a *sensitive* token drawn with
  ``P(y|x) ∝ exp(−ε·‖x−y‖/2)`` (Euclidean distance of embeddings), as in the authors' code.
  Defaults w = 0.9, p = 0.3.

Every mechanism maps a 1-D tensor of token ids to a tensor of the same shape and is
deterministic given its seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from enclave_runtime.randomness import CSPRNG
from partitioner.ops import OPS
from partitioner.rnm_tables import RNMTables, TokenPrior

K = 20  # CusText's default output-set size; RNM uses the same groups


@dataclass
class Universe:
    """The tokens a corpus uses, their embedding rows and frequencies.

    ``ids`` are model token ids (sorted); ``local`` maps a model id to its row in ``ids``
    (``-1`` for tokens outside the universe, which the mechanisms leave alone).
    """

    ids: torch.Tensor
    embedding: torch.Tensor
    counts: torch.Tensor
    local: torch.Tensor
    tokens: list[str]

    @classmethod
    def from_corpus(
        cls,
        sequences: Iterable[list[int]],
        embedding: torch.Tensor,
        id_to_token: list[str],
    ) -> Universe:
        counts = Counter(t for seq in sequences for t in seq)
        ids = torch.tensor(sorted(counts), dtype=torch.int64)
        local = torch.full((embedding.shape[0],), -1, dtype=torch.int64)
        local[ids] = torch.arange(len(ids))
        return cls(
            ids=ids,
            embedding=embedding[ids].detach().to(torch.float32),
            counts=torch.tensor([counts[int(i)] for i in ids], dtype=torch.int64),
            local=local,
            tokens=[id_to_token[int(i)] for i in ids],
        )

    def __len__(self) -> int:
        return len(self.ids)


class Mechanism:
    name = "none"

    def sanitise(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.clone()


def groups(universe: Universe, prior: TokenPrior | None = None) -> RNMTables:
    """The disjoint groups of ``K`` and their scores (they do not depend on ε): cosine
    clusters, or with a ``prior`` (a count per *model* token id) frequency strata of it."""
    if prior is not None:
        prior = TokenPrior(prior.source, prior.counts[universe.ids], prior.ratio)
    return RNMTables.build(universe.embedding, K, epsilon=1.0, prior=prior)


def public_groups(universe: Universe, public: set[str]) -> RNMTables:
    """The cosine groups with the ``public`` tokens taken out of them (each alone, passed
    through): what ``rnm.public`` deploys, where no private token is sanitised into a public
    one."""
    rows = [i for i, tok in enumerate(universe.tokens) if tok in public]
    return RNMTables.build(universe.embedding, K, epsilon=1.0, special_ids=rows)


class RNM(Mechanism):
    """teesplit's Report-Noisy-Max over the shared groups.

    ``keep`` names tokens passed through unchanged (the tables' pass-through mask, which in
    production holds the special tokens): given CusText+'s stopwords it isolates the
    mechanism from that policy choice.
    """

    name = "RNM (teesplit)"

    def __init__(
        self,
        universe: Universe,
        epsilon: float,
        seed: int,
        tables: RNMTables,
        keep: set[str] = frozenset(),
    ) -> None:
        self.universe = universe
        kept = torch.tensor([tok in keep for tok in universe.tokens], dtype=torch.bool)
        self.tables = RNMTables(tables.candidates, tables.scores, tables.keep | kept, epsilon)
        self.rng = CSPRNG(seed)
        if keep:
            self.name = "RNM + stopwords kept"

    def sanitise(self, ids: torch.Tensor) -> torch.Tensor:
        local = self.universe.local[ids]
        inside = local >= 0
        x = local[inside]
        t = self.tables
        noise = self.rng.laplace([len(x), t.k], t.noise_scale).float()
        picked = OPS.rnm(x, t.candidates, t.scores, t.keep, noise)
        out = ids.clone()
        out[inside] = self.universe.ids[picked]
        return out


class CusTextPlus(Mechanism):
    """Exponential mechanism over the RNM groups; stopwords are kept."""

    name = "CusText+"

    def __init__(
        self, universe: Universe, epsilon: float, seed: int, tables: RNMTables, stopwords: set[str]
    ) -> None:
        self.universe = universe
        self.tables = tables
        self.epsilon = epsilon
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = torch.tensor([tok in stopwords for tok in universe.tokens], dtype=torch.bool)

    def sanitise(self, ids: torch.Tensor) -> torch.Tensor:
        local = self.universe.local[ids]
        inside = (local >= 0) & ~self.stop[local.clamp(min=0)]
        x = local[inside]
        # scores are in [0, 1] (Δu = 1); padding slots hold -inf and get probability 0
        weights = torch.exp(self.epsilon * self.tables.scores[x] / 2)
        slot = torch.multinomial(weights, 1, generator=self.generator).squeeze(-1)
        picked = self.tables.candidates[x].gather(-1, slot[:, None]).squeeze(-1)
        out = ids.clone()
        out[inside] = self.universe.ids[picked]
        return out


class SanTextPlus(Mechanism):
    """Sensitive tokens always, others with probability ``p``, become a sensitive token
    drawn by the exponential mechanism on Euclidean distance."""

    name = "SanText+"

    def __init__(
        self, universe: Universe, epsilon: float, seed: int, w: float = 0.9, p: float = 0.3
    ) -> None:
        self.universe = universe
        self.epsilon = epsilon
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        order = torch.argsort(universe.counts, descending=True, stable=True)
        n_sensitive = int(w * len(universe))
        self.sensitive_rows = order[len(universe) - n_sensitive :]
        self.sensitive = torch.zeros(len(universe), dtype=torch.bool)
        self.sensitive[self.sensitive_rows] = True
        self.targets = universe.embedding[self.sensitive_rows]

    def probabilities(self, rows: torch.Tensor) -> torch.Tensor:
        """``P(y | x)`` over the sensitive tokens for each universe row in ``rows``."""
        dist = torch.cdist(self.universe.embedding[rows], self.targets)
        return torch.softmax(-self.epsilon * dist / 2, dim=-1)

    def sanitise(self, ids: torch.Tensor) -> torch.Tensor:
        local = self.universe.local[ids]
        inside = local >= 0
        flip = torch.rand(len(ids), generator=self.generator) < self.p
        change = inside & (self.sensitive[local.clamp(min=0)] | flip)
        rows = local[change]
        out = ids.clone()
        if len(rows) == 0:
            return out
        unique, inverse = torch.unique(rows, return_inverse=True)
        order = torch.argsort(inverse, stable=True)
        sizes = torch.bincount(inverse, minlength=len(unique)).tolist()
        picked = torch.empty(len(rows), dtype=torch.int64)
        offset = 0
        for start in range(0, len(unique), 512):  # |V| x |V_S| at once would be ~0.7 GB
            probs = self.probabilities(unique[start : start + 512])
            for j, row in enumerate(probs):
                n = sizes[start + j]
                draws = torch.multinomial(row, n, replacement=True, generator=self.generator)
                picked[order[offset : offset + n]] = draws
                offset += n
        out[change] = self.universe.ids[self.sensitive_rows[picked]]
        return out
