"""Concurrent sessions' calls of a GPU stage run as one batch (``runtime.batching``).

Attacks on the batcher's one promise, that each session gets what it would get alone: caches of
different lengths in one batch (a naive zero-pad changes every row's answer; the padding count
restores it), sessions decoding at once on a real worker with different prompts (same tokens as
alone, and fewer stage runs than calls), a call that cannot share a batch, and a batch that
fails (every call in it is told; the next batch runs).
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from conftest import TRUSTED, at_once, partition_step_for_tests, shared_step_bundle
from test_generation import args, prompt

from enclave_runtime.driver import connect
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from partitioner.errors import ArtifactError
from partitioner.plan import Plan
from runtime.batching import Layout, StageBatcher
from runtime.kserve import service
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")


@pytest.fixture(scope="module")
def all_gpu():
    return partition_step_for_tests("all_gpu")


@pytest.fixture(scope="module")
def cmif():
    return partition_step_for_tests("cmif")


def _gpu_stage(split):
    [stage] = [s for s in split.stages if s.side == "gpu"]
    return stage


def _layout(split, stage) -> Layout:
    spec = split.spec
    inputs = [
        (name, next(e.shape for e in spec.edges if e.consumer == stage.name and e.name == name))
        for name in stage.inputs
    ]
    outputs = [
        next(e.shape for e in spec.edges if e.producer == stage.name and e.name == name)
        for name in stage.outputs
    ]
    held = {slot.input: slot.dim for slot in spec.held().get(stage.name, [])}
    return Layout.of(inputs, outputs, held, spec.padding)


def _caches(split, lengths):
    """Per row: the real cache of a prompt of that length (the whole program, one row)."""
    out = []
    for i, n in enumerate(lengths):
        past = [torch.zeros(1, 2, 0, 16) for _ in split.spec.state]
        _, *present = split(*args(prompt(batch=1, seq=n, seed=10 + i), past))
        out.append(list(present))
    return out


def test_the_layout_of_a_decoder_step_lets_cache_lengths_differ(all_gpu, cmif):
    for split in (all_gpu, cmif):
        layout = _layout(split, _gpu_stage(split))
        assert layout.batchable and layout.ragged and layout.padding is not None


def test_rows_of_different_cache_lengths_compute_what_they_compute_alone(all_gpu):
    """all_gpu's one stage is the whole decoder step: batch three sessions' decode steps with
    caches of 3, 6 and 9 positions, and compare each row with the step run on its own."""
    stage = _gpu_stage(all_gpu)
    layout = _layout(all_gpu, stage)
    caches = _caches(all_gpu, [3, 6, 9])
    assert stage.inputs[:2] == ["input_ids", "padding"]
    calls = [[torch.tensor([[20 + i]]), torch.zeros(1, 1, dtype=torch.long), *cache]
             for i, cache in enumerate(caches)]  # fmt: skip
    alone = [list(stage.module(*c)) for c in calls]
    ran = []

    def run(inputs):
        ran.append([t.shape for t in inputs])
        return list(stage.module(*inputs))

    batcher = StageBatcher(run, layout, expected=lambda: 3, max_delay=5.0)
    results: dict[int, list[torch.Tensor]] = {}

    def session(i):
        results[i] = batcher(calls[i])

    at_once(session, range(3), timeout=60)
    assert len(ran) == 1 and ran[0][0][0] == 3  # one run of three rows
    for i in range(3):
        for got, want in zip(results[i], alone[i], strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_without_the_count_changes_the_answer(all_gpu):
    """The attack the padding count defeats: left-pad a short cache with zeros and run it
    beside a long one without raising its count, and its logits move."""
    stage = _gpu_stage(all_gpu)
    short, long = _caches(all_gpu, [3, 9])
    alone = stage.module(torch.tensor([[20]]), torch.zeros(1, 1, dtype=torch.long), *short)[0]
    padded = [torch.cat([torch.zeros(1, 2, 6, 16), s], dim=2) for s in short]
    both = [torch.cat([p, q]) for p, q in zip(padded, long, strict=True)]
    naive = stage.module(torch.tensor([[20], [21]]), torch.zeros(2, 1, dtype=torch.long), *both)
    assert not torch.allclose(naive[0][0], alone[0], atol=1e-3)
    counted = stage.module(torch.tensor([[20], [21]]), torch.tensor([[6], [0]]), *both)
    torch.testing.assert_close(counted[0][0], alone[0], atol=1e-5, rtol=1e-5)


def test_calls_that_cannot_share_a_batch_run_apart():
    """Different sizes (a prefill beside a decode step) never share a run; a stage without
    the padding input batches equal lengths only; one whose output names the state's length
    does not pad either."""
    shape = ["batch", 2, "past", 4]
    layout = Layout.of(
        [("x", ["batch", "seq", 4]), ("past_0", shape)], [["batch", 4]], {1: 2}, None
    )
    assert layout.batchable and not layout.ragged
    assert layout.key([torch.zeros(1, 1, 4), torch.zeros(1, 2, 3, 4)]) != layout.key(
        [torch.zeros(1, 1, 4), torch.zeros(1, 2, 5, 4)]
    )
    ins = [("x", ["batch", 1]), ("padding", ["batch", 1]), ("past_0", shape)]
    assert Layout.of(ins, [["batch", "past + seq"]], {2: 2}, "padding").ragged == {}
    assert Layout.of(ins, [["batch", 4]], {2: 2}, "padding").ragged == {2: 2}
    assert not Layout.of([("w", [4, 4])], [[4]], {}, None).batchable

    runs = []

    def run(inputs):
        runs.append(inputs[0].shape[1])
        time.sleep(0.05)
        return [inputs[0].sum(-1)]

    layout = Layout.of([("x", ["batch", "seq"])], [["batch"]], {}, None)
    batcher = StageBatcher(run, layout, expected=lambda: 3, max_delay=0.5)
    out = {}
    sizes = {0: 1, 1: 1, 2: 5}

    def call(i):
        out[i] = batcher([torch.full((1, sizes[i]), float(i + 1))])

    at_once(call, range(3), timeout=10)
    assert sorted(runs) == [1, 5]  # the two seq-1 calls together, the seq-5 one apart
    assert [float(out[i][0][0]) for i in range(3)] == [1.0, 2.0, 15.0]


def test_a_poisoned_call_fails_alone_and_a_dead_device_fails_everyone():
    """A call whose values break the run (a token id past the table) is batched with honest
    calls: the honest ones still get their answers; a call whose inputs disagree on their
    rows never joins a batch; when the device itself fails, every call is told."""
    layout = Layout.of([("x", ["batch", 2]), ("y", ["batch", 2])], [["batch", 2]], {}, None)
    table = torch.arange(10.0)
    state = {"dead": False}
    runs = []

    def run(inputs):
        runs.append(inputs[0].shape[0])
        if state["dead"]:
            raise RuntimeError("device lost")
        return [table[inputs[0]] + inputs[1]]  # IndexError on an id past the table

    batcher = StageBatcher(run, layout, expected=lambda: 3, max_delay=0.5)
    calls = {
        "honest": [torch.tensor([[1, 2]]), torch.zeros(1, 2)],
        "poisoned": [torch.tensor([[1, 99]]), torch.zeros(1, 2)],
        "ragged": [torch.tensor([[3, 4]]), torch.zeros(2, 2)],
    }
    out, errors = {}, {}

    def call(name):
        try:
            out[name] = batcher(calls[name])[0]
        except (IndexError, RuntimeError) as exc:
            errors[name] = exc

    at_once(call, calls, timeout=10)
    assert torch.equal(out["honest"], torch.tensor([[1.0, 2.0]]))
    assert isinstance(errors["poisoned"], IndexError)
    assert 2 in runs  # honest and poisoned shared a run (which failed) before running alone
    assert 3 not in runs  # the ragged call never joined them
    out.clear(), errors.clear()
    state["dead"] = True
    at_once(call, calls, timeout=10)
    assert sorted(errors) == sorted(calls) and not out


def test_sessions_decoding_at_once_on_a_worker_share_runs_and_keep_their_tokens(
    cmif, tmp_path_factory, tmp_path
):
    """Four sessions with prompts of different lengths generate at once through one worker:
    each gets the tokens it gets alone in process, and the worker ran its stage fewer times
    than it was called (ModelStatistics: execution_count < inference_count)."""
    root = shared_step_bundle(tmp_path_factory, "cmif")
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(root / "gpu", batch_delay=0.2), address)
    prompts = [prompt(batch=1, seq=n, seed=n) for n in (4, 7, 7, 11)]
    results: dict[int, torch.Tensor] = {}
    try:

        def session(i: int) -> None:
            remote = connect(root, address, trusted_key=TRUSTED, seed=i)
            results[i] = generate(remote, prompts[i], max_new_tokens=8)

        at_once(session, range(4))
        for i, ids in enumerate(prompts):
            want = generate(Executor(cmif.spec, seed=i), ids, max_new_tokens=8)
            assert torch.equal(results[i], want), i
        pb, grpc_service = service()
        stub = grpc_service.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        [stats] = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats
        assert stats.inference_count == 4 * 8
        assert stats.execution_count < stats.inference_count - 8
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", ["input_ids", "past_0", "nothing"])
def test_a_plan_naming_another_input_as_padding_is_refused(cmif, name):
    """The padding input is sent as public and filled with zeros by the enclave: a tampered
    plan may not give that role to the tokens, a cache, or an input that does not exist."""
    data = cmif.spec.to_dict()
    assert data["padding"] == "padding"
    data["padding"] = name
    with pytest.raises(ArtifactError, match="padding"):
        Plan.from_dict(data)


def test_only_a_stage_holding_caches_waits_for_batch_mates(tmp_path_factory):
    """A decode step (one call per token) waits for the other sessions; a stateless stage of
    a many-stage preset (slalom: one call per linear layer) must not pay a wait per call."""
    root = shared_step_bundle(tmp_path_factory, "cmif")
    worker = GPUWorker(root / "gpu", batch_delay=0.2)
    [held] = worker.held
    assert worker.batchers[held].max_delay == 0.2
    root = shared_step_bundle(tmp_path_factory, "slalom")
    worker = GPUWorker(root / "gpu", batch_delay=0.2)
    assert not worker.held and worker.batchers
    assert all(b.max_delay == 0.0 for b in worker.batchers.values())
