"""The README's ten-line example: split a tiny Llama and check it against the model."""

import torch

from partitioner import partition
from partitioner.models import tiny_llama

model = tiny_llama()  # any Hugging Face causal LM works; example inputs are built for you
split = partition(model, "secureinfer")  # or "cmif", "slalom", a Policy, or a policy.yaml
print(split.report())
ids = torch.randint(0, model.config.vocab_size, (1, 12))
with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    torch.testing.assert_close(split(input_ids=ids).logits, model(input_ids=ids).logits)
print("split program == model")
