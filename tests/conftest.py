"""Shared fixtures: models are built and captured once per session (SmolLM2 takes ~20 s)."""

from __future__ import annotations

import datetime
import fcntl
import functools
import ipaddress
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from models import BUILDERS

from partitioner.api import partition
from partitioner.capturing import Captured, capture
from partitioner.generation import capture_decoder
from partitioner.signing import SIGNATURE_FILE, generate_keypair, sign

# The compiler's signing key for bundles saved by tests, and the public key that loads them.
SIGN_KEY = Ed25519PrivateKey.generate()
TRUSTED = SIGN_KEY.public_key()


def at_once(target: Callable[[Any], None], items: Iterable[Any], timeout: float = 120) -> None:
    """``target(item)`` for every item, each in its own thread, all started before any is
    joined: concurrent sessions or calls."""
    threads = [threading.Thread(target=target, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def self_signed(host: str = "localhost") -> tuple[bytes, bytes]:
    """A PEM certificate for ``host`` (a name, or an IP address) and its key: a test CA of
    one."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


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


# The seed of the bundles tests share (``shared_bundle``): a test that compares a loaded
# bundle with a fresh partition partitions with this seed too.
BUNDLE_SEED = 4
# The same for the shared bundles of the tiny Llama's decoder step (``shared_step_bundle``).
STEP_SEED = 3


@functools.cache
def step(name: str) -> Captured:
    """The KV-cache decoder step of a model (``capture_decoder``), captured once per process
    (the tiny Llama's takes ~10 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_decoder(built(name))


def shared_bundle(tmp_path_factory: pytest.TempPathFactory, policy: str) -> Path:
    """tiny-llama (``captured``) partitioned under the preset ``policy`` with
    :data:`BUNDLE_SEED` and saved, as a fresh copy signed with :data:`SIGN_KEY`."""
    return _shared(tmp_path_factory, policy, partition_for_tests)


def shared_step_bundle(
    tmp_path_factory: pytest.TempPathFactory, policy: str, key: Ed25519PrivateKey = SIGN_KEY
) -> Path:
    """tiny-llama's decoder step (``step``) partitioned under ``policy`` with
    :data:`STEP_SEED` and saved, as a fresh copy signed with ``key``."""
    return _shared(tmp_path_factory, f"step-{policy}", partition_step_for_tests, policy, key)


def _shared(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    make: Callable[[str], Any],
    policy: str | None = None,
    key: Ed25519PrivateKey = SIGN_KEY,
) -> Path:
    """Saving is the slow part of many modules' fixtures (an export and an ONNX export per
    stage), so the run saves each shared bundle once: the first test process to ask saves it
    under a lock in the run's temporary directory (shared by xdist's workers), the others
    copy it. Each copy is the caller's to change; it is re-signed because every process has
    its own :data:`SIGN_KEY`."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-bundles"
    shared.mkdir(exist_ok=True)
    built_at = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not built_at.is_dir():
            partial = shared / f"{name}.partial"  # a whole bundle or none under its name
            shutil.rmtree(partial, ignore_errors=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make(policy or name).save(partial)
            partial.rename(built_at)
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(built_at, copy, dirs_exist_ok=True)
    (copy / SIGNATURE_FILE).write_bytes(sign((copy / "plan.json").read_bytes(), key))
    return copy


def partition_step_for_tests(policy: str) -> Any:
    """The program :func:`shared_step_bundle` saves, made afresh (same seed, same pads)."""
    return partition(step("tiny-llama"), policy, seed=STEP_SEED)


def partition_for_tests(policy: str) -> Any:
    """The program :func:`shared_bundle` saves, made afresh (same seed, same pads)."""
    return partition(captured("tiny-llama"), policy, seed=BUNDLE_SEED)
