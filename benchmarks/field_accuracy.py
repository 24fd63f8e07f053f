"""What field masking's fixed point costs in accuracy, on the real models.

Under ``masking="field"`` (the ``slalom`` preset) the split program equals, bit for bit, the
unsplit model with its GPU layers computed in fixed point (``quantised_reference``; the test
suite checks the equality). This measures that reference against the float model:

* SmolLM2-135M-Instruct: logits on ``--prompts`` random token sequences of 128 tokens and on
  a chat prompt; max and mean |Δ|, and how often the arg-max token agrees;
* all-MiniLM-L6-v2: last hidden state on SST-2-like sentences (max |Δ|) and the cosine between
  the mean-pooled sentence embeddings.

    python benchmarks/field_accuracy.py [--prompts 8]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from partitioner.api import partition
    from partitioner.zoo import minilm, minilm_tokenizer, smollm2, smollm2_tokenizer
    from passes.field import FRAC_BITS, RANGE_BITS, quantised_reference

    print(
        f"field: p = 2**61 - 1, activations {FRAC_BITS} fractional bits, outputs exact "
        f"while |y| < 2**{RANGE_BITS}"
    )
    model, tok = smollm2(), smollm2_tokenizer()
    split = partition(model, "slalom", model_name="smollm2-135m")
    reference = quantised_reference(split)
    masked_run = split.executor()  # one executor (and mask pool) for every prompt
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, model.config.vocab_size, (1, 128), generator=gen)
        for _ in range(args.prompts)
    ]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batches.append(tok(chat, return_tensors="pt").input_ids)
    worst, total, count, agree, positions = 0.0, 0.0, 0, 0, 0
    bits_equal = True
    with torch.no_grad():
        for ids in batches:
            fixed = reference(input_ids=ids).logits
            exact = model(input_ids=ids, use_cache=False).logits
            masked = masked_run(input_ids=ids).logits
            bits_equal &= torch.equal(masked, fixed)
            diff = (fixed - exact).abs()
            worst = max(worst, float(diff.max()))
            total += float(diff.sum())
            count += diff.numel()
            agree += int((fixed.argmax(-1) == exact.argmax(-1)).sum())
            positions += ids.shape[1]
    print(
        f"SmolLM2-135M ({len(batches)} prompts, {positions} positions): max |Δlogit| {worst:.4f}, "
        f"mean |Δlogit| {total / count:.5f}, arg-max agreement {agree / positions:.2%}; "
        f"masked split == quantised reference bit for bit: {bits_equal}"
    )

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
