"""The enclave's tokenizer (enclave_runtime/tokenizer.py): transformers' results without
transformers, and a chat template from a bundle cannot reach Python."""

import json

import pytest
import torch

from enclave_runtime.generation import encode_prompt
from enclave_runtime.tokenizer import TOKENIZER_DIR, BundleTokenizer, save_tokenizer
from partitioner.errors import ArtifactError

PROMPTS = ["What is the capital of France?", "héllo wörld!! 123\nsecond line", " x"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from partitioner.zoo import smollm2_tokenizer

    tok = smollm2_tokenizer()
    root = tmp_path_factory.mktemp("bundle")
    save_tokenizer(tok, root)
    return tok, root


@pytest.mark.parametrize("text", PROMPTS)
def test_bundle_tokenizer_equals_transformers(saved, text):
    tok, root = saved
    ours = BundleTokenizer(root)
    ids, public = encode_prompt(ours, text)
    want_ids, want_public = encode_prompt(tok, text)
    assert torch.equal(ids, want_ids) and torch.equal(public, want_public)
    assert ours.decode(ids[0].tolist()) == tok.decode(ids[0].tolist(), skip_special_tokens=True)
    assert ours.eos_token_id == tok.eos_token_id


def test_a_hostile_chat_template_is_a_typed_error(saved, tmp_path):
    _, root = saved
    folder = tmp_path / TOKENIZER_DIR
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_bytes((root / TOKENIZER_DIR / "tokenizer.json").read_bytes())
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (folder / "chat.json").write_text(json.dumps({"chat_template": escape}))
    with pytest.raises(ArtifactError, match="chat template"):
        encode_prompt(BundleTokenizer(tmp_path), "hi")
