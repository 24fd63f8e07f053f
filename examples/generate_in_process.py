"""SmolLM2-135M under `secureinfer`, generating with a KV cache in one process.

Every value that crosses to the GPU side is masked; the attention products run on masked q, k,
softmax and v, and the enclave removes the masks. The greedy tokens equal transformers'
`generate` on the same prompt. (`make demo` runs the two-process version under `cmif`.)

    python examples/generate_in_process.py
"""

from __future__ import annotations

import time
import warnings

import torch

from enclave_runtime.generation import encode_prompt, generate
from partitioner.api import partition
from partitioner.generation import capture_decoder
from partitioner.zoo import smollm2, smollm2_tokenizer


def main() -> None:
    warnings.simplefilter("ignore")
    model, tokenizer = smollm2(), smollm2_tokenizer()
    split = partition(capture_decoder(model), "secureinfer", model_name="SmolLM2-135M-Instruct")
    print(split.report().splitlines()[0])
    ids, _ = encode_prompt(tokenizer, "What is the capital of France?")
    start = time.perf_counter()
    out = generate(split, ids, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r} ({out.shape[1] - ids.shape[1]} tokens in {seconds:.1f} s)")
    print(f"tokens identical to transformers' generate: {torch.equal(out, reference)}")


if __name__ == "__main__":
    main()
