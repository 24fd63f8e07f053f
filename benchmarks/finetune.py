"""A real private fine-tune to split: a LoRA adapter on SmolLM2-135M trained on SST-2 sentences
as next-token text, then split under ``private_finetune`` with the public base named by value.

1. **Train.** peft LoRA (rank 8, alpha 16, on ``q_proj``/``v_proj``) for ``--steps`` AdamW steps
   of ``--batch`` SST-2 train sentences (up to 48 tokens each) as next-token text; the held-out
   loss on SST-2 dev sentences is measured before and after (the adapter must have learnt
   something real). Saved with peft's ``save_pretrained`` to ``--out`` (git-ignored: the
   benchmark makes it, nothing downloads it).
2. **The public base by value.** The base is saved as a transformers folder (what its
   publisher ships: ``model.safetensors`` and ``config.json``), and the policy names it
   (``public_base: <folder>``): a parameter is public only if bit-identical to the base's of
   the same name. The report's public/protected lists are printed in sum.
3. **Equivalence.** ``--eval`` SST-2 dev sentences through the split (exact masks, Freivalds)
   and through the adapted model: arg-max agreement at every position and the largest logit
   difference against float (largest, median and 99th percentile over positions of each
   position's largest difference), and bit-for-bit equality with the quantised reference
   (``passes.exact.quantised_reference``: the split's own arithmetic run without the GPU).
   The same figures for the adapted model in bfloat16 (how a GPU usually serves it) are the
   yardstick: a fine-tune can make the model sensitive at some positions (massive activations
   in the middle layers), where any rounding moves its logits far.

Results: ``benchmarks/results/finetune.json``.

    python benchmarks/finetune.py [--steps 200] [--batch 8] [--eval 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SST2 = ROOT.parent / "shared" / "data" / "sst2"
ADAPTER_DIR = ROOT / "benchmarks" / "results" / "lora-sst2"
MAX_TOKENS = 48
TARGETS = ["q_proj", "v_proj"]


def sentences(split: str) -> list[str]:
    path = SST2 / f"{split}.tsv"
    if not path.is_file():
        raise SystemExit(f"SST-2 not found at {path} (the repository expects ../shared beside it)")
    with path.open(encoding="utf-8") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t")]


def _batches(tokenizer: Any, texts: list[str], size: int) -> Any:
    for i in range(0, len(texts), size):
        enc = tokenizer(
            texts[i : i + size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


def held_out_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, mask, labels in _batches(tokenizer, texts, 16):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def adapted_model(adapter: Path | None = None) -> Any:
    """SmolLM2 with the trained adapter from ``adapter`` (a peft folder), ready to split."""
    from peft import PeftModel

    from partitioner.zoo import smollm2

    return PeftModel.from_pretrained(smollm2(), str(adapter or ADAPTER_DIR)).eval()


def train(steps: int, batch: int, lr: float, seed: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from partitioner.zoo import smollm2, smollm2_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = smollm2_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_texts = sentences("train")
    dev_texts = sentences("dev")[:256]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(smollm2(), config)
    before = held_out_loss(model, tokenizer, dev_texts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        texts = rng.sample(train_texts, batch)
        ids, mask, labels = next(_batches(tokenizer, texts, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(loss))
        if (step + 1) % 25 == 0:
            recent = sum(losses[-25:]) / 25
            print(f"  step {step + 1}/{steps}: train loss {recent:.3f}", flush=True)
    seconds = time.perf_counter() - start
    after = held_out_loss(model, tokenizer, dev_texts)
    ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(ADAPTER_DIR))
    return {
        "lora": {"r": 8, "alpha": 16, "targets": TARGETS},
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "train_seconds": seconds,
        "dev_loss_before": before,
        "dev_loss_after": after,
        "dev_perplexity_before": math.exp(before),
        "dev_perplexity_after": math.exp(after),
        "trainable_parameters": sum(p.numel() for p in params),
        "adapter": str(ADAPTER_DIR.relative_to(ROOT)),
    }


def base_folder(directory: Path) -> Path:
    """SmolLM2 itself (the public base) saved as a transformers folder in ``directory``:
    ``model.safetensors`` (the tied output layer stored once, as the embedding) and
    ``config.json``, as the base's publisher ships it."""
    from safetensors.torch import save_file

    from partitioner.zoo import smollm2

    model = smollm2()  # loaded from GGUF, which save_pretrained refuses: written as it would be
    path = directory / "smollm2-base"
    path.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # stored once, as the embedding
    save_file(state, str(path / "model.safetensors"))
    model.config.save_pretrained(str(path))
    return path


