"""Test fixtures: tiny random-config models, seeded, and the name -> builder registry.

``BUILDERS`` holds the real models of ``partitioner.zoo`` (MiniLM, SmolLM2, the meta-device 7B)
plus the tiny ones below, so the suite refers to every model by one name. Imported as
``models`` (pytest puts ``tests/`` on ``sys.path`` because it has no ``__init__.py``); the
library and the CLI never import it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from partitioner import zoo


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def tiny_llama(num_hidden_layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return _seeded(lambda: Qwen2ForCausalLM(config))


def tiny_opt() -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return _seeded(lambda: OPTForCausalLM(config))


def tiny_phi3() -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return _seeded(lambda: Phi3ForCausalLM(config))


def tiny_llama_lora() -> torch.nn.Module:
    """The tiny Llama wrapped in a peft LoRA adapter on q/v projections and the MLP."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
    )
    model = get_peft_model(base, config)

    def randomise() -> torch.nn.Module:
        # peft initialises lora_B to zero; make the adapter contribute so numerics test it.
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        return model

    return _seeded(randomise)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    **zoo.BUILTIN,
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-qwen2": tiny_qwen2,
    "tiny-opt": tiny_opt,
    "tiny-phi3": tiny_phi3,
    "tiny-llama-lora": tiny_llama_lora,
}
