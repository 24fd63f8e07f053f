"""The enclave's weights sealed at rest (``partitioner.sealing``).

What must hold: under ``protects: [model]`` whoever reads a bundle's files on disk must not
read the protected parameters. In the clear they are there, byte for byte (the attack below
finds them); sealed, no file of the bundle holds them, the enclave loads them with the key
and computes what the unsealed bundle computes, and a missing key, another key, a changed
ciphertext or a changed record is refused with an ``ArtifactError`` naming the file.
"""

from __future__ import annotations

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


def secrets(program, smallest: int = 4096, span: int = 256) -> list[bytes]:
    """The raw bytes of the model's weights of ``smallest`` bytes or more (what a reader of
    the disk would look for), each ``span`` bytes from its middle."""
    out = []
    for value in program.source.state_dict.values():
        raw = value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        if len(raw) >= smallest:
            out.append(raw[len(raw) // 2 - span // 2 : len(raw) // 2 + span // 2])
    assert out
    return out


@pytest.fixture(scope="module")
def rnm_program():
    """The tiny Llama under all_enclave with RNM on its tokens: tables built from the
    embedding, which the policy protects."""
    from conftest import captured

    from partitioner.api import partition
    from partitioner.policy import Policy, RNMConfig

    policy = Policy.preset(PRESET, name="rnm+model", rnm=RNMConfig(epsilon=1.0, candidates=4))
    return partition(captured("tiny-llama"), policy, seed=BUNDLE_SEED)


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


def test_rnm_tables_derived_from_a_protected_embedding_are_sealed_too(
    rnm_program, key_file, tmp_path, monkeypatch
):
    """RNM's tables are the embedding's cosine neighbours and their scores: under
    ``protects: [model]`` they describe a protected parameter (a fine-tuned embedding), and
    the enclave alone reads them. In the clear the attack below finds the scores a reader of
    the disk would recompute from the embedding; sealed, no file holds them, and the key
    loads the same tables."""
    program = rnm_program
    tables = program.protection.rnm.tables
    # what the tables say of the protected embedding: a token's scores are its normalised
    # cosines with its group's members
    unit = torch.nn.functional.normalize(
        program.source.state_dict["model.embed_tokens.weight"].detach(), dim=1
    )
    token = int(torch.nonzero(~tables.keep)[0])
    group = tables.candidates[token][tables.candidates[token] >= 0]
    cos = unit[group] @ unit[token]
    normed = (cos - cos.min()) / (cos.max() - cos.min())
    assert torch.allclose(tables.scores[token, : len(group)], normed, atol=1e-6)
    raw = tables.scores.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    derived = [raw[len(raw) // 2 : len(raw) // 2 + 128]]
    clear = program.save(tmp_path / "clear", sign_key=SIGN_KEY)
    assert found_on_disk(clear, derived) == 1
    root = program.save(tmp_path / "sealed", sign_key=SIGN_KEY, enclave_key=key_file)
    assert found_on_disk(root, derived) == 0
    record = json.loads((root / "plan.json").read_text())["sealed"]
    assert record["files"] == ["enclave/weights.safetensors", "enclave/rnm.safetensors"]
    loaded = load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    assert torch.equal(loaded.protection.rnm.tables.scores, tables.scores)
    monkeypatch.delenv(sealing.ENV, raising=False)
    with pytest.raises(ArtifactError, match=r"enclave/weights.safetensors is sealed: give"):
        load_program(root, trusted_key=TRUSTED)


def test_a_sealed_bundle_compiled_ahead_of_time_holds_no_protected_parameter(key_file, tmp_path):
    """The compiled enclave libraries (``enclave/aot/``) take their weights as inputs from the
    sealed file; a library that embedded a constant would hold it in the clear. Every
    parameter of 32 bytes or more is searched for, the norms moved off their initial ones
    first (a run of 1.0 is in any library)."""
    from conftest import BUILDERS

    from partitioner.api import partition
    from partitioner.capturing import capture

    model = BUILDERS["tiny-llama"]()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    program = partition(capture(model, model_name="tiny-llama"), PRESET, seed=BUNDLE_SEED)
    wanted = secrets(program, smallest=32, span=32)
    assert len(wanted) >= 10
    clear = program.save(tmp_path / "clear", sign_key=SIGN_KEY)
    assert found_on_disk(clear, wanted) == len(wanted)
    root = program.save(
        tmp_path / "sealed", sign_key=SIGN_KEY, enclave_key=key_file, compile_enclave="stages"
    )
    assert any((root / "enclave" / "aot").glob("*.so"))
    assert found_on_disk(root, wanted) == 0


def test_plan_json_is_no_fingerprint_of_the_enclaves_files_in_the_clear(rnm_program, tmp_path):
    """The GPU host reads plan.json (its worker checks gpu/ against it). In the clear, the
    hash of enclave/weights.safetensors depended on the weights alone: a GPU host that
    compiled candidate fine-tunes matched the deployed one by it (a review's finding). Salted,
    two saves of one program hash differently; the enclave loads either."""
    program = rnm_program
    hashes = []
    for run in ("a", "b"):
        root = program.save(tmp_path / run, sign_key=SIGN_KEY)
        files = json.loads((root / "plan.json").read_text())["files"]
        hashes.append({k: v for k, v in files.items() if k.startswith("enclave/")})
        assert load_program(root, trusted_key=TRUSTED).protection.rnm.tables is not None
    for rel in ("enclave/weights.safetensors", "enclave/rnm.safetensors"):
        assert hashes[0][rel] != hashes[1][rel], rel


def resign(root: Path, change) -> None:
    """``plan.json`` changed by ``change`` (with the enclave's files' hashes as they are now)
    and signed again with the compiler's key: the compiler's own mistake, not an attacker's."""
    import hashlib

    from partitioner.signing import sign

    doc = json.loads((root / "plan.json").read_text())
    change(doc)
    for rel in doc["files"]:
        doc["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    raw = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    (root / "plan.json").write_bytes(raw)
    (root / "plan.json.sig").write_bytes(sign(raw, SIGN_KEY))


def test_a_sealed_record_must_name_exactly_the_files_only_the_enclave_reads(
    rnm_program, key_file, tmp_path
):
    """A record that seals the weights alone, with RNM's tables in the clear (as bundles
    sealed before the tables were), is refused rather than read; so is one naming tables
    that a plan without RNM does not have (a review's finding: both loaded)."""
    program = rnm_program
    root = program.save(tmp_path / "rnm", sign_key=SIGN_KEY, enclave_key=key_file)
    (root / "enclave" / "rnm.safetensors").write_bytes(program.protection.rnm.tables.to_bytes())
    with pytest.raises(ArtifactError, match="tampered"):  # unsigned change: its hash
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    resign(root, lambda doc: None)  # named sealed, written in the clear: the cipher refuses
    with pytest.raises(ArtifactError, match=r"enclave/rnm\.safetensors"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    resign(root, lambda doc: doc["sealed"].update(files=["enclave/weights.safetensors"]))
    with pytest.raises(ArtifactError, match=r"'sealed' must be .*rnm\.safetensors"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)

    plain = partition_for_tests(PRESET).save(
        tmp_path / "plain", sign_key=SIGN_KEY, enclave_key=key_file
    )
    assert load_program(plain, trusted_key=TRUSTED, enclave_key=key_file).stages
    files = ["enclave/weights.safetensors", "enclave/rnm.safetensors"]
    resign(plain, lambda doc: doc["sealed"].update(files=files))
    with pytest.raises(ArtifactError, match="'sealed' must be"):
        load_program(plain, trusted_key=TRUSTED, enclave_key=key_file)


@pytest.fixture(scope="module")
def sealed(program, key_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("b") / "sealed"
    return program.save(root, sign_key=SIGN_KEY, enclave_key=key_file)


def test_no_key_another_key_and_a_short_key_are_refused(sealed, tmp_path, monkeypatch):
    monkeypatch.delenv(sealing.ENV, raising=False)
    with pytest.raises(ArtifactError, match=r"enclave/weights.safetensors is sealed: give"):
        load_program(sealed, trusted_key=TRUSTED)
    other = sealing.new_key(tmp_path / "other.key")
    with pytest.raises(ArtifactError, match="another enclave key"):
        load_program(sealed, trusted_key=TRUSTED, enclave_key=other)
    with pytest.raises(ArtifactError, match="16 or 32 raw bytes"):
        load_program(sealed, trusted_key=TRUSTED, enclave_key=b"short")


def test_the_key_file_named_in_the_environment_unseals(sealed, key_file, monkeypatch):
    monkeypatch.setenv(sealing.ENV, str(key_file))
    assert load_program(sealed, trusted_key=TRUSTED).stages


def test_a_sealed_bundle_is_not_unsealed_unsigned(sealed, key_file, tmp_path):
    """Unsigned, whoever writes the folder chooses the graphs that read the unsealed weights:
    a stage whose output is its own weight would send it to the GPU (a review's finding).
    So a sealed bundle is unsealed only with its signature checked."""
    with pytest.raises(ArtifactError, match="only with its signature checked"):
        load_program(sealed, allow_unsigned=True, enclave_key=key_file)


def test_a_key_given_for_a_bundle_in_the_clear_is_refused(program, key_file, tmp_path):
    """Where sealed bundles are expected, a plaintext one swapped in (an older signed build)
    is refused rather than loaded."""
    root = program.save(tmp_path / "clear", sign_key=SIGN_KEY)
    with pytest.raises(ArtifactError, match="is not sealed, though an enclave key was given"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)


def test_a_changed_ciphertext_is_refused(sealed, key_file, tmp_path):
    """Signed, the changed file fails its hash; and GCM's tag refuses it on its own, as it
    refuses the file's bytes read under another path (the path is associated data)."""
    import shutil

    root = tmp_path / "b"
    shutil.copytree(sealed, root)
    rel = "enclave/weights.safetensors"
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2] ^= 1
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tampered"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    key = sealing.load_key(key_file)
    with pytest.raises(ArtifactError, match="does not decrypt"):
        sealing.unseal(bytes(data), key, rel)
    with pytest.raises(ArtifactError, match="does not decrypt"):
        sealing.unseal((sealed / rel).read_bytes(), key, "enclave/other.safetensors")
    assert sealing.unseal((sealed / rel).read_bytes(), key, rel)


def test_a_sealed_record_removed_or_changed_is_refused(sealed, key_file, tmp_path):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(sealed, root)
    doc = json.loads((root / "plan.json").read_text())
    # signed: any change to plan.json breaks the signature
    (root / "plan.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "sealed"}))
    with pytest.raises(ArtifactError, match="signature"):
        load_program(root, trusted_key=TRUSTED, enclave_key=key_file)
    # unsigned: the record removed is a bundle in the clear where a key was given; a record
    # naming another file or cipher is refused by its shape
    with pytest.raises(ArtifactError, match="not sealed, though an enclave key"):
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
    with pytest.raises(ArtifactError, match="cannot create"):
        sealing.new_key(tmp_path / "no-such-folder" / "k")


def test_a_key_path_that_is_a_folder_or_a_fifo_is_refused_at_once(tmp_path):
    """A FIFO would block the enclave's start for ever, a folder raised an untyped error."""
    with pytest.raises(ArtifactError, match="raw bytes or a key file's path, got int"):
        sealing.load_key(3)  # an untyped TypeError from open() (a review's finding)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path, fifo):
        with pytest.raises(ArtifactError, match="not a regular file"):
            sealing.load_key(bad)
    # a link is followed, as secret stores mount keys (Kubernetes: key -> ..data/key)
    link = tmp_path / "link"
    key = sealing.new_key(tmp_path / "k")
    link.symlink_to(key)
    assert sealing.load_key(link) == key.read_bytes()
    with pytest.raises(ArtifactError, match="cannot read"):
        sealing.load_key(tmp_path / "missing")
