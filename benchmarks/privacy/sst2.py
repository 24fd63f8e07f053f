"""Privacy–utility on SST-2: teesplit's RNM against SanText+ and CusText+ (issue #5).

For each mechanism and ε, the training subset and the whole dev set are sanitised token by
token (MiniLM WordPiece ids, see ``mechanisms.py``), a classifier is trained on the sanitised
training sentences and tested on the sanitised dev sentences. The classifier is a **frozen**
all-MiniLM-L6-v2 encoder (mean-pooled, as sentence-transformers uses it) with a logistic-
regression head (scikit-learn); fine-tuning the encoder for 37 configurations does not fit a
2-core CPU. The training subset is ``--train-size`` sentences drawn once with a fixed seed and
shared by all runs; each seed re-draws the mechanism's randomness. Accuracy is reported as
mean ± std over the seeds, with the token replacement rate (share of in-vocabulary tokens of the
dev set that the mechanism changed).

    python benchmarks/privacy/sst2.py --data ../shared/data/sst2 [--train-size 10000]

Writes ``<out>/sst2.json``, ``<out>/sst2.md`` (the table) and ``<out>/sst2.png`` (accuracy
against ε, one line per mechanism, the non-private accuracy dashed). The data is read from
``--data`` and never copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.privacy.mechanisms import (  # noqa: E402 - after the path set-up
    RNM,
    CusTextPlus,
    Mechanism,
    SanTextPlus,
    Universe,
    groups,
    public_groups,
)
from partitioner.rnm_tables import RATIO  # noqa: E402

MECHANISMS = (
    "RNM (teesplit)",
    "RNM + stopwords kept",
    "RNM, public stopwords",
    "CusText+",
    "SanText+",
)


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise SystemExit(f"sst2: {path} does not exist (pass --data DIR with train.tsv, dev.tsv)")
    sentences, labels = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["sentence", "label"]:
            raise SystemExit(f"sst2: {path} has header {header}, expected sentence<TAB>label")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise SystemExit(f"sst2: {path}:{line}: expected 'sentence<TAB>0|1', got {row}")
            sentences.append(row[0].strip())
            labels.append(int(row[1]))
    return sentences, labels


def token_ids(tokenizer: Any, sentences: list[str]) -> list[list[int]]:
    """MiniLM WordPiece ids of each sentence, without [CLS]/[SEP], at most 126."""
    return tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=126)[
        "input_ids"
    ]


def corpus(
    tokenizer: Any, embedding: torch.Tensor, train: list[str], dev: list[str]
) -> tuple[list[list[int]], list[list[int]], Universe]:
    """The train and dev ids and the universe of the tokens they use (every harness's)."""
    train_ids, dev_ids = token_ids(tokenizer, train), token_ids(tokenizer, dev)
    vocab = tokenizer.convert_ids_to_tokens(list(range(embedding.shape[0])))
    return train_ids, dev_ids, Universe.from_corpus([*train_ids, *dev_ids], embedding, vocab)


class Encoder:
    """Frozen MiniLM: token ids -> mean-pooled sentence embeddings."""

    def __init__(self, batch: int) -> None:
        from partitioner.zoo import minilm, minilm_tokenizer

        self.model = minilm()
        self.tokenizer = minilm_tokenizer()
        self.batch = batch

    def ids(self, sentences: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, sentences)

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        tok = self.tokenizer
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding
        out = torch.empty(len(sequences), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch):
            chunk = order[start : start + self.batch]
            rows = [[tok.cls_token_id, *sequences[i], tok.sep_token_id] for i in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[chunk] = torch.nn.functional.normalize(pooled, dim=-1)
        return out


def sanitise(mechanism: Mechanism, sequences: list[list[int]]) -> tuple[list[list[int]], float]:
    """All sequences at once (one flat tensor), and the share of tokens changed."""
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    out = mechanism.sanitise(flat)
    changed = float((out != flat).float().mean()) if len(flat) else 0.0
    pieces, start = [], 0
    for s in sequences:
        pieces.append(out[start : start + len(s)].tolist())
        start += len(s)
    return pieces, changed


def accuracy(
    train_x: torch.Tensor, train_y: list[int], dev_x: torch.Tensor, dev_y: list[int]
) -> float:
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(max_iter=2000)
    head.fit(train_x.numpy(), train_y)
    return float(head.score(dev_x.numpy(), dev_y))


def build(
    name: str, universe: Universe, epsilon: float, seed: int, tables: Any, stopwords: set[str]
) -> Mechanism:
    if name == "RNM (teesplit)":
        return RNM(universe, epsilon, seed, tables)
    if name == "RNM + stopwords kept":
        return RNM(universe, epsilon, seed, tables, keep=stopwords)
    if name == "RNM, public stopwords":  # as rnm.public deploys it: out of every group
        return RNM(universe, epsilon, seed, public_groups(universe, stopwords), keep=stopwords)
    if name == "CusText+":
        return CusTextPlus(universe, epsilon, seed, tables, stopwords)
    return SanTextPlus(universe, epsilon, seed)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["mechanism"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["mechanism"] == name]
        eps = [r["epsilon"] for r in rows]
        ax.errorbar(
            eps,
            [r["mean"] for r in rows],
            yerr=[r["std"] for r in rows],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.axhline(results["non_private"]["mean"], linestyle="--", color="grey", label="non-private")
    ax.axhline(0.5, linestyle=":", color="lightgrey", label="chance")
    ax.set_xlabel("ε (per token)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(
        f"frozen MiniLM + logistic head, {results['train_size']:,} train sentences, "
        f"{len(results['seeds'])} seeds",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    eps = results["epsilons"]
    head = "| mechanism | " + " | ".join(f"ε = {e:g}" for e in eps) + " |"
    lines = [head, "|---" * (len(eps) + 1) + "|"]
    for name in dict.fromkeys(r["mechanism"] for r in results["runs"]):
        cells = []
        for e in eps:
            r = next(r for r in results["runs"] if r["mechanism"] == name and r["epsilon"] == e)
            cells.append(f"{r['mean']:.4f} ± {r['std']:.4f} (replaced {r['replaced']:.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    np_ = results["non_private"]
    lines.append(f"| non-private | {np_['mean']:.4f} (every ε) |" + " |" * (len(eps) - 1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--dev-size", type=int, default=0, help="0: the whole dev set")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy"))
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument(
        "--grouping",
        choices=["cosine", "wordfreq", "corpus"],
        default="cosine",
        help="RNM/CusText+ groups: cosine clusters, or frequency strata of wordfreq's counts or "
        "of the train split's (issue 16); results other than cosine's go to sst2-GROUPING.*",
    )
    parser.add_argument("--ratio", type=float, default=RATIO, help="the strata's count ratio")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add these runs to the results already in --out (same settings), replacing "
        "those of the same mechanism and ε",
    )
    args = parser.parse_args(argv)
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    start = time.perf_counter()
    data = Path(args.data)
    train_s, train_y = read_tsv(data / "train.tsv")
    dev_s, dev_y = read_tsv(data / "dev.tsv")
    if args.dev_size:
        dev_s, dev_y = dev_s[: args.dev_size], dev_y[: args.dev_size]
    encoder = Encoder(args.batch)
    embedding = encoder.model.embeddings.word_embeddings.weight
    all_train, dev_ids, universe = corpus(encoder.tokenizer, embedding, train_s, dev_s)
    pick = sorted(
        random.Random(0).sample(range(len(all_train)), min(args.train_size, len(all_train)))
    )
    train_ids = [all_train[i] for i in pick]
    train_y = [train_y[i] for i in pick]
    prior = None
    if args.grouping != "cosine":
        from partitioner.token_prior import corpus_prior, wordfreq_prior

        vocab_size = embedding.shape[0]
        prior = (
            wordfreq_prior(encoder.tokenizer, vocab_size, args.ratio)
            if args.grouping == "wordfreq"
            else corpus_prior(encoder.tokenizer, train_s, "sst2-train", vocab_size, args.ratio)
        )
    tables = groups(universe, prior)
    print(
        f"SST-2: {len(train_ids):,} train / {len(dev_ids):,} dev sentences; universe "
        f"{len(universe):,} tokens; groups of {tables.k} built "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    clean = accuracy(encoder(train_ids), train_y, encoder(dev_ids), dev_y)
    print(f"non-private: {clean:.4f}", flush=True)
    results: dict[str, Any] = {
        "train_size": len(train_ids),
        "dev_size": len(dev_ids),
        "universe": len(universe),
        "k": tables.k,
        "epsilons": args.epsilons,
        "seeds": args.seeds,
        "classifier": "frozen all-MiniLM-L6-v2 (mean pooled) + scikit-learn LogisticRegression",
        "non_private": {"mean": clean, "std": 0.0},
        "grouping": tables.grouping,
        "runs": [],
    }
    for name in args.mechanisms:
        for epsilon in args.epsilons:
            accs, replaced = [], []
            for seed in args.seeds:
                mech = build(name, universe, epsilon, seed, tables, set(ENGLISH_STOP_WORDS))
                tr, _ = sanitise(mech, train_ids)
                dv, rate = sanitise(mech, dev_ids)
                accs.append(accuracy(encoder(tr), train_y, encoder(dv), dev_y))
                replaced.append(rate)
            row = {
                "mechanism": name,
                "epsilon": epsilon,
                "accuracies": accs,
                "mean": statistics.fmean(accs),
                "std": statistics.pstdev(accs),
                "replaced": statistics.fmean(replaced),
            }
            results["runs"].append(row)
            print(
                f"{name:>15} ε={epsilon:g}: {row['mean']:.4f} ± {row['std']:.4f}, "
                f"replaced {row['replaced']:.1%} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sst2" if prior is None else f"sst2-{args.grouping}-ratio{args.ratio:g}"
    if args.merge and (out / f"{stem}.json").is_file():
        old = json.loads((out / f"{stem}.json").read_text())
        new = {(r["mechanism"], r["epsilon"]) for r in results["runs"]}
        kept = [r for r in old["runs"] if (r["mechanism"], r["epsilon"]) not in new]
        results["runs"] = sorted(
            kept + results["runs"], key=lambda r: (MECHANISMS.index(r["mechanism"]), r["epsilon"])
        )
        results["epsilons"] = sorted({r["epsilon"] for r in results["runs"]})
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(table(results) + "\n")
    plot(results, out / f"{stem}.png")
    print(table(results))
    print(f"written to {out}/{stem}.{{json,md,png}} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
