"""Public token priors, which RNM's groups are built against (issue 16).

RNM hides a token among the ``K`` members of its group, and the GPU learns the group. If one
member is far more frequent than the others, the group alone names the word: an attacker who
guesses the group's most frequent member recovers it however much noise RNM adds. Groups
built inside frequency strata (:meth:`partitioner.rnm_tables.RNMTables.build` with a prior)
keep the members about equally likely; this module makes the prior, from public data only:

* :func:`wordfreq_prior`: English word frequencies from the ``wordfreq`` package (its own
  data, no download), spread over the tokens each word is split into, with and without a
  leading space; plus punctuation, which ``wordfreq`` does not count, at its rate in the
  Brown corpus relative to "the" (:data:`PUNCTUATION`). Without it a comma, one token in
  fourteen of English text, would share a group with rare tokens, and the group would name it.
  Words and marks are counted as natural text writes them and as tokenised corpora do
  (:data:`TOKENISED`): SST-2's " 's" is a token natural text never produces.
* :func:`corpus_prior`: the token counts of a text corpus the deployer chooses (text like the
  traffic it will serve), read from a file of one text per line.

Compile-time only: the enclave never builds groups, it loads them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partitioner.errors import PolicyError
from partitioner.rnm_tables import RATIO, TokenPrior, check_ratio

WORDS = 100_000  # wordfreq's most frequent English words; the rest add little mass
START_OF_TEXT = 0.1  # the share of a word's uses without a leading space (text-initial)
MAX_CORPUS_BYTES = 512 * 2**20
# Two conventions of writing the same English, which byte-level BPE and WordPiece give
# different ids: natural text ("it's", "film's", ", " attached to its word, " (" and an
# opening ' "' after a space) and tokenised corpora in the Penn Treebank style (SST-2, PTB,
# most NLP corpora: "it 's", "does n't", "``", every mark spaced). Counting each at half keeps
# every token of either within a factor 2 of its rate, and the strata tolerate a factor of
# their ratio.
TOKENISED = 0.5
# Punctuation per occurrence of "the" in the Brown corpus (1.16 M tokens: "the" 62,713,
# "," 58,334, "." 49,346, the two quote marks 17,626, ";" 5,566, "?" 4,693, "--" 3,432,
# ")" 2,466, "(" 2,435, ":" 1,795, "!" 1,596), with each mark's spellings (leading space
# included) in natural text and in tokenised text, the rate shared evenly among them. Rates
# this rough place a mark among words about as frequent.
PUNCTUATION: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {
    ",": (0.93, (",",), (" ,",)),
    ".": (0.79, (".",), (" .",)),
    '"': (0.28, (' "', '"'), (" ``", " ''")),
    ";": (0.089, (";",), (" ;",)),
    "?": (0.075, ("?",), (" ?",)),
    "--": (0.055, (" --", "--"), (" --",)),
    ")": (0.039, (")",), (" )", " -rrb-")),
    "(": (0.039, (" (",), (" (", " -lrb-")),
    ":": (0.029, (":",), (" :",)),
    "!": (0.025, ("!",), (" !",)),
}
# Penn Treebank splits these off the word they end ("couldn't've" → "could n't 've"); a
# trailing apostrophe is a plural possessive ("players'"). Other apostrophes stay in the word
# ("o'clock", "rock'n'roll").
CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "'")


def tokenised(word: str) -> str:
    """A word as Penn Treebank tokenisation writes it: its clitics split off ("it's" →
    "it 's", "doesn't" → "does n't", "film's" → "film 's"); other words unchanged."""
    stem, clitics = word, []
    while clitic := next((c for c in CLITICS if stem.endswith(c) and stem != c), None):
        stem, clitics = stem[: -len(clitic)], [clitic, *clitics]
    return " ".join([stem, *clitics])


def _encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """``texts -> token ids`` as ``tokenizer(texts, add_special_tokens=False)`` gives them.

    A fast tokenizer's batch is encoded by its Rust backend directly, without transformers'
    Python conversion of every encoding (~4x faster: wordfreq's prior encodes 400,000
    texts); on a copy with truncation and padding off, which is what transformers' own call
    sets (MiniLM's tokenizer file comes with both on, at 128)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _vocab(tokenizer: Any, vocab_size: int | None) -> int:
    return int(vocab_size if vocab_size is not None else len(tokenizer))


class _Tally:
    """Weighted token counts, summed in the order the texts come (one ``bincount`` at the
    end adds them one by one, as adding each text's tokens in turn would: the counts do not
    depend on how the texts were batched). ``wordfreq`` counts 400,000 texts: an
    ``index_add_`` of a tensor per text cost ~9 s of the prior."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self.encode, self.vocab = _encoder(tokenizer), vocab
        self.ids: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []

    def add(self, texts: list[str], weights: list[float]) -> None:
        """Each text's weight to every token the text is split into."""
        ids = self.encode(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        self.ids.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64))
        self.weights.append(np.repeat(np.asarray(weights, dtype=np.float64), lengths))

    def counts(self) -> torch.Tensor:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab:
            # counted nowhere, a token would be missed by the strata it should shape
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise PolicyError(
                f"token prior: the tokenizer gives id {bad}, outside the model's "
                f"{self.vocab} embedding rows"
            )
        weights = np.concatenate(self.weights) if self.weights else None
        return torch.from_numpy(np.bincount(ids, weights, minlength=self.vocab).astype(np.float64))


