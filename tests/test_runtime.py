"""Two processes: the GPU worker serves a saved bundle over KServe v2 gRPC, the enclave
driver runs the rest."""

import threading
import time

import grpc
import pytest
import torch
from conftest import (
    BUNDLE_SEED,
    TRUSTED,
    captured,
    model_output,
    partition_for_tests,
    self_signed,
    shared_bundle,
)

from enclave_runtime.driver import WorkerError, connect, spawn_worker
from partitioner.api import partition
from runtime.kserve import service, tensor_bytes
from runtime.worker import GPUWorker, serve


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = {}
    for preset in ("secureinfer", "slalom", "cmif"):
        out[preset] = shared_bundle(tmp_path_factory, preset)
    return out


@pytest.fixture
def worker_process(bundles, tmp_path):
    """A real worker process serving the slalom bundle on a Unix socket."""
    address = f"unix:{tmp_path / 'worker.sock'}"
    proc, banner = spawn_worker(bundles["slalom"] / "gpu", address)
    assert "teesplit GPU worker" in banner
    yield proc, address
    proc.kill()
    proc.wait()


def test_two_processes_give_the_in_process_outputs(bundles, worker_process):
    _, address = worker_process
    program = connect(bundles["slalom"], address, seed=BUNDLE_SEED, trusted_key=TRUSTED)
    reference = partition_for_tests("slalom")
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            model_output(program(input_ids=ids)), model_output(reference(input_ids=ids))
        )
    stats = program.runner.stats()
    gpu = [s.name for s in program.stages if s.side == "gpu"]
    assert sorted(stats) == sorted(gpu) and all(s["calls"] == 1 for s in stats.values())
    assert program.runner.bytes_sent > 0 and program.runner.bytes_received > 0


def _serve_in_thread(bundle, address, backend="torch"):
    return serve(GPUWorker(bundle, backend=backend, device="cpu"), address)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_several_drivers_share_one_worker(bundles, tmp_path, backend):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["secureinfer"], address, backend)
    reference = partition(captured("tiny-llama"), "secureinfer", seed=1)
    ids = torch.randint(3, 250, (1, 7))
    with torch.no_grad():
        want = model_output(reference(input_ids=ids))
    results, errors = [], []
    programs = [connect(bundles["secureinfer"], address, trusted_key=TRUSTED) for _ in range(3)]

    def drive(program):
        try:
            with torch.no_grad():
                results.append(model_output(program(input_ids=ids)))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(p,)) for p in programs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.shutdown()
    assert not errors and len(results) == 3
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


