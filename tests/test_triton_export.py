"""``teesplit export-triton``: a bundle's GPU stages as a Triton model repository.

Each ``config.pbtxt`` is parsed back into tritonclient's ``ModelConfig`` and checked against the
plan and the exported ``model.onnx``; one model runs under onnxruntime against the in-process
GPU stage; the CLI names a missing or tampered bundle in one line.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import shared_bundle, shared_step_bundle
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from partitioner.bundle import load_program, read_plan
from partitioner.cli import main
from partitioner.signing import generate_keypair
from partitioner.triton_repo import DTYPES, export_repository, version_of

ROOT = Path(__file__).resolve().parent.parent
ONNX_TO_TRITON = {elem: pb.DataType.Value(name) for name, elem in DTYPES.values()}
CONTROLS = {"START", "END", "READY"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny Llama's decoder step under cmif (its GPU stage refills the cache the enclave
    holds) and all_gpu (its GPU stage reads the cache itself), and the model under slalom
    (exact masks: int32 residues cross the cut)."""
    out = {name: shared_step_bundle(tmp_path_factory, name) for name in ("cmif", "all_gpu")}
    out["slalom"] = shared_bundle(tmp_path_factory, "slalom")
    return out


@pytest.fixture(scope="module")
def repos(bundles, tmp_path_factory):
    out = {}
    for name, bundle in bundles.items():
        repo = tmp_path_factory.mktemp(f"repo-{name}")
        export_repository(bundle / "gpu", repo)
        out[name] = (repo, bundle)
    return out


def _config(repo: Path, stage: str) -> pb.ModelConfig:
    return text_format.Parse((repo / stage / "config.pbtxt").read_text(), pb.ModelConfig())


def _has_state(plan, stage) -> bool:
    refills = {plan.flat_outputs[s.output] for s in plan.state.values()}
    return bool(set(plan.state) & set(stage.inputs) or refills & set(stage.outputs))


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["cmif", "all_gpu", "slalom"])
def test_every_config_matches_the_plan_and_its_onnx_model(repos, name):
    repo, bundle = repos[name]
    plan = read_plan(bundle)
    digest = hashlib.sha256((bundle / "plan.json").read_bytes()).hexdigest()
    version = version_of(digest)
    assert version == int(digest[:8], 16) > 0
    gpu = [s for s in plan.stages if s.side == "gpu"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(s.name for s in gpu)
    int32_seen = False
    for stage in gpu:
        config = _config(repo, stage.name)
        assert sorted(p.name for p in (repo / stage.name).iterdir()) == [
            str(version),
            "config.pbtxt",
        ]
        model = onnx.load(str(repo / stage.name / str(version) / "model.onnx"))
        assert (config.name, config.backend, config.max_batch_size) == (
            stage.name,
            "onnxruntime",
            0,
        )
        assert list(config.version_policy.specific.versions) == [version]
        assert config.parameters["teesplit.plan_sha256"].string_value == digest
        [group] = config.instance_group
        assert (group.kind, group.count) == (pb.ModelInstanceGroup.KIND_GPU, 1)
        onnx_in = {i.name: i for i in model.graph.input}
        onnx_out = {o.name: o for o in model.graph.output}
        batching = config.HasField("sequence_batching")
        assert batching == _has_state(plan, stage), stage.name
        states = {s.input_name: s for s in config.sequence_batching.state}
        # the ONNX model's inputs: the config's, the implicit states and the control inputs
        controls = {c.name for c in config.sequence_batching.control_input}
        assert controls == (CONTROLS if batching else set())
        assert [i.name for i in config.input] == [n for n in stage.inputs if n not in states]
        assert set(onnx_in) == {i.name for i in config.input} | set(states) | controls
        assert [o.name for o in config.output] == stage.outputs + stage.masked_outputs
        assert set(onnx_out) == {o.name for o in config.output} | {
            s.output_name for s in states.values()
        }
        edges = {e.name: e for e in plan.edges if stage.name in (e.consumer, e.producer)}
        for io, onnx_io in [(io, onnx_in[io.name]) for io in config.input] + [
            (io, onnx_out[io.name]) for io in config.output
        ]:
            edge = edges[io.name]
            assert io.data_type == ONNX_TO_TRITON[onnx_io.type.tensor_type.elem_type]
            assert io.data_type == pb.DataType.Value(DTYPES[edge.dtype][0])
            int32_seen |= io.data_type == pb.TYPE_INT32
            assert list(io.dims) == [d if isinstance(d, int) else -1 for d in edge.shape]
            for want, got in zip(io.dims, _dims(onnx_io), strict=True):
                assert want == -1 or want == got, (io.name, list(io.dims), _dims(onnx_io))
        for control in config.sequence_batching.control_input:
            assert control.control[0].int32_false_true == [0, 1]
            assert onnx_in[control.name].type.tensor_type.elem_type == onnx.TensorProto.INT32
        for state in states.values():
            shape = edges[state.input_name].shape
            assert list(state.dims) == [d if isinstance(d, int) else -1 for d in shape]
            [initial] = state.initial_state
            assert initial.zero_data and list(initial.dims) == [
                d if isinstance(d, int) else plan.dim_ranges[d][0] for d in shape
            ]
    stateful = [s for s in gpu if _has_state(plan, s)]
    if name == "slalom":
        assert int32_seen and not stateful  # exact masks: int32 residues, no cache
    else:  # cmif and all_gpu: the GPU stage holds its cache, every past_i is implicit state
        [stage] = stateful
        states = _config(repo, stage.name).sequence_batching.state
        assert sorted(s.input_name for s in states) == sorted(plan.state)
        assert all(spec.holder == stage.name for spec in plan.state.values())
        assert "teesplit.unmapped_state" not in _config(repo, stage.name).parameters


def _inputs(plan, stage, sizes, gen):
    edges = {e.name: e for e in plan.edges if e.consumer == stage.name}
    out = []
    for name in stage.inputs:
        edge = edges[name]
        shape = [d if isinstance(d, int) else sizes[d] for d in edge.shape]
        if edge.dtype == "int32":
            out.append(torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen))
        elif name == plan.padding:  # two of the past positions padded: the mask is exercised
            out.append(torch.full(shape, 2, dtype=torch.int64))
        elif edge.dtype == "int64":
            out.append(torch.randint(0, plan.vocab or 100, shape, dtype=torch.int64, generator=gen))
        else:
            out.append(torch.randn(shape, generator=gen, dtype=getattr(torch, edge.dtype)))
    return out


