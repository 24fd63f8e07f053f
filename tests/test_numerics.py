"""The split program computes what the model computes, on every model and preset.

Presets that decompose SDPA (so softmax can stay in the enclave) are compared with eager
under torch's MATH attention backend, which the decomposition reproduces op for op; the other
presets are compared with plain eager. Both at ``assert_close``'s default fp32 tolerances.
"""

import pytest
import torch
from conftest import PRESET_NAMES, built, captured, eager, model_output
from torch.nn.attention import SDPBackend, sdpa_kernel

from partitioner.api import needs_attention_decomposition, partition
from partitioner.policy import Policy

MODELS = [
    "tiny-llama",
    "tiny-gpt2",
    "tiny-qwen2",
    "tiny-opt",
    "tiny-phi3",
    "minilm",
    "tiny-llama-lora",
]


def check(name: str, preset: str, shapes=((1, 5), (2, 19))) -> None:
    sp = partition(captured(name), preset)
    vocab = built(name).config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:  # two lengths: one split program serves any prompt length
        ids = torch.randint(0, vocab, shape, generator=gen)
        with torch.no_grad():
            out = model_output(sp(input_ids=ids))
        if needs_attention_decomposition(Policy.preset(preset)):
            with sdpa_kernel(SDPBackend.MATH):
                ref = eager(name, ids)
        else:
            ref = eager(name, ids)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_split_matches_eager(name, preset):
    check(name, preset)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_smollm2_split_matches_eager(preset):
    check("smollm2-135m", preset, shapes=((1, 24),))


def test_positional_call_and_hf_output_type():
    sp = partition(captured("tiny-llama"), "cmif")
    ids = torch.randint(0, 256, (1, 6))
    out = sp(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    torch.testing.assert_close(out.logits, eager("tiny-llama", ids))
    with pytest.raises(TypeError, match="unexpected arguments"):
        sp(input_ids=ids, labels=ids)
