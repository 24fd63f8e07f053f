"""The bundle's tokenizer, read without transformers: ``enclave/tokenizer/``.

``teesplit partition`` saves the model's fast tokenizer (``tokenizer.json``) and its chat
template and EOS id (``chat.json``) into the enclave bundle, hashed like every other file. This
module reads them with the ``tokenizers`` library and renders the template with Jinja2's
sandbox, so the enclave process tokenizes prompts without importing transformers or model code,
and a template from a tampered bundle cannot reach Python attributes. It offers the small part
of a transformers tokenizer that ``encode_prompt`` and the driver use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from partitioner.bundle import VerifiedFiles
from partitioner.errors import ArtifactError

TOKENIZER_DIR = "enclave/tokenizer"


def save_tokenizer(tokenizer: Any, root: Path) -> None:
    """Write a transformers fast tokenizer's files under ``root/enclave/tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ArtifactError("the tokenizer has no fast (tokenizers) backend to save")
    folder = root / TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    chat = {
        "chat_template": getattr(tokenizer, "chat_template", None) or None,
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }
    (folder / "chat.json").write_text(json.dumps(chat, indent=1, sort_keys=True) + "\n")


class BundleTokenizer:
    """Encode, decode and chat-template a prompt from the bundle's tokenizer files."""

    def __init__(self, root: Path, files: VerifiedFiles | None = None) -> None:
        from tokenizers import Tokenizer

        folder = root / TOKENIZER_DIR
        try:
            if files is None:  # tests and tools; the enclave reads through ``files``
                spec = (folder / "tokenizer.json").read_text(encoding="utf-8")
                chat = json.loads((folder / "chat.json").read_text(encoding="utf-8"))
            else:  # listed in plan.json, read once, hashed: what decides what the GPU sees
                spec = files.read(f"{TOKENIZER_DIR}/tokenizer.json").decode("utf-8")
                chat = json.loads(files.read(f"{TOKENIZER_DIR}/chat.json"))
            self._tok = Tokenizer.from_str(spec)
        except Exception as exc:  # tokenizers and json raise several types for a bad file
            raise ArtifactError(f"cannot read the bundle's tokenizer in {folder}: {exc}") from None
        if not isinstance(chat, dict):
            raise ArtifactError(f"{folder / 'chat.json'}: expected a JSON object")
        self.chat_template = chat.get("chat_template")
        self.eos_token_id = chat.get("eos_token_id")
        self._special = {"bos_token": chat.get("bos_token"), "eos_token": chat.get("eos_token")}

    def apply_chat_template(
        self, chat: list[dict[str, str]], *, tokenize: bool = False, add_generation_prompt: bool
    ) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ArtifactError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template or "")
            return template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **self._special
            )
        except TemplateError as exc:  # includes the sandbox's SecurityError
            raise ArtifactError(f"the bundle's chat template failed: {exc}") from None

    def __call__(
        self, text: str, *, return_tensors: str = "pt", return_offsets_mapping: bool = False
    ) -> dict[str, torch.Tensor]:
        enc = self._tok.encode(text)
        out = {"input_ids": torch.tensor([enc.ids], dtype=torch.int64)}
        if return_offsets_mapping:
            out["offset_mapping"] = torch.tensor([enc.offsets], dtype=torch.int64)
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def bundle_tokenizer(root: Path, files: VerifiedFiles) -> BundleTokenizer | None:
    """The bundle's tokenizer (its files checked against plan.json's hashes), or None when the
    bundle was saved without one."""
    if f"{TOKENIZER_DIR}/tokenizer.json" not in files.files:
        return None
    return BundleTokenizer(root, files)
