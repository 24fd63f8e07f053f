"""The split program computes what the model computes, on every model and preset.

What "the same" means depends on the protection the preset inserts:

* no masks (``all_enclave``, ``all_gpu``): ``assert_close`` at the default fp32 tolerances;
* RNM (``cmif``): the split output equals the model run on the *sanitised* tokens (default
  tolerances), since the model never sees the original ones;
* additive float masks (``secureinfer``): within ``MASKED_TOL`` of the model; masks of scale 1
  cost at most 3.2e-4 on SmolLM2's logits (|logits| up to 35) and 1e-5 on the tiny models;
* field masks (``slalom``): *bit for bit* equal to the quantised unsplit reference
  (``passes.exact.quantised_reference``), which computes the same fixed point without masks.

Presets that decompose SDPA are compared with eager under torch's MATH attention backend, which
the decomposition reproduces op for op.
"""

from collections import Counter

import pytest
import torch
from conftest import MODELS, PRESET_NAMES, built, captured, eager, model_output
from torch.nn.attention import SDPBackend, sdpa_kernel

from partitioner.api import needs_attention_decomposition, partition
from partitioner.label_set import Label
from partitioner.policy import Policy
from passes.exact import quantised_reference
from passes.labels import label_of, label_program

MASKED_TOL = {"rtol": 1e-4, "atol": 1e-3}


def reference(name: str, preset: str, ids: torch.Tensor) -> torch.Tensor:
    if needs_attention_decomposition(Policy.preset(preset)):
        with sdpa_kernel(SDPBackend.MATH):
            return eager(name, ids)
    return eager(name, ids)


def check(name: str, preset: str, shapes=((1, 5), (2, 19))) -> None:
    sp = partition(captured(name), preset, seed=7)
    policy = sp.policy
    vocab = built(name).config.vocab_size
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:  # two lengths: one split program serves any prompt length
        ids = torch.randint(0, vocab, shape, generator=gen)
        with torch.no_grad():
            executor = sp.executor()
            out = model_output(executor(input_ids=ids))
        if policy.rnm is not None:
            sanitised = executor.last_request["sanitised_tokens"]
            assert sanitised.shape == ids.shape
            torch.testing.assert_close(out, reference(name, preset, sanitised))
        elif policy.masking == "exact":
            with torch.no_grad():
                exact = model_output(quantised_reference(sp)(input_ids=ids))
            assert torch.equal(out, exact), f"max |diff| {(out - exact).abs().max()}"
        elif policy.masking == "additive":
            torch.testing.assert_close(out, reference(name, preset, ids), **MASKED_TOL)
        else:
            torch.testing.assert_close(out, reference(name, preset, ids))


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_split_matches_eager(name, preset):
    check(name, preset)


@pytest.mark.parametrize("name", MODELS)
def test_additive_masks_on_linear_layers_match_eager(name):
    """Slalom's placement with float masks: every GPU linear layer on masked activations."""
    sp = partition(captured(name), Policy.preset("slalom", masking="additive"), seed=3)
    ids = torch.randint(0, built(name).config.vocab_size, (2, 11))
    with torch.no_grad():
        out = model_output(sp(input_ids=ids))
    torch.testing.assert_close(out, eager(name, ids), **MASKED_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_smollm2_split_matches_eager(preset):
    check("smollm2-135m", preset, shapes=((1, 24),))


def test_positional_call_and_hf_output_type():
    sp = partition(captured("tiny-llama"), "all_gpu")
    ids = torch.randint(0, 256, (1, 6))
    out = sp(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    torch.testing.assert_close(out.logits, eager("tiny-llama", ids))
    with pytest.raises(TypeError, match="unexpected arguments"):
        sp(input_ids=ids, labels=ids)


@pytest.mark.slow
def test_smollm2_label_counts():
    """Here rather than in test_labels.py: this module captures SmolLM2 already (xdist
    --dist loadscope runs a module in one process, and the capture takes ~45 s)."""
    program = captured("smollm2-135m").program
    label_program(program)
    counts = Counter(label_of(n) for n in program.graph.nodes if n.op == "call_function")
    assert counts[Label.ATTENTION_PROJECTION] == 30 * 4
    assert counts[Label.FFN] == 30 * 3
    assert counts[Label.ATTENTION] == 30
    assert counts[Label.LM_HEAD] == 1
    assert counts[Label.OTHER] == 0
