"""Attacks by whoever can write a bundle on disk (issue 10): each one is tried, and refused.

Where the attack works without the defence, the test shows that first (an unsigned load, or
torch's own loader), so the refusal is seen to be the defence and not an accident.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import zipfile

import pytest
import torch
from adversary import MARKER, copy_bundle, payload, read_plan, rehash, swap_file, write_plan
from conftest import SIGN_KEY, TRUSTED, captured, shared_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.api import load, partition
from partitioner.errors import ArtifactError
from partitioner.plan import Plan
from partitioner.policy import Policy


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    out = {}
    out = {name: shared_bundle(tmp_path_factory, name) for name in ("cmif", "slalom")}
    # the same stages as cmif, but no RNM: a donor of "valid" files without sanitisation
    plain = Policy.preset("cmif", name="plain", rnm=None, protects=frozenset())
    partition(captured("tiny-llama"), plain, seed=2).save(root / "plain", sign_key=SIGN_KEY)
    out["plain"] = root / "plain"
    return out


def identity_rnm_tables(bundle):
    """Rewrite the RNM tables the enclave stage carries (in enclave/weights.safetensors) so
    that every token is alone in its group: the 'sanitised' token is the raw one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rel = "enclave/weights.safetensors"
    with safe_open(str(bundle / rel), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in tensors.items():
        vocab, k = value.shape if value.dim() == 2 else (0, 0)
        if key.endswith("_rnm_candidates"):
            value = torch.full((vocab, k), -1, dtype=torch.int64)
            value[:, 0] = torch.arange(vocab)
        elif key.endswith("_rnm_scores"):
            value = torch.full((vocab, k), float("-inf"))
            value[:, 0] = 1.0
        tensors[key] = value
    save_file(tensors, str(bundle / rel), metadata=meta)
    rehash(bundle, rel)


def test_swapped_rnm_tables_are_refused_even_unsigned(bundles, tmp_path):
    """The stage's own copy of the tables made every token its own group: the prompt would
    reach the GPU as it is. The copy must equal the bundle's RNM file, which must be a
    partition into groups of two or more, whoever signed it."""
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    identity_rnm_tables(bundle)
    with pytest.raises(ArtifactError, match="RNM candidates it carries are not those of"):
        load(bundle, allow_unsigned=True)
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(bundle, trusted_key=TRUSTED)


def test_rnm_tables_that_pass_every_token_leak_the_prompt_unless_the_bundle_is_signed(
    bundles, tmp_path
):
    """Every table consistent and every token marked pass-through, the plan's count edited to
    match: only the signature tells this bundle from the compiler's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    vocab = 0
    for rel in ("enclave/weights.safetensors", "enclave/rnm.safetensors"):
        with safe_open(str(bundle / rel), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key, value in list(tensors.items()):
            if key.endswith("candidates"):
                vocab = value.shape[0]
                tensors[key] = torch.full_like(value, -1)
                tensors[key][:, 0] = torch.arange(vocab)
            elif key.endswith("scores"):
                tensors[key] = torch.full_like(value, float("-inf"))
                tensors[key][:, 0] = 1.0
            elif key.endswith("keep"):
                tensors[key] = torch.ones_like(value)
        save_file(tensors, str(bundle / rel), metadata=meta)
        rehash(bundle, rel)
    with pytest.raises(ArtifactError, match=r"passes \d+ tokens through unchanged, the plan says"):
        load(bundle, allow_unsigned=True)
    document = read_plan(bundle)
    document["plan"]["protection"]["rnm"]["special_tokens"] = vocab
    write_plan(bundle, document)
    ids = torch.randint(3, 250, (1, 12))
    attacked = load(bundle, allow_unsigned=True)  # the attack, without the defence
    with torch.no_grad():
        attacked(input_ids=ids)
    assert torch.equal(attacked.last_request["sanitised_tokens"], ids)  # the GPU gets the prompt
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(bundle, trusted_key=TRUSTED)


def test_an_enclave_stage_swapped_for_another_valid_one_is_refused(bundles, tmp_path):
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    stage = read_plan(bundle)["plan"]["protection"]["rnm"]["stage"]
    swap_file(bundle, bundles["plain"], f"enclave/stages/{stage}.pt2")
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(bundle, trusted_key=TRUSTED)


def test_a_bundle_signed_by_another_key_is_refused(bundles, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ArtifactError, match="signature does not verify"):
        load(bundles["cmif"], trusted_key=other)
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    (bundle / "plan.json.sig").unlink()
    with pytest.raises(ArtifactError, match="is not signed"):
        load(bundle, trusted_key=TRUSTED)
    with pytest.raises(ArtifactError, match="no trusted key"):
        load(bundle)


@pytest.mark.parametrize("exists", [True, False])
def test_a_files_entry_outside_the_bundle_gets_one_message(bundles, tmp_path, exists):
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    outside = tmp_path / "secret.txt"
    if exists:
        outside.write_text("the host's file")
    document = read_plan(bundle)
    document["files"]["enclave/../../secret.txt"] = "0" * 64
    write_plan(bundle, document)
    with pytest.raises(ArtifactError) as refused:
        load(bundle, allow_unsigned=True)
    assert (
        str(refused.value) == "artifact 'enclave/../../secret.txt' is not a file inside the bundle"
    )


def test_links_are_not_followed(bundles, tmp_path):
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    rel = "enclave/stages/enclave_0.pt2"
    elsewhere = tmp_path / "elsewhere.pt2"
    os.replace(bundle / rel, elsewhere)
    os.symlink(elsewhere, bundle / rel)  # same bytes, same hash: only the link differs
    with pytest.raises(ArtifactError, match="not a file inside the bundle"):
        load(bundle, trusted_key=TRUSTED)
    bundle = copy_bundle(bundles["cmif"], tmp_path / "c")
    os.replace(bundle / "enclave" / "stages", tmp_path / "stages")
    os.symlink(tmp_path / "stages", bundle / "enclave" / "stages")
    with pytest.raises(ArtifactError, match="not a file inside the bundle"):
        load(bundle, trusted_key=TRUSTED)


def test_duplicate_keys_and_duplicate_stages_are_refused(bundles, tmp_path):
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    text = (bundle / "plan.json").read_text()
    key = ' "artifact_schema_version": 2,'
    (bundle / "plan.json").write_text(text.replace(key, key + "\n" + key, 1))
    with pytest.raises(ArtifactError, match="duplicate keys"):
        load(bundle, allow_unsigned=True)
    bundle = copy_bundle(bundles["cmif"], tmp_path / "c")
    document = read_plan(bundle)
    document["plan"]["stages"].append(document["plan"]["stages"][0])
    write_plan(bundle, document)
    with pytest.raises(ArtifactError, match="duplicate stage names"):
        load(bundle, allow_unsigned=True)


@pytest.mark.parametrize("where", ["edge shape", "masked pad shape", "input dims", "stage name"])
def test_payloads_in_plan_text_are_never_evaluated(bundles, tmp_path, where):
    bundle = copy_bundle(bundles["slalom"], tmp_path / "b")
    marker = tmp_path / "ran"
    code = payload(marker)
    document = read_plan(bundle)
    plan = document["plan"]
    if where == "edge shape":
        plan["edges"][0]["shape"][-1] = code
    elif where == "masked pad shape":
        first = next(iter(plan["protection"]["masked"]))
        plan["protection"]["masked"][first][0][-1] = code
    elif where == "input dims":
        plan["input_dims"]["input_ids"][-1] = code
    else:
        plan["stages"][0]["name"] = "../../" + code
    write_plan(bundle, document)
    with pytest.raises(ArtifactError):
        executor = load(bundle, allow_unsigned=True)
        executor(input_ids=torch.randint(3, 250, (1, 5)))
    assert not marker.exists()


def test_an_output_type_cannot_choose_a_module_to_import(bundles, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil_outputs.py").write_text(payload(marker) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    document = read_plan(bundle)
    spec = json.loads(document["plan"]["signature"]["out_spec"])
    spec[1]["type"] = "evil_outputs.Output"
    document["plan"]["signature"]["out_spec"] = json.dumps(spec)
    write_plan(bundle, document)
    with pytest.raises(ArtifactError, match="not one of the containers"):
        load(bundle, allow_unsigned=True)
    assert not marker.exists() and "evil_outputs" not in sys.modules


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (payload(self.marker),))


def test_a_pickle_planted_in_a_stage_archive_never_runs(bundles, tmp_path):
    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    rel = "enclave/stages/enclave_0.pt2"
    path = bundle / rel
    marker = tmp_path / "ran"
    with zipfile.ZipFile(path) as original:
        entries = {n: original.read(n) for n in original.namelist()}
    inputs = next(n for n in entries if n.endswith("sample_inputs/model.pt"))
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    entries[inputs] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as planted:
        for name, data in entries.items():
            planted.writestr(name, data)
    rehash(bundle, rel)
    # torch's own loader unpickles it (this is the attack) ...
    try:
        torch.export.load(str(path))
    except Exception:
        pass
    assert marker.read_text() == MARKER
    marker.unlink()
    # ... teesplit's loader reads the graph as JSON and tensors from safetensors only.
    executor = load(bundle, allow_unsigned=True)
    with torch.no_grad():
        executor(input_ids=torch.randint(3, 250, (1, 5)))
    assert not marker.exists()
    # and the compiler writes no pickled inputs into the archives to begin with
    with zipfile.ZipFile(bundles["cmif"] / rel) as clean:
        saved = clean.read(next(n for n in clean.namelist() if n.endswith("model.pt")))
    assert len(saved) < 1024  # at most an empty pickle: no example tensors


# -- the plan loader under fuzzing: a Plan or an ArtifactError, nothing else -----------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def plan_dict():
    sp = partition(captured("tiny-llama"), "slalom", seed=2)
    return json.loads(json.dumps(sp.spec.to_dict()))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            yield from _paths(value, (*prefix, i))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_plans_give_a_plan_or_an_artifact_error(plan_dict, data):
    document = copy.deepcopy(plan_dict)
    paths = list(_paths(document))[1:]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        try:  # an earlier mutation may have removed the path: then this one does nothing
            parent = document
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict) and data.draw(st.booleans()):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(_json_values)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Plan.from_dict(document)
    except ArtifactError:
        pass


def test_a_graph_that_writes_files_is_refused(bundles, tmp_path):
    """Found by the red team: registered aten ops (from_file, copy_) in a stage graph could
    overwrite any file the enclave's user can write, even with the pickle route closed."""
    from adversary import plant_file_write

    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    victim, source = tmp_path / "victim.txt", tmp_path / "payload.txt"
    victim.write_text("untouched #")
    source.write_text("PWNED-bund #")
    plant_file_write(bundle, "enclave/stages/enclave_0.pt2", victim, source, 11)
    with pytest.raises(ArtifactError, match=r"calls aten\.from_file"):
        executor = load(bundle, allow_unsigned=True)
        executor(input_ids=torch.randint(3, 250, (1, 5)))
    assert victim.read_text() == "untouched #"


def test_the_launcher_measures_a_bundle_only_after_its_signature(bundles, tmp_path):
    from enclave_runtime.manifest import measure_peak

    bundle = copy_bundle(bundles["cmif"], tmp_path / "b")
    identity_rnm_tables(bundle)  # a tampered, validly hashed bundle
    key = tmp_path / "trusted.pub"
    from cryptography.hazmat.primitives import serialization

    key.write_bytes(
        TRUSTED.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ArtifactError, match="signature does not verify"):
        measure_peak(bundle, {"batch": 1, "seq": 8}, trusted_key=str(key))
