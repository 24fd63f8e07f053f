"""The enclave's weights sealed at rest (``partitioner.sealing``).

What must hold: under ``protects: [model]`` whoever reads a bundle's files on disk must not
read the protected parameters. In the clear they are there, byte for byte (the attack below
finds them); sealed, no file of the bundle holds them, the enclave loads them with the key
and computes what the unsealed bundle computes, and a missing key, another key, a changed
ciphertext or a changed record is refused with an ``ArtifactError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_SEED, SIGN_KEY, TRUSTED, model_output, partition_for_tests

from partitioner import sealing
from partitioner.api import load
from partitioner.bundle import load_program
from partitioner.errors import ArtifactError

PRESET = "all_enclave"  # protects the model, every weight in enclave/
IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


@pytest.fixture(scope="module")
def program():
    return partition_for_tests(PRESET)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    return sealing.new_key(tmp_path_factory.mktemp("key") / "enclave.key")


def secrets(program) -> list[bytes]:
    """The raw bytes of the model's larger weights (what a reader of the disk would look
    for), each 256 bytes from its middle."""
    out = []
    for value in program.source.state_dict.values():
        raw = value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        if len(raw) >= 4096:
            out.append(raw[len(raw) // 2 : len(raw) // 2 + 256])
    assert out
    return out


def found_on_disk(root: Path, wanted: list[bytes]) -> int:
    """How many of ``wanted`` occur in some file under ``root``."""
    blobs = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    return sum(any(w in blob for blob in blobs) for w in wanted)


def test_in_the_clear_a_reader_of_the_disk_finds_the_protected_weights(program, tmp_path):
    root = program.save(tmp_path / "clear", sign_key=SIGN_KEY)
    assert found_on_disk(root, secrets(program)) == len(secrets(program))


def test_sealed_no_file_holds_them_and_the_key_loads_the_same_program(program, key_file, tmp_path):
    root = program.save(tmp_path / "sealed", sign_key=SIGN_KEY, enclave_key=key_file)
    assert found_on_disk(root, secrets(program)) == 0
    record = json.loads((root / "plan.json").read_text())["sealed"]
    assert record == {
        "cipher": "AES-GCM",
        "key": sealing.fingerprint(sealing.load_key(key_file)),
        "files": ["enclave/weights.safetensors"],
    }
    loaded = load(root, trusted_key=TRUSTED, seed=BUNDLE_SEED, enclave_key=key_file)
    fresh = partition_for_tests(PRESET)
    with torch.no_grad():
        assert torch.equal(model_output(loaded(input_ids=IDS)), model_output(fresh(input_ids=IDS)))


@pytest.fixture(scope="module")
def sealed(program, key_file, tmp_path_factory):
    return program.save(tmp_path_factory.mktemp("b") / "sealed", enclave_key=key_file)


def test_no_key_another_key_and_a_short_key_are_refused(sealed, tmp_path, monkeypatch):
    monkeypatch.delenv(sealing.ENV, raising=False)
    with pytest.raises(ArtifactError, match=r"enclave/weights.safetensors is sealed"):
        load_program(sealed, allow_unsigned=True)
    other = sealing.new_key(tmp_path / "other.key")
    with pytest.raises(ArtifactError, match="another enclave key"):
        load_program(sealed, allow_unsigned=True, enclave_key=other)
    with pytest.raises(ArtifactError, match="16 or 32 raw bytes"):
        load_program(sealed, allow_unsigned=True, enclave_key=b"short")


def test_the_key_file_named_in_the_environment_unseals(sealed, key_file, monkeypatch):
    monkeypatch.setenv(sealing.ENV, str(key_file))
    assert load_program(sealed, allow_unsigned=True).stages


def _rehash(root: Path, rel: str) -> None:
    """What a writer of an unsigned bundle does after changing ``rel``: fix its hash."""
    doc = json.loads((root / "plan.json").read_text())
    doc["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    (root / "plan.json").write_text(json.dumps(doc))


def test_a_changed_ciphertext_is_refused_even_with_its_hash_fixed(program, key_file, tmp_path):
    root = program.save(tmp_path / "b", enclave_key=key_file)
    rel = "enclave/weights.safetensors"
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2] ^= 1
    (root / rel).write_bytes(bytes(data))
    _rehash(root, rel)
    with pytest.raises(ArtifactError, match="does not decrypt"):
        load_program(root, allow_unsigned=True, enclave_key=key_file)


def test_a_sealed_record_removed_or_changed_is_refused(program, key_file, tmp_path):
    root = program.save(tmp_path / "b", sign_key=SIGN_KEY, enclave_key=key_file)
    doc = json.loads((root / "plan.json").read_text())
    # signed: any change to plan.json breaks the signature
    (root / "plan.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "sealed"}))
    with pytest.raises(ArtifactError, match="signature"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    # unsigned: the ciphertext read as a weights file is refused, and a record naming
    # another file or cipher is refused by its shape
    with pytest.raises(ArtifactError):
        load_program(root, allow_unsigned=True, enclave_key=key_file)
    for bad in ({**doc["sealed"], "files": ["gpu/weights.safetensors"]}, {"cipher": "none"}):
        (root / "plan.json").write_text(json.dumps({**doc, "sealed": bad}))
        with pytest.raises(ArtifactError, match="'sealed' must be"):
            load_program(root, allow_unsigned=True, enclave_key=key_file)


def test_a_key_is_never_written_over_and_is_private(tmp_path):
    path = sealing.new_key(tmp_path / "k")
    assert len(path.read_bytes()) == 32 and os.stat(path).st_mode & 0o077 == 0
    with pytest.raises(ArtifactError, match="not replacing"):
        sealing.new_key(path)
