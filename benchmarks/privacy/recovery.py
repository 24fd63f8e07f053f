"""What the GPU recovers of RNM-sanitised SST-2 text, per grouping, ε and vocabulary (issue 16).

For each model vocabulary (SmolLM2's byte-level BPE, MiniLM's WordPiece), the production
tables (:meth:`partitioner.rnm_tables.RNMTables.build` over the whole vocabulary, the model's
special tokens passed through) are built three ways:

* ``cosine``: greedy cosine groups, no prior (every release before issue 16);
* ``strata/wordfreq``: frequency strata of ``wordfreq``'s English counts (the default of
  ``teesplit partition`` when the model has a tokenizer);
* ``strata/corpus``: frequency strata of the token counts of SST-2's *train* split (a public
  corpus like the traffic; the dev text attacked below is not in it).

The attacker (``benchmarks/privacy/attack.py``) knows the groups, the mechanism and a unigram
prior from SST-2 train, and guesses each dev token from its sanitised token. Reported per ε:
the expected share of dev tokens recovered by exact match, by the group's most frequent
member and by the Bayes-optimal guess, over all tokens and over content words only (not an
English stopword, not punctuation), beside the uniform-prior bound ``e^ε/(e^ε+K−1)``; and the
Bayes guess scored on one actual sanitised run (the production ``teesplit::rnm`` op and
CSPRNG), which must agree with the expectation.

    python benchmarks/privacy/recovery.py --data ../shared/data/sst2 [--epsilons 1 2] [--k 20]

Writes ``<out>/recovery.json`` and ``<out>/recovery.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.privacy.attack import GroupAttack, uniform_bound, unigram_prior  # noqa: E402
from benchmarks.privacy.sst2 import read_tsv  # noqa: E402
from enclave_runtime.randomness import CSPRNG  # noqa: E402
from partitioner.ops import OPS  # noqa: E402
from partitioner.rnm_tables import RATIO, RNMTables, TokenPrior  # noqa: E402


def vocabulary(name: str) -> tuple[Any, torch.Tensor, tuple[int, ...]]:
    """(tokenizer, input embedding, special token ids) of a zoo model."""
    from partitioner.capturing import special_token_ids
    from partitioner.zoo import minilm, minilm_tokenizer, smollm2, smollm2_tokenizer

    model, tokenizer = (smollm2(), smollm2_tokenizer()) if name == "smollm2" else (
        minilm(), minilm_tokenizer())  # fmt: skip
    embedding = model.get_input_embeddings().weight.detach().clone()
    special = set(special_token_ids(model)) | set(tokenizer.all_special_ids)
    return tokenizer, embedding, tuple(sorted(special))


def content_mask(tokenizer: Any, vocab: int) -> torch.Tensor:
    """Tokens that are content: not an English stopword, not punctuation only."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    mask = torch.zeros(vocab, dtype=torch.bool)
    for i in range(vocab):
        text = tokenizer.decode([i]).strip().lower().removeprefix("##")
        mask[i] = any(c.isalnum() for c in text) and text not in ENGLISH_STOP_WORDS
    return mask


def sampled_bayes(attack: GroupAttack, tables: RNMTables, text: torch.Tensor, seed: int) -> float:
    """The Bayes guess scored on one run of the production op (CSPRNG noise)."""
    noise = CSPRNG(seed).laplace([len(text), tables.k], tables.noise_scale).float()
    out = OPS.rnm(text, tables.candidates, tables.scores, tables.keep, noise)
    return attack.recovered(text, out).bayes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--vocabularies", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=RATIO, help="the strata's count ratio")
    parser.add_argument(
        "--groupings",
        nargs="+",
        default=["cosine", "strata/wordfreq", "strata/corpus"],
        choices=["cosine", "strata/wordfreq", "strata/corpus"],
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from partitioner.token_prior import corpus_prior, wordfreq_prior

    start = time.perf_counter()
    train, _ = read_tsv(Path(args.data) / "train.tsv")
    dev, _ = read_tsv(Path(args.data) / "dev.tsv")
    rows: list[dict[str, Any]] = []
    for name in args.vocabularies:
        tokenizer, embedding, special = vocabulary(name)
        vocab = embedding.shape[0]
        ids = tokenizer(dev, add_special_tokens=False)["input_ids"]
        text = torch.tensor([t for s in ids for t in s], dtype=torch.int64)
        attacker = unigram_prior(tokenizer(train, add_special_tokens=False)["input_ids"], vocab)
        content = content_mask(tokenizer, vocab)[text]
        priors: dict[str, TokenPrior | None] = {}
        for grouping in args.groupings:
            priors[grouping] = (
                None
                if grouping == "cosine"
                else wordfreq_prior(tokenizer, vocab, args.ratio)
                if grouping == "strata/wordfreq"
                else corpus_prior(tokenizer, train, "sst2-train", vocab, args.ratio)
            )
        print(
            f"{name}: vocabulary {vocab:,}, {len(text):,} dev tokens "
            f"({int(content.sum()):,} content) ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        for grouping, prior in priors.items():
            built = RNMTables.build(embedding, args.k, 1.0, special, prior)
            for epsilon in args.epsilons:
                tables = RNMTables(built.candidates, built.scores, built.keep, epsilon)
                attack = GroupAttack(tables, attacker, text.tolist())
                every, words = attack.expected(text), attack.expected(text[content])
                row = {
                    "vocabulary": name,
                    "grouping": grouping,
                    "ratio": None if prior is None else prior.ratio,
                    "epsilon": epsilon,
                    "k": args.k,
                    "bound": uniform_bound(epsilon, args.k),
                    "all": every.as_dict(),
                    "content": words.as_dict(),
                    "sampled_bayes": sampled_bayes(attack, tables, text, seed=0),
                }
                rows.append(row)
                print(
                    f"  {grouping:16s} ε={epsilon:g}: exact {every.exact:6.1%}, group prior "
                    f"{every.group_prior:6.1%}, Bayes {every.bayes:6.1%} (sampled "
                    f"{row['sampled_bayes']:6.1%}; content words {words.bayes:6.1%}); bound "
                    f"{row['bound']:6.1%} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"k": args.k, "ratio": args.ratio, "attacker_prior": "SST-2 train", "rows": rows}
    stem = "recovery" if args.ratio == RATIO else f"recovery-ratio{args.ratio:g}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(table(rows) + "\n")
    return results


def _grouping(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    return row["grouping"] if ratio is None else f"{row['grouping']}, ratio {ratio:g}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| vocabulary | grouping | ε | exact match | group prior | Bayes | Bayes (one run) | "
        "Bayes, content words | uniform bound | Bayes ÷ bound |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        a, c = r["all"], r["content"]
        lines.append(
            f"| {r['vocabulary']} | {_grouping(r)} | {r['epsilon']:g} | {a['exact']:.1%} | "
            f"{a['group_prior']:.1%} | {a['bayes']:.1%} | {r['sampled_bayes']:.1%} | "
            f"{c['bayes']:.1%} | {r['bound']:.1%} | {a['bayes'] / r['bound']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
