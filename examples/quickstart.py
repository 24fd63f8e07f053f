"""The README's example: split a tiny random Llama, audit it, check it against the model."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from partitioner.api import audit, partition

config = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForCausalLM(config).eval()  # any Hugging Face causal LM; inputs are built for you
split = partition(model, "secureinfer")  # or "cmif", "slalom", a Policy, or a policy.yaml
audit(split)  # partition already ran it; this prints every cut edge and its protection
ids = torch.randint(0, model.config.vocab_size, (1, 12))
with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    out, ref = split(input_ids=ids).logits, model(input_ids=ids).logits
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)  # float masks cost rounding
print(split.report())
