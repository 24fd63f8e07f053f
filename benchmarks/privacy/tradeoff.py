"""Accuracy against what the GPU recovers, per mechanism and ε (issue 15).

For the SST-2 harness's token universe and groups (``sst2.py``), each mechanism's attack
(``attack.py``): the GPU inverts the embedding to the sanitised token and takes the
Bayes-optimal guess of the original given the mechanism (its groups and noise, or SanText+'s
whole channel) and a unigram prior from SST-2 *train*. Reported per mechanism and ε: the
expected share of SST-2 *dev* tokens recovered, over all tokens and over content words (not a
stopword, not punctuation), beside the uniform-prior bound ``e^ε/(e^ε+K−1)`` of the grouped
mechanisms (SanText+'s metric DP has no such bound), and beside the accuracies the harnesses
measured (``sst2.json``: frozen encoder; ``finetuned.json``: fine-tuned, when present).

    python benchmarks/privacy/tradeoff.py --data ../shared/data/sst2

Writes ``<out>/tradeoff.json``, ``tradeoff.md`` and ``tradeoff.png`` (accuracy against Bayes
recovery, one curve per mechanism, a point per ε; the non-private classifier at recovery 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.privacy.attack import (  # noqa: E402
    GroupAttack,
    SanTextAttack,
    custext_channel,
    rnm_channel,
    uniform_bound,
    unigram_prior,
)
from benchmarks.privacy.mechanisms import (  # noqa: E402
    K,
    SanTextPlus,
    Universe,
    groups,
    public_groups,
)
from benchmarks.privacy.sst2 import MECHANISMS, corpus, read_tsv  # noqa: E402
from partitioner.rnm_tables import RNMTables  # noqa: E402


@functools.cache
def _rnm_channel(epsilon: float) -> Any:
    """RNM's channel at ``epsilon``, each group's integrated once (both RNM lines share it)."""
    integrate = rnm_channel(2.0 / epsilon)
    done: dict[bytes, torch.Tensor] = {}

    def channel(scores: torch.Tensor) -> torch.Tensor:
        key = bytes(str(tuple(scores.shape)), "ascii") + scores.numpy().tobytes()
        if key not in done:
            done[key] = integrate(scores)
        return done[key].clone()

    return channel


def recovery(
    name: str,
    universe: Universe,
    tables: RNMTables,
    stop: torch.Tensor,
    epsilon: float,
    prior: torch.Tensor,
    text: torch.Tensor,
    content: torch.Tensor,
) -> tuple[float, float]:
    """(all tokens, content words) the Bayes guess recovers, expected over the noise."""
    if name == "SanText+":
        mech = SanTextPlus(universe, epsilon, seed=0)
        attack = SanTextAttack(universe.embedding, mech.sensitive, epsilon, mech.p, prior)
        return attack.expected(text), attack.expected(text[content])
    if name == "RNM, public stopwords":
        words = {tok for tok, s in zip(universe.tokens, stop.tolist(), strict=True) if s}
        tables = public_groups(universe, words)
    keep = tables.keep | stop if name != "RNM (teesplit)" else tables.keep
    t = RNMTables(tables.candidates, tables.scores, keep, epsilon)
    channel = custext_channel(epsilon) if name == "CusText+" else _rnm_channel(epsilon)
    group = GroupAttack(t, prior, text.tolist(), channel)
    return group.expected(text).bayes, group.expected(text[content]).bayes


def accuracies(path: Path, key: str) -> dict[tuple[str, float], float]:
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["runs"]
    return {(r["mechanism"], r["epsilon"]): r[key] for r in runs}


def plot(rows: list[dict[str, Any]], non_private: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for harness, marker, style in (("frozen", "o", "-"), ("fine-tuned", "s", "--")):
        for i, name in enumerate(MECHANISMS):
            pts = [r for r in rows if r["mechanism"] == name and r.get(harness) is not None]
            if not pts:
                continue
            ax.plot(
                [r["bayes"] for r in pts],
                [r[harness] for r in pts],
                marker=marker,
                linestyle=style,
                color=f"C{i}",
                label=f"{name} ({harness})",
            )
            for r in pts:
                ax.annotate(f"ε={r['epsilon']:g}", (r["bayes"], r[harness]), fontsize=6)
        if harness in non_private:
            ax.plot([1.0], [non_private[harness]], marker=marker, color="grey", linestyle="")
    ax.set_xlabel("tokens the GPU recovers (Bayes guess, SST-2 dev)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("privacy–utility: accuracy against the attack (grey: non-private)", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the recovery figures from the tradeoff.json in --out and only join the "
        "accuracies measured since (the attack takes minutes, the join none)",
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    if args.reuse:
        rows = json.loads((out / "tradeoff.json").read_text())["rows"]
        _write(rows, out)
        return rows
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from partitioner.zoo import minilm, minilm_tokenizer

    start = time.perf_counter()
    train_s, _ = read_tsv(Path(args.data) / "train.tsv")
    dev_s, _ = read_tsv(Path(args.data) / "dev.tsv")
    tokenizer = minilm_tokenizer()

    embedding = minilm().embeddings.word_embeddings.weight
    train, dev, universe = corpus(tokenizer, embedding, train_s, dev_s)
    tables = groups(universe)
    prior = unigram_prior(([int(universe.local[t]) for t in s] for s in train), len(universe))
    text = universe.local[torch.tensor([t for s in dev for t in s])]
    stop = torch.tensor([tok in ENGLISH_STOP_WORDS for tok in universe.tokens])
    content = (~stop[text]) & torch.tensor(
        [any(c.isalnum() for c in universe.tokens[int(i)]) for i in text]
    )
    rows = []
    for name in MECHANISMS:
        for epsilon in args.epsilons:
            every, words = recovery(name, universe, tables, stop, epsilon, prior, text, content)
            bound = None if name == "SanText+" else uniform_bound(epsilon, K)
            row = {
                "mechanism": name,
                "epsilon": epsilon,
                "bayes": every,
                "bayes_content": words,
                "bound": bound,
            }
            rows.append(row)
            print(
                f"{name:>22} ε={epsilon:g}: recovers {every:6.1%} of tokens, {words:6.1%} of "
                f"content words (bound {'-' if bound is None else f'{bound:.1%}'}) "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    _write(rows, out)
    return rows


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    """Join each row with the accuracies the harnesses measured (``sst2.json``,
    ``finetuned.json`` in ``out``), then write the table, the JSON and the plot."""
    frozen = accuracies(out / "sst2.json", "mean")
    tuned = accuracies(out / "finetuned.json", "accuracy")
    for row in rows:
        key = (row["mechanism"], row["epsilon"])
        row["frozen"], row["fine-tuned"] = frozen.get(key), tuned.get(key)
    non_private = {}
    for harness, file in (("frozen", "sst2.json"), ("fine-tuned", "finetuned.json")):
        if (out / file).is_file():
            value = json.loads((out / file).read_text())["non_private"]
            non_private[harness] = value["mean"] if isinstance(value, dict) else value
    results = {"attacker_prior": "SST-2 train", "rows": rows, "non_private": non_private}
    (out / "tradeoff.json").write_text(json.dumps(results, indent=1))
    (out / "tradeoff.md").write_text(table(rows) + "\n")
    plot(rows, non_private, out / "tradeoff.png")


def table(rows: list[dict[str, Any]]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.1%}"

    def acc(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    lines = [
        "| mechanism | ε | recovered (all) | recovered (content words) | bound | "
        "accuracy, frozen | accuracy, fine-tuned |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mechanism']} | {r['epsilon']:g} | {pct(r['bayes'])} | "
            f"{pct(r['bayes_content'])} | {pct(r['bound'])} | {acc(r['frozen'])} | "
            f"{acc(r['fine-tuned'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
