"""Save -> load gives the same program; a tampered, missing or added file is refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    BUNDLE_SEED,
    PRESET_NAMES,
    SIGN_KEY,
    TRUSTED,
    captured,
    model_output,
    partition_for_tests,
    shared_bundle,
)

from partitioner.api import load, partition
from partitioner.errors import ArtifactError
from partitioner.policy import Policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One bundle per preset for tiny-llama, saved once for the module."""
    out = {}
    for preset in PRESET_NAMES:
        out[preset] = (Policy.preset(preset), shared_bundle(tmp_path_factory, preset))
    return out


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_loaded_program_gives_the_same_outputs(saved, preset):
    policy, path = saved[preset]
    fresh = partition_for_tests(preset)  # same pads as the loaded pool
    loaded = load(path, trusted_key=TRUSTED, seed=BUNDLE_SEED)
    ids = torch.randint(3, 250, (2, 11))
    with torch.no_grad():
        want, got = model_output(fresh(input_ids=ids)), model_output(loaded(input_ids=ids))
    if policy.masking == "additive":  # exported graphs may round differently
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)
    assert loaded.plan() == json.loads(json.dumps(fresh.plan()))


def test_the_gpu_bundle_holds_no_protected_weight(saved):
    from safetensors.torch import load_file

    _, path = saved["secureinfer"]
    gpu = load_file(str(path / "gpu" / "weights.safetensors"))
    params = dict(captured("tiny-llama").program.state_dict)
    for tensor in gpu.values():
        assert not any(
            p.shape == tensor.shape and torch.equal(p.detach(), tensor) for p in params.values()
        )
    plan = json.loads((path / "plan.json").read_text())
    assert all(not f.startswith("gpu/") or "corrections" not in f for f in plan["files"])


def _copy(path: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(path, target)
    return target


def test_tampered_missing_and_unlisted_files_are_refused(saved, tmp_path):
    _, path = saved["slalom"]
    bundle = _copy(path, tmp_path)
    stage = next((bundle / "gpu" / "stages").glob("*.pt2"))
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    rel = str(stage.relative_to(bundle))
    with pytest.raises(ArtifactError, match=f"artifact {rel} does not match its sha256"):
        load(bundle, trusted_key=TRUSTED)
    stage.unlink()
    with pytest.raises(ArtifactError, match=f"artifact {rel} is missing"):
        load(bundle, trusted_key=TRUSTED)
    bundle = _copy(path, tmp_path / "again")
    (bundle / "enclave" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"unlisted files .*enclave/extra\.bin"):
        load(bundle, trusted_key=TRUSTED)
    (bundle / "plan.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"plan\.json: the signature does not verify"):
        load(bundle, trusted_key=TRUSTED)  # checked before a byte of it is parsed
    with pytest.raises(ArtifactError, match=r"plan\.json is not valid JSON"):
        load(bundle, allow_unsigned=True)


def test_save_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    sp = partition(captured("tiny-llama"), "all_gpu")
    with pytest.raises(ArtifactError, match=r"is not empty and holds no plan\.json"):
        sp.save(tmp_path, sign_key=SIGN_KEY)


def test_saving_over_a_bundle_replaces_it_whole(tmp_path_factory):
    """A bundle saved over another (the same --out twice) keeps none of the old files: its
    GPU stages, its signature. The new one loads, unsigned until it is signed again."""
    root = shared_bundle(tmp_path_factory, "cmif")  # this test's own copy
    assert list((root / "gpu").rglob("*.onnx")) and (root / "plan.json.sig").is_file()
    split = partition(captured("tiny-llama"), "all_enclave")
    split.save(root)
    assert not list((root / "gpu").rglob("*.onnx")) and not (root / "plan.json.sig").exists()
    with pytest.raises(ArtifactError, match="is not signed"):
        load(root, trusted_key=TRUSTED)
    assert load(root, allow_unsigned=True).plan() == json.loads(json.dumps(split.plan()))
    split.save(root, sign_key=SIGN_KEY)
    assert load(root, trusted_key=TRUSTED).policy.name == "all_enclave"


def test_loading_needs_no_model_source_code(saved):
    _, path = saved["cmif"]
    script = (
        "import sys; sys.modules['transformers.models.llama.modeling_llama'] = None\n"
        "sys.modules['partitioner.zoo'] = None\n"
        "import torch; from partitioner.api import load\n"
        f"p = load({str(path)!r}, allow_unsigned=True)\n"
        "print(p(input_ids=torch.tensor([[5, 6, 7]])).logits.shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "torch.Size([1, 3, 256])" in out.stdout


@pytest.mark.parametrize("preset", ["secureinfer", "slalom"])
def test_onnx_gpu_stages_match_the_exported_stages_under_onnxruntime(saved, preset):
    from runtime.onnx_stage import onnx_stage

    _, path = saved[preset]
    loaded = load(path, trusted_key=TRUSTED)
    gen = torch.Generator().manual_seed(0)
    for stage in (s for s in loaded.stages if s.side == "gpu"):
        run = onnx_stage(path / "gpu" / "stages" / f"{stage.name}.onnx")
        args = []
        for i in range(len(stage.inputs)):
            dims, dtype = _input_shape(loaded, stage, i)
            if dtype in ("int32", "int64"):  # exact masks: residues uniform over the ring
                wide = torch.randint(-(2**62), 2**62, dims, generator=gen) * 2
                args.append(wide.to(torch.int32) if dtype == "int32" else wide)
            else:
                args.append(torch.randn(dims, generator=gen))
        want = stage.module(*args)
        got = run(*args)
        for w, g in zip(want, got, strict=True):
            if w.dtype.is_floating_point:
                torch.testing.assert_close(g, w)
            else:  # ring arithmetic under onnxruntime: bit for bit
                assert torch.equal(w, g)


def _input_shape(program, stage, index):
    """Concrete shape of a stage input at batch=2, seq=7, from the plan's edge shapes."""
    from partitioner.dims import concrete_shape

    name = stage.inputs[index]
    edge = next(e for e in program.spec.edges if e.name == name and e.consumer == stage.name)
    return concrete_shape(edge.shape, {"batch": 2, "seq": 7}), edge.dtype