def equivalence(base: Path, n_eval: int) -> dict[str, Any]:
    from partitioner.api import partition
    from partitioner.policy import Policy
    from partitioner.zoo import smollm2_tokenizer
    from passes.exact import quantised_reference

    model = adapted_model()
    tokenizer = smollm2_tokenizer()
    texts = sentences("dev")[-n_eval:]  # not the sentences the dev loss was measured on
    policy = Policy.preset("private_finetune", public_base=str(base))
    split = partition(model, policy)
    params = split.parameters
    reference = quantised_reference(split)
    ex = split.executor()
    # the yardstick for "within the scheme's quantisation error": the same adapted model in
    # bfloat16, the precision a GPU usually serves it at, against the same float32 logits
    bf16 = adapted_model().to(torch.bfloat16)
    agree = agree_bf16 = positions = 0
    deltas: list[torch.Tensor] = []  # per position: max |split - float| over the vocabulary
    deltas_bf16: list[torch.Tensor] = []
    bitwise = True
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :MAX_TOKENS]
            float_logits = model(input_ids=ids).logits
            got = ex(input_ids=ids).logits
            low = bf16(input_ids=ids).logits.float()
            agree += int((got.argmax(-1) == float_logits.argmax(-1)).sum())
            agree_bf16 += int((low.argmax(-1) == float_logits.argmax(-1)).sum())
            positions += ids.shape[1]
            deltas.append((got - float_logits).abs().amax(-1).flatten())
            deltas_bf16.append((low - float_logits).abs().amax(-1).flatten())
            bitwise &= torch.equal(got, reference(input_ids=ids).logits)
    split_d, bf16_d = torch.cat(deltas), torch.cat(deltas_bf16)
    return {
        "policy": "private_finetune",
        "public_base": "SmolLM2 saved as a transformers folder (compared by value)",
        "public_parameters": len(params.public),
        "public_mib": sum(params.public.values()) / 2**20,
        "protected_parameters": len(params.protected),
        "protected_mib": sum(params.protected.values()) / 2**20,
        "protected_why": sorted(set(params.why.values())),
        "gpu_flop_share": 1 - split.share()["flops"],
        "eval_sentences": len(texts),
        "positions": positions,
        "argmax_agreement_vs_float": agree / positions,
        "max_abs_logit_diff_vs_float": float(split_d.max()),
        "median_position_logit_diff_vs_float": float(split_d.median()),
        "p99_position_logit_diff_vs_float": float(split_d.quantile(0.99)),
        "bit_identical_to_quantised_reference": bitwise,
        "bfloat16_model": {
            "argmax_agreement_vs_float": agree_bf16 / positions,
            "max_abs_logit_diff_vs_float": float(bf16_d.max()),
            "median_position_logit_diff_vs_float": float(bf16_d.median()),
            "p99_position_logit_diff_vs_float": float(bf16_d.quantile(0.99)),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true", help="reuse the saved adapter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if args.skip_train and (ADAPTER_DIR / "adapter_config.json").is_file():
        trained = previous.get("training", {})
    else:
        print(f"training a LoRA adapter on SST-2 text: {args.steps} steps of {args.batch}")
        trained = train(args.steps, args.batch, args.lr, args.seed)
        print(
            f"dev loss {trained['dev_loss_before']:.3f} -> {trained['dev_loss_after']:.3f} "
            f"(perplexity {trained['dev_perplexity_before']:.1f} -> "
            f"{trained['dev_perplexity_after']:.1f}) in {trained['train_seconds']:.0f} s"
        )
    with tempfile.TemporaryDirectory() as tmp:
        result = equivalence(base_folder(Path(tmp)), args.eval)
    print(json.dumps(result, indent=1))
    out.write_text(
        json.dumps(
            {"training": trained, "split": result, "seconds": time.perf_counter() - started},
            indent=1,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
