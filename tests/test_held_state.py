"""The cache stays where it is computed: a GPU stage that computes a KV cache in the clear
keeps it (``StateSpec.holder``), and neither side sends it again (issue 13, item 5).

Attacks: a plan that lets the GPU keep a masked cache, a request that omits a state no
sequence started, a caller whose idea of the cache's length is not the worker's, a worker
that loses the state mid-generation.
"""

import copy
import dataclasses

import grpc
import pytest
import torch
from conftest import (
    TRUSTED,
    at_once,
    partition_step_for_tests,
    shared_step_bundle,
    step,
)
from test_generation import args, prompt

from enclave_runtime.driver import WorkerError, connect
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from partitioner.api import partition
from partitioner.errors import ArtifactError
from partitioner.plan import Plan
from runtime.kserve import NAMES, service, tensor_bytes
from runtime.state import StateError, stand_in
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")


@pytest.fixture(scope="module")
def cmif():
    return partition_step_for_tests("cmif")


@pytest.fixture(scope="module")
def cmif_bundle(cmif, tmp_path_factory):
    return shared_step_bundle(tmp_path_factory, "cmif")


def without_holders(plan: Plan) -> Plan:
    out = copy.copy(plan)
    out.state = {k: dataclasses.replace(v, holder=None) for k, v in plan.state.items()}
    return out


@pytest.mark.parametrize("policy", ["cmif", "all_gpu"])
def test_a_cache_computed_in_the_clear_is_held_by_its_gpu_stage(policy):
    split = partition(step("tiny-llama"), policy)
    [gpu] = [s for s in split.stages if s.side == "gpu"]
    assert {spec.holder for spec in split.state.values()} == {gpu.name}
    assert set(split.state) <= set(gpu.inputs)
    # the only bytes per decode step: the new position's input up, the last logits back
    cache = {e.name for e in split.edges if e.name in split.spec.held_values()}
    assert cache and split.bytes_crossing()["gpu->enclave"] == next(
        e.nbytes for e in split.edges if e.name == split.spec.flat_outputs[0]
    )


@pytest.mark.parametrize("policy", ["slalom", "secureinfer"])
def test_a_masked_or_checked_cache_stays_in_the_enclave(policy):
    split = partition(step("tiny-llama"), policy)
    assert {spec.holder for spec in split.state.values()} == {None}


def test_held_state_changes_no_token(cmif):
    """Holding the cache on the GPU side gives the tokens of sending it back and forth."""
    ids = prompt(batch=2)
    held = generate(Executor(cmif.spec, seed=5), ids, max_new_tokens=6)
    sent = generate(Executor(without_holders(cmif.spec), seed=5), ids, max_new_tokens=6)
    assert torch.equal(held, sent)