class _Hung:
    """A KServe server whose stream either dies at the first request or never answers."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def ServerLive(self, request, context):
        pb, _ = service()
        return pb.ServerLiveResponse(live=True)

    def ModelStreamInfer(self, requests, context):
        next(requests)
        if self.behaviour == "die":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker died")
        time.sleep(30)
        yield from ()


def _fake_worker(tmp_path, behaviour):
    from concurrent import futures

    _, service_grpc = service()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generic = service_grpc.GRPCInferenceServiceServicer()
    fake = _Hung(behaviour)
    generic.ServerLive = fake.ServerLive
    generic.ModelStreamInfer = fake.ModelStreamInfer
    service_grpc.add_GRPCInferenceServiceServicer_to_server(generic, server)
    address = f"unix:{tmp_path / 'fake.sock'}"
    server.add_insecure_port(address)
    server.start()
    return address, server


@pytest.mark.parametrize("behaviour", ["die", "hang"])
def test_a_dead_or_hung_worker_fails_the_request_within_the_timeout(bundles, tmp_path, behaviour):
    address, server = _fake_worker(tmp_path, behaviour)
    program = connect(bundles["slalom"], address, timeout=1.0, trusted_key=TRUSTED)
    start = time.perf_counter()
    with pytest.raises(
        WorkerError, match=r"GPU worker at .* (failed on|did not answer) stage gpu_\d+"
    ):
        program(input_ids=torch.randint(3, 250, (1, 5)))
    assert time.perf_counter() - start < 10
    server.stop(0)


def test_nothing_listening_is_a_worker_error(tmp_path):
    from enclave_runtime.driver import WorkerClient

    with pytest.raises(WorkerError, match="cannot reach the GPU worker"):
        WorkerClient(f"unix:{tmp_path / 'nobody.sock'}", timeout=1.0)


def _raw_request(stage, name, tensor, **params):
    pb, _ = service()
    request = pb.ModelInferRequest(model_name=stage, id="7")
    spec = request.inputs.add(name=name, datatype="FP32", shape=list(tensor.shape))
    for key, value in params.items():
        spec.parameters[key].int64_param = value
    request.raw_input_contents.append(tensor_bytes(tensor))
    return request


def test_malformed_requests_and_wrong_shapes_are_named(bundles, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["slalom"], address)
    pb, service_grpc = service()
    stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    program = connect(bundles["slalom"], address, trusted_key=TRUSTED)
    stage = next(s for s in program.stages if s.side == "gpu")
    bad = pb.ModelInferRequest(model_name=stage.name, id="1")
    bad.inputs.add(name=stage.inputs[0], datatype="FP33", shape=[2])
    bad.raw_input_contents.append(b"12345678")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype 'FP33'" in info.value.details()
    short = _raw_request(stage.name, stage.inputs[0], torch.zeros(2))
    short.raw_input_contents[0] = b"123"
    with pytest.raises(grpc.RpcError, match="3 bytes for a FP32 tensor of shape"):
        stub.ModelInfer(short, timeout=10)
    with pytest.raises(WorkerError, match=f"refused stage {stage.name}: stage {stage.name} input"):
        program.runner.run(stage.name, [torch.zeros(3, dtype=torch.int64)])
    server.shutdown()


def test_health_and_metadata_speak_kserve(bundles, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["slalom"], address)
    pb, service_grpc = service()
    stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    program = connect(bundles["slalom"], address, trusted_key=TRUSTED)
    stage = next(s for s in program.stages if s.side == "gpu")
    assert stub.ModelReady(pb.ModelReadyRequest(name=stage.name)).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=stage.name))
    assert [t.name for t in meta.inputs] == list(stage.inputs)
    assert [t.name for t in meta.outputs] == list(stage.outputs)
    assert all(t.datatype == "INT32" for t in meta.inputs)  # exact masks: residues
    assert any(-1 in t.shape for t in meta.inputs)  # dynamic dims
    server.shutdown()


def test_the_enclave_host_needs_no_gpu_bundle(bundles, tmp_path):
    import shutil

    enclave_only = tmp_path / "enclave-host"
    shutil.copytree(bundles["cmif"], enclave_only, ignore=shutil.ignore_patterns("gpu"))
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["cmif"], address)
    program = connect(enclave_only, address, seed=BUNDLE_SEED, trusted_key=TRUSTED)
    reference = partition_for_tests("cmif")
    ids = torch.randint(3, 250, (1, 6))
    with torch.no_grad():
        assert torch.equal(
            model_output(program(input_ids=ids)), model_output(reference(input_ids=ids))
        )
    server.shutdown()


def test_an_extension_of_nothing_is_refused_naming_the_input(bundles, tmp_path):
    """``teesplit_extends`` may only grow an input this session sent before."""
    address = f"unix:{tmp_path / 'x.sock'}"
    server = serve(GPUWorker(bundles["cmif"] / "gpu"), address)
    try:
        _, service_grpc = service()
        stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        program = connect(bundles["cmif"], address, trusted_key=TRUSTED)
        stage = next(s for s in program.stages if s.side == "gpu")
        request = _raw_request(stage.name, stage.inputs[0], torch.zeros(1, 2), teesplit_extends=1)
        for name in stage.inputs[1:]:  # the stage's other inputs, whole
            request.inputs.add(name=name, datatype="FP32", shape=[1])
            request.raw_input_contents.append(tensor_bytes(torch.zeros(1)))
        (reply,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert "input 0 extends an input this session never sent" in reply.error_message
        with pytest.raises(grpc.RpcError, match="extends needs a session"):
            stub.ModelInfer(request, timeout=10)
    finally:
        server.shutdown()


def test_grown_dim_only_for_a_true_extension():
    from enclave_runtime.driver import grown_dim

    old = torch.arange(6.0).reshape(1, 2, 3)
    assert grown_dim(old, torch.cat([old, torch.ones(1, 2, 1)], 2)) == 2
    assert grown_dim(old, torch.cat([old + 1, torch.ones(1, 2, 1)], 2)) is None  # re-masked
    assert grown_dim(old, old.clone()) is None
    assert grown_dim(old[:, :, :0], torch.ones(1, 2, 4)) is None  # nothing held to extend
    assert grown_dim(old, torch.ones(2, 2, 4)) is None


def test_tls_and_a_token_on_tcp(bundles):
    cert, key = self_signed()
    server = serve(
        GPUWorker(bundles["slalom"], device="cpu"), "localhost:0", token="t0k", tls=(cert, key)
    )
    address = f"localhost:{server.port}"
    try:
        program = connect(
            bundles["slalom"],
            address,
            seed=BUNDLE_SEED,
            trusted_key=TRUSTED,
            token="t0k",
            tls_root=cert,
        )
        reference = partition_for_tests("slalom")
        ids = torch.randint(3, 250, (1, 5))
        with torch.no_grad():
            assert torch.equal(
                model_output(program(input_ids=ids)), model_output(reference(input_ids=ids))
            )
        with pytest.raises(WorkerError, match="cannot reach the GPU worker"):
            connect(bundles["slalom"], address, trusted_key=TRUSTED, token="t0k", timeout=2.0)
        other, _ = self_signed()
        with pytest.raises(WorkerError, match="cannot reach the GPU worker"):
            connect(bundles["slalom"], address, trusted_key=TRUSTED, tls_root=other, timeout=2.0)
    finally:
        server.shutdown()
