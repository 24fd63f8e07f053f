"""Shared fixtures: models are built and captured once per session (SmolLM2 takes ~20 s)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from models import BUILDERS

from partitioner.capturing import Captured, capture
from partitioner.signing import generate_keypair

# The compiler's signing key for bundles saved by tests, and the public key that loads them.
SIGN_KEY = Ed25519PrivateKey.generate()
TRUSTED = SIGN_KEY.public_key()

PRESET_NAMES = ["cmif", "secureinfer", "slalom", "all_enclave", "all_gpu"]
# Every architecture the core supports, at sizes that keep the suite fast (SmolLM2 is `slow`).
MODELS = [
    "tiny-llama",
    "tiny-gpt2",
    "tiny-qwen2",
    "tiny-opt",
    "tiny-phi3",
    "minilm",
    "tiny-llama-lora",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.json from the current compiler instead of comparing",
    )


@functools.cache
def built(name: str) -> torch.nn.Module:
    return BUILDERS[name]()


@functools.cache
def captured(name: str) -> Captured:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(built(name), model_name=name)


def model_output(out: object) -> torch.Tensor:
    """The main tensor of a transformers output (logits or last hidden state)."""
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    assert isinstance(out, torch.Tensor)
    return out


def eager(name: str, ids: torch.Tensor) -> torch.Tensor:
    model = built(name)
    kwargs = {}
    if "use_cache" in (captured(name).program.call_spec.in_spec.child(1).context or []):
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model_output(model(input_ids=ids, **kwargs))


@pytest.fixture(scope="session")
def key_files(tmp_path_factory):
    """(private, public) PEM files of a fresh key pair, for the CLI."""
    return generate_keypair(tmp_path_factory.mktemp("keys") / "compiler.key")