def test_a_real_cache_given_in_process_is_used(cmif):
    """Called with a real cache (no stand-in), the in-process holder uses what it is given."""
    ids = prompt(batch=1, seq=3)
    cache = [torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    held = Executor(cmif.spec, seed=1).run(args(ids, cache), {})
    sent = Executor(without_holders(cmif.spec), seed=1).run(args(ids, cache), {})
    assert torch.equal(held[0], sent[0])


def test_over_a_worker_only_the_new_position_and_the_logits_cross(cmif, cmif_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    try:
        remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=5)
        ids = prompt(batch=1)
        new = 6
        out = generate(remote, ids, max_new_tokens=new)
        assert torch.equal(out, generate(Executor(cmif.spec, seed=5), ids, max_new_tokens=new))
        vocab = cmif.spec.vocab
        assert remote.runner.bytes_received == new * vocab * 4  # float32 logits, nothing else
        embedding = {e.name: e for e in cmif.edges if e.direction == "enclave->gpu"}
        per_position = sum(
            4 * e.shape[-1] for e in embedding.values() if e.name not in cmif.spec.held_values()
        )  # the embedding and the rotary rows of each new position, float32
        assert remote.runner.bytes_sent == per_position * (ids.shape[1] + new - 1)
    finally:
        server.shutdown()


def test_sessions_on_one_worker_keep_their_own_caches(cmif, cmif_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    prompts = [prompt(batch=1, seed=s) for s in (1, 2, 3)]
    results: dict[int, torch.Tensor] = {}
    try:

        def session(i: int) -> None:
            remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=i)
            results[i] = generate(remote, prompts[i], max_new_tokens=5)

        at_once(session, range(3))
        for i, ids in enumerate(prompts):
            want = generate(Executor(cmif.spec, seed=i), ids, max_new_tokens=5)
            assert torch.equal(results[i], want), i
    finally:
        server.shutdown()


def test_a_plan_letting_the_gpu_hold_a_masked_cache_is_refused():
    """A tampered plan may not move a cache the enclave keeps (masked) to the GPU."""
    split = partition(step("tiny-llama"), "slalom")
    gpu = [s.name for s in split.stages if s.side == "gpu"]
    enclave = next(s.name for s in split.stages if s.side == "enclave")
    for holder, why in [(gpu[0], "does not read past_0"), (enclave, "is not a GPU stage")]:
        data = split.spec.to_dict()
        data["state"]["past_0"]["holder"] = holder
        with pytest.raises(ArtifactError, match=why):
            Plan.from_dict(data)
    cmif = partition(step("tiny-llama"), "cmif")
    data = cmif.spec.to_dict()
    data["protection"]["gpu_masked"] = [cmif.spec.flat_outputs[1]]
    with pytest.raises(ArtifactError, match="is masked"):
        Plan.from_dict(data)


def _stage_request(stage, sizes, **params):
    """A request for ``stage`` with every input but the held caches (zeros)."""
    pb, _ = service()
    request = pb.ModelInferRequest(model_name=stage.name, id="1")
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = value
    for name, shape in sizes.items():
        tensor = torch.zeros(shape, dtype=torch.long if name == "padding" else torch.float32)
        request.inputs.add(name=name, datatype=NAMES[tensor.dtype], shape=shape)
        request.raw_input_contents.append(tensor_bytes(tensor))
    return request


def test_the_worker_refuses_an_omitted_state_no_sequence_started(cmif, cmif_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    try:
        [stage] = [s for s in cmif.stages if s.side == "gpu"]
        _, service_grpc = service()
        stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        edges = {e.name: e for e in cmif.edges if e.consumer == stage.name}
        sizes = {
            n: [
                {"batch": 1, "seq": 1}.get(d, d) if isinstance(d, str) else d
                for d in edges[n].shape
            ]
            for n in stage.inputs
            if n not in cmif.spec.state
        }
        request = _stage_request(stage, sizes, sequence_id="s1")
        (reply,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert "was not started in this session" in reply.error_message
        assert not reply.infer_response.raw_output_contents
        with pytest.raises(grpc.RpcError, match="is past_0, not 'embedding'"):
            stub.ModelInfer(request, timeout=10)  # no session: nothing is held
        # started, then resumed under another sequence id: refused
        first = _stage_request(stage, sizes, sequence_id="s1", sequence_start=True)
        other = _stage_request(stage, sizes, sequence_id="s2")
        replies = list(stub.ModelStreamInfer(iter([first, other]), timeout=10))
        assert not replies[0].error_message
        assert [o.name for o in replies[0].infer_response.outputs] == stage.outputs
        assert "sequence 's2' was not started" in replies[1].error_message
        # ended, then continued: the worker freed the state at the end
        ended = _stage_request(stage, sizes, sequence_id="s1", sequence_start=True)
        ended.parameters["sequence_end"].bool_param = True
        again = _stage_request(stage, sizes, sequence_id="s1")
        replies = list(stub.ModelStreamInfer(iter([ended, again]), timeout=10))
        assert not replies[0].error_message
        assert "sequence 's1' was not started" in replies[1].error_message
    finally:
        server.shutdown()


def test_a_cache_length_out_of_step_is_refused_before_anything_is_sent(cmif_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    try:
        remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=5)
        ids = prompt(batch=1, seq=4)
        empty = [stand_in([1, 2, 0, 16], torch.float32) for _ in range(4)]
        remote.run(args(ids, empty), {})  # the worker now holds 4 positions
        sent = remote.runner.bytes_sent
        wrong = [stand_in([1, 2, 9, 16], torch.float32) for _ in range(4)]
        with pytest.raises(WorkerError, match=r"holds past_0 of shape \[1, 2, 4, 16\]"):
            remote.run(args(ids[:, :1], wrong), {})
        assert remote.runner.bytes_sent == sent
        right = [stand_in([1, 2, 4, 16], torch.float32) for _ in range(4)]
        assert remote.run(args(ids[:, :1], right), {})[0].shape[-1] == remote.spec.vocab
    finally:
        server.shutdown()


def test_the_in_process_holder_refuses_a_cache_out_of_step(cmif):
    program = Executor(cmif.spec, seed=2)
    with pytest.raises(StateError, match="the sequence was not started"):
        program.run(args(prompt(batch=1, seq=1), [stand_in([1, 2, 3, 16], torch.float32)] * 4), {})


def test_a_worker_that_loses_the_state_fails_the_session(cmif_bundle, tmp_path):
    """The worker restarts between two tokens: the session fails with a typed error; it
    never decodes against an empty cache."""
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=5, timeout=10)
    ids = prompt(batch=1, seq=4)
    remote.run(args(ids, [stand_in([1, 2, 0, 16], torch.float32)] * 4), {})
    server.shutdown()
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    try:
        with pytest.raises(WorkerError):
            remote.run(args(ids[:, :1], [stand_in([1, 2, 4, 16], torch.float32)] * 4), {})
        with pytest.raises(WorkerError, match="closed after an earlier failure"):
            remote.run(args(ids[:, :1], [stand_in([1, 2, 4, 16], torch.float32)] * 4), {})
    finally:
        server.shutdown()


def test_the_last_step_frees_the_held_cache(cmif, cmif_bundle, tmp_path):
    """``last=True`` ends the sequence: the holder (here, and a worker) keeps nothing after it,
    so a call continuing from it is refused rather than served from a stale cache."""
    ids = prompt(batch=1, seq=4)
    empty = [stand_in([1, 2, 0, 16], torch.float32)] * 4
    after = [stand_in([1, 2, 4, 16], torch.float32)] * 4
    local = Executor(cmif.spec, seed=2)
    local.run(args(ids, empty), {}, last=True)
    with pytest.raises(StateError, match="the sequence was not started"):
        local.run(args(ids[:, :1], after), {})
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(cmif_bundle / "gpu"), address)
    try:
        remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=5)
        remote.run(args(ids, empty), {}, last=True)
        with pytest.raises(WorkerError, match=r"holds past_0 of shape None"):
            remote.run(args(ids[:, :1], after), {})
        remote.run(args(ids, empty), {})  # a new sequence starts as before
    finally:
        server.shutdown()


def test_a_worker_that_sends_the_cache_back_anyway_is_refused(cmif_bundle, tmp_path):
    """The client asks for the logits only; a worker answering with the refills too (the
    cache's new positions) is not read: the session fails with a typed error."""
    from concurrent import futures

    from tritonclient.grpc import service_pb2_grpc

    from runtime.kserve import MAX_MESSAGE
    from runtime.worker import _Service

    class Chatty(_Service):
        def _infer(self, request, session):
            del request.outputs[:]  # ignore what was asked: every output goes back
            return super()._infer(request, session)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        Chatty(GPUWorker(cmif_bundle / "gpu"), None, MAX_MESSAGE), server
    )
    address = f"unix:{tmp_path / 'w.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        remote = connect(cmif_bundle, address, trusted_key=TRUSTED, seed=5, timeout=10)
        with pytest.raises(WorkerError, match="the reply has 5 tensors, stage gpu_1 returns 1"):
            remote.run(
                args(prompt(batch=1, seq=4), [stand_in([1, 2, 0, 16], torch.float32)] * 4), {}
            )
    finally:
        server.stop(None).wait()
