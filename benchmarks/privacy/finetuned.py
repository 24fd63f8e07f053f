"""Privacy–utility on SST-2 with a classifier that learns the noise (issue 15).

The frozen-encoder harness (``sst2.py``) trains only a logistic head on MiniLM's pooled
output. Here all-MiniLM-L6-v2 is **fine-tuned end to end** (mean pooling, a linear head,
cross-entropy) on the *sanitised* training subset and tested on the sanitised dev set, for the
non-private baseline and each mechanism of ``mechanisms.py`` at each ε, over the same token
universe and groups as ``sst2.py``. One seed (the machine has two CPU cores): the training
subset is drawn once with seed 0 and shared by every run; each run starts from the same
pretrained weights and the same head initialisation.

    python benchmarks/privacy/finetuned.py --data ../shared/data/sst2 [--train-size 4000]
        [--epochs 2] [--epsilons 1 2]

Writes ``<out>/finetuned.json``, ``finetuned.md`` and ``finetuned.png`` (accuracy against ε,
the frozen-encoder figures of ``sst2.json`` dotted beside them when present).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.privacy.mechanisms import groups  # noqa: E402
from benchmarks.privacy.sst2 import (  # noqa: E402
    MECHANISMS,
    build,
    corpus,
    read_tsv,
    sanitise,
)


class Classifier(torch.nn.Module):
    """MiniLM, mean pooled, and a linear head: every weight is trained."""

    def __init__(self, encoder: torch.nn.Module, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def batches(tokenizer: Any, sequences: list[list[int]], size: int, order: list[int]) -> Any:
    """(indices, ids, mask) batches of ``[CLS] seq [SEP]`` in ``order``, padded per batch."""
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        rows = [[tokenizer.cls_token_id, *sequences[i][:62], tokenizer.sep_token_id] for i in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        yield chunk, ids, mask


def fine_tune(
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    train: tuple[list[list[int]], list[int]],
    dev: tuple[list[list[int]], list[int]],
    args: argparse.Namespace,
    label: str,
) -> float:
    """Train a fresh copy of the pretrained MiniLM on ``train``; its accuracy on ``dev``."""
    from tqdm import tqdm

    from partitioner.zoo import minilm

    encoder = minilm()
    encoder.load_state_dict(state)
    model = Classifier(encoder, seed=0).train()
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": args.lr},
            {"params": model.head.parameters(), "lr": args.head_lr},
        ]
    )
    x, y = train
    labels = torch.tensor(y)
    steps = args.epochs * -(-len(x) // args.batch)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)
    rng = random.Random(0)
    with tqdm(total=steps, desc=label, leave=False, file=sys.stderr) as bar:
        for _ in range(args.epochs):
            order = list(range(len(x)))
            rng.shuffle(order)
            for chunk, ids, mask in batches(tokenizer, x, args.batch, order):
                loss = torch.nn.functional.cross_entropy(model(ids, mask), labels[chunk])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()
    dx, dy = dev
    order = sorted(range(len(dx)), key=lambda i: len(dx[i]))
    correct = 0
    with torch.no_grad():
        for chunk, ids, mask in batches(tokenizer, dx, 64, order):
            pred = model(ids, mask).argmax(-1)
            correct += int((pred == torch.tensor([dy[i] for i in chunk])).sum())
    return correct / len(dx)


def table(results: dict[str, Any]) -> str:
    eps = results["epsilons"]
    lines = ["| mechanism | " + " | ".join(f"ε = {e:g}" for e in eps) + " |"]
    lines.append("|---" * (len(eps) + 1) + "|")
    for name in dict.fromkeys(r["mechanism"] for r in results["runs"]):
        cells = []
        for e in eps:
            r = next(
                (r for r in results["runs"] if r["mechanism"] == name and r["epsilon"] == e), None
            )
            cells.append(
                "–" if r is None else f"{r['accuracy']:.4f} (replaced {r['replaced']:.0%})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"| non-private | {results['non_private']:.4f} (every ε) |" + " |" * (len(eps) - 1)
    )
    return "\n".join(lines)


def plot(results: dict[str, Any], frozen: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for name in dict.fromkeys(r["mechanism"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["mechanism"] == name]
        (line,) = ax.plot(
            [r["epsilon"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name
        )
        colours[name] = line.get_color()
    if frozen:
        for name, colour in colours.items():
            rows = [r for r in frozen["runs"] if r["mechanism"] == name]
            ax.plot(
                [r["epsilon"] for r in rows],
                [r["mean"] for r in rows],
                linestyle=":",
                color=colour,
                alpha=0.6,
            )
    ax.axhline(results["non_private"], linestyle="--", color="grey", label="non-private")
    ax.axhline(0.5, linestyle=":", color="lightgrey")
    ax.set_xlabel("ε (per token)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(
        f"fine-tuned MiniLM, {results['train_size']:,} train sentences, {results['epochs']} "
        "epochs (dotted: frozen encoder)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--dev-size", type=int, default=0, help="0: the whole dev set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="resume: keep the runs (and the non-private figure) already in --out's "
        "finetuned.json, replacing those of the same mechanism and ε",
    )
    args = parser.parse_args(argv)
    import warnings

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from partitioner.zoo import minilm, minilm_tokenizer

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    start = time.perf_counter()
    data = Path(args.data)
    train_s, train_y = read_tsv(data / "train.tsv")
    dev_s, dev_y = read_tsv(data / "dev.tsv")
    if args.dev_size:
        dev_s, dev_y = dev_s[: args.dev_size], dev_y[: args.dev_size]
    tokenizer = minilm_tokenizer()
    pretrained = minilm()
    state = {k: v.clone() for k, v in pretrained.state_dict().items()}

    embedding = pretrained.embeddings.word_embeddings.weight
    all_train, dev_ids, universe = corpus(tokenizer, embedding, train_s, dev_s)
    pick = sorted(
        random.Random(0).sample(range(len(all_train)), min(args.train_size, len(all_train)))
    )
    train_ids, train_labels = [all_train[i] for i in pick], [train_y[i] for i in pick]
    tables = groups(universe)
    print(
        f"SST-2: {len(train_ids):,} train / {len(dev_ids):,} dev sentences, {args.epochs} "
        f"epochs of batch {args.batch}; universe {len(universe):,} tokens",
        flush=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = (
        json.loads((out / "finetuned.json").read_text())
        if args.merge and (out / "finetuned.json").is_file()
        else None
    )
    if previous is not None:
        clean = previous["non_private"]
    else:
        clean = fine_tune(
            state, tokenizer, (train_ids, train_labels), (dev_ids, dev_y), args, "non-private"
        )
    print(f"non-private: {clean:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    results: dict[str, Any] = {
        "train_size": len(train_ids),
        "dev_size": len(dev_ids),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": 0,
        "classifier": "all-MiniLM-L6-v2 fine-tuned end to end (mean pooled) + linear head",
        "epsilons": args.epsilons,
        "non_private": clean,
        "runs": [],
    }
    if previous is not None:
        asked = {(m, e) for m in args.mechanisms for e in args.epsilons}
        results["runs"] = [
            r for r in previous["runs"] if (r["mechanism"], r["epsilon"]) not in asked
        ]
        results["epsilons"] = sorted({*previous["epsilons"], *args.epsilons})
    for name in args.mechanisms:
        for epsilon in args.epsilons:
            mech = build(name, universe, epsilon, 0, tables, set(ENGLISH_STOP_WORDS))
            tr, _ = sanitise(mech, train_ids)
            dv, rate = sanitise(mech, dev_ids)
            label = f"{name} ε={epsilon:g}"
            acc = fine_tune(state, tokenizer, (tr, train_labels), (dv, dev_y), args, label)
            results["runs"].append(
                {"mechanism": name, "epsilon": epsilon, "accuracy": acc, "replaced": rate}
            )
            print(
                f"{label:>26}: {acc:.4f}, replaced {rate:.1%} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            # after every run: a long run stopped part-way keeps what it measured
            results["runs"].sort(key=lambda r: (MECHANISMS.index(r["mechanism"]), r["epsilon"]))
            (out / "finetuned.json").write_text(json.dumps(results, indent=1))
    (out / "finetuned.json").write_text(json.dumps(results, indent=1))
    (out / "finetuned.md").write_text(table(results) + "\n")
    frozen_path = out / "sst2.json"
    frozen = json.loads(frozen_path.read_text()) if frozen_path.is_file() else None
    plot(results, frozen, out / "finetuned.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