def _run_onnx(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.mark.parametrize("name", ["slalom", "cmif", "all_gpu"])
def test_an_exported_model_computes_what_the_in_process_stage_does(repos, name):
    repo, bundle = repos[name]
    program = load_program(bundle, allow_unsigned=True)
    stage = next(s for s in program.stages if s.side == "gpu")
    version = next(p for p in (repo / stage.name).iterdir() if p.is_dir())
    sizes = {"batch": 1, "seq": 3, "past": 5}  # batch 1: what an implicit state starts with
    inputs = _inputs(program, stage, sizes, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = stage.module(*inputs)
    feeds = {n: t.numpy() for n, t in zip(stage.inputs, inputs, strict=True)}
    config = _config(repo, stage.name)
    feeds.update({c.name: np.ones([1], np.int32) for c in config.sequence_batching.control_input})
    got = _run_onnx(version / "model.onnx", feeds)
    for out_name, expected in zip(stage.outputs, want, strict=True):
        if expected.dtype == torch.int32:  # exact masking: bit for bit
            assert np.array_equal(got[out_name], expected.numpy()), out_name
        else:
            np.testing.assert_allclose(got[out_name], expected.numpy(), rtol=1e-4, atol=1e-5)
    for state in config.sequence_batching.state:  # the next state is the plan's refill
        spec = program.state[state.input_name]
        refill = got[program.flat_outputs[spec.output]]
        grown = np.concatenate([feeds[state.input_name], refill], axis=spec.dim)
        assert np.array_equal(got[state.output_name], grown)
    states = config.sequence_batching.state
    if states:  # and a session's first call starts from the empty initial state
        empty = {s.input_name: np.zeros(s.initial_state[0].dims, np.float32) for s in states}
        first = _run_onnx(version / "model.onnx", {**feeds, **empty})
        for state in states:
            grown = first[state.output_name].shape[program.state[state.input_name].dim]
            assert grown == sizes["seq"]


def test_the_cli_names_a_missing_or_tampered_bundle_in_one_line(bundles, tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        main(["export-triton", str(tmp_path / "nothing" / "gpu"), "--out", str(tmp_path / "r")])
    assert "ArtifactError" in str(missing.value.code) and "\n" not in str(missing.value.code)
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(bundles["slalom"]), str(bundle)], check=True)
    onnx_file = next((bundle / "gpu" / "stages").glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    argv = ["export-triton", str(bundle / "gpu"), "--out", str(tmp_path / "repo")]
    run = subprocess.run(
        [sys.executable, "-m", "partitioner.cli", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert "tampered" in line and onnx_file.name in line
    assert not (tmp_path / "repo").exists()
    # a signed bundle is checked against the key when one is given
    _, other = generate_keypair(tmp_path / "other.key")
    with pytest.raises(SystemExit) as wrong_key:
        argv = ["export-triton", str(bundles["slalom"]), "--out", str(tmp_path / "r2")]
        main([*argv, "--trusted-key", str(other)])
    assert "\n" not in str(wrong_key.value.code) and not (tmp_path / "r2").exists()
