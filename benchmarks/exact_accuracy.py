"""What exact masking's fixed point costs in accuracy, on the real models.

Under ``masking="exact"`` (the ``slalom`` preset) the split program equals, bit for bit, the
unsplit model with its GPU layers computed in fixed point (``passes.exact.quantised_reference``:
integer weights per output channel, row-scaled activations). This script measures that
reference against the float model: on SmolLM2-135M, arg-max agreement and perplexity on text
(SST-2 dev sentences read from ``--data``, never copied into the repository) and on random
token sequences, plus the logit error; on all-MiniLM-L6-v2, the hidden-state error and the
cosine of mean-pooled embeddings. The masked split itself runs on the text batch and must
equal the reference bit for bit.

    python benchmarks/exact_accuracy.py [--data ../shared/data/sst2] [--texts 64] [--prompts 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "a gripping, beautifully acted film that never lets go.",
    "the plot is thin and the jokes fall flat.",
    "an uneven but ultimately rewarding experience.",
    "i would not recommend this movie to anyone.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--texts", type=int, default=64, help="SST-2 dev sentences, joined")
    parser.add_argument("--prompts", type=int, default=4, help="random 128-token sequences")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    from partitioner.api import partition
    from partitioner.zoo import minilm, minilm_tokenizer, smollm2, smollm2_tokenizer
    from passes.exact import quantised_reference

    model, tok = smollm2(), smollm2_tokenizer()
    split = partition(model, "slalom", model_name="smollm2-135m")
    reference = quantised_reference(split)
    masked_run = split.executor()
    lines = (Path(args.data) / "dev.tsv").read_text().splitlines()[1 : args.texts + 1]
    text = " ".join(line.split("\t")[0].strip() for line in lines)
    text_ids = tok(text, return_tensors="pt").input_ids[:, :512]
    gen = torch.Generator().manual_seed(0)
    randoms = [
        torch.randint(0, model.config.vocab_size, (1, 128), generator=gen)
        for _ in range(args.prompts)
    ]
    with torch.no_grad():
        masked = masked_run(input_ids=text_ids).logits
        for name, batches in (("SST-2 text", [text_ids]), ("random tokens", randoms)):
            worst, total, count, agree, positions = 0.0, 0.0, 0, 0, 0
            nll_float = nll_fixed = 0.0
            for ids in batches:
                fixed = reference(input_ids=ids).logits
                exact = model(input_ids=ids, use_cache=False).logits
                if ids is text_ids:
                    bits_equal = bool(torch.equal(masked, fixed))
                diff = (fixed - exact).abs()
                worst = max(worst, float(diff.max()))
                total += float(diff.sum())
                count += diff.numel()
                agree += int((fixed.argmax(-1) == exact.argmax(-1)).sum())
                positions += ids.shape[1]
                target = ids[0, 1:]
                for logits, acc in ((exact, "float"), (fixed, "fixed")):
                    nll = torch.nn.functional.cross_entropy(logits[0, :-1], target, reduction="sum")
                    if acc == "float":
                        nll_float += float(nll)
                    else:
                        nll_fixed += float(nll)
            tokens = positions - len(batches)
            ppl_float, ppl_fixed = math.exp(nll_float / tokens), math.exp(nll_fixed / tokens)
            print(
                f"SmolLM2-135M, {name} ({len(batches)} sequences, {positions} positions): "
                f"arg-max agreement {agree / positions:.2%}, perplexity float "
                f"{ppl_float:.3f} vs exact-masked {ppl_fixed:.3f}, "
                f"max |Δlogit| {worst:.4f}, mean |Δlogit| {total / count:.5f}"
            )
    print(f"masked split == quantised reference bit for bit (the SST-2 text): {bits_equal}")

    bert, btok = minilm(), minilm_tokenizer()
    split = partition(bert, "slalom", model_name="minilm")
    reference = quantised_reference(split)
    enc = btok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        worst, cosines = 0.0, []
        for row in range(len(SENTENCES)):
            ids = enc.input_ids[row : row + 1, : int(enc.attention_mask[row].sum())]
            fixed = reference(input_ids=ids).last_hidden_state
            exact = bert(input_ids=ids).last_hidden_state
            worst = max(worst, float((fixed - exact).abs().max()))
            cosines.append(float(torch.cosine_similarity(fixed.mean(1), exact.mean(1)).item()))
    print(
        f"all-MiniLM-L6-v2 ({len(SENTENCES)} sentences): max |Δhidden| {worst:.4f}, "
        f"mean-pooled embedding cosine min {min(cosines):.6f}"
    )


if __name__ == "__main__":
    main()