def wordfreq_prior(
    tokenizer: Any, vocab_size: int | None = None, ratio: float = RATIO
) -> TokenPrior:
    """Counts from ``wordfreq``'s English frequencies (``vocab_size``: the embedding's rows,
    when it has more than the tokenizer names), written both ways (:data:`TOKENISED`)."""
    import wordfreq

    freqs = sorted(wordfreq.get_frequency_dict("en").items(), key=lambda kv: -kv[1])[:WORDS]
    tally = _Tally(tokenizer, _vocab(tokenizer, vocab_size))
    for lead, share in ((" ", 1.0 - START_OF_TEXT), ("", START_OF_TEXT)):
        for spell, part in ((str, 1.0 - TOKENISED), (tokenised, TOKENISED)):
            texts = [lead + spell(word) for word, _ in freqs]
            tally.add(texts, [freq * share * part for _, freq in freqs])
    the = wordfreq.word_frequency("the", "en")
    for rate, natural, spaced in PUNCTUATION.values():
        for forms, part in ((natural, 1.0 - TOKENISED), (spaced, TOKENISED)):
            tally.add(list(forms), [the * rate * part / len(forms)] * len(forms))
    version = importlib.metadata.version("wordfreq")
    return TokenPrior(f"wordfreq-{version}-en+brown-punctuation+ptb", tally.counts(), ratio)


def corpus_prior(
    tokenizer: Any,
    texts: Iterable[str],
    name: str,
    vocab_size: int | None = None,
    ratio: float = RATIO,
) -> TokenPrior:
    """Token counts over ``texts`` (named ``name`` in the plan)."""
    tally = _Tally(tokenizer, _vocab(tokenizer, vocab_size))
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        batch = texts[start : start + 1024]
        tally.add(batch, [1.0] * len(batch))
    counts = tally.counts()
    if not bool(counts.any()):
        raise PolicyError(f"token prior corpus {name}: no tokens")
    return TokenPrior(f"corpus:{name}", counts, ratio)


def prior_from(
    spec: str, tokenizer: Any, vocab_size: int | None = None, ratio: float | None = None
) -> TokenPrior | None:
    """``wordfreq``, ``none`` (cosine groups only) or the path of a UTF-8 text corpus, one
    text per line (named in the plan by its file name and SHA-256), with strata of ``ratio``
    (default :data:`partitioner.rnm_tables.RATIO`)."""
    if spec == "none":
        if ratio is not None:
            raise PolicyError("a token prior ratio was given, but no prior to build strata of")
        return None
    # checked before any counting: a corpus may take a while to read
    ratio = check_ratio(RATIO if ratio is None else ratio, f"token prior {spec}")
    if tokenizer is None:
        raise PolicyError(f"token prior {spec!r} needs the model's tokenizer, and it has none")
    if spec == "wordfreq":
        return wordfreq_prior(tokenizer, vocab_size, ratio)
    path = Path(spec)
    try:
        if path.stat().st_size > MAX_CORPUS_BYTES:
            raise PolicyError(f"token prior corpus {path}: over {MAX_CORPUS_BYTES} bytes")
        data = path.read_bytes()
        lines = data.decode("utf-8").splitlines()
    except OSError as exc:
        raise PolicyError(f"token prior corpus {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"token prior corpus {path}: not UTF-8 ({exc.reason})") from None
    digest = hashlib.sha256(data).hexdigest()[:16]
    return corpus_prior(tokenizer, lines, f"{path.name}@{digest}", vocab_size, ratio)


__all__ = ["corpus_prior", "prior_from", "tokenised", "wordfreq_prior"]
