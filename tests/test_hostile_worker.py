"""A hostile GPU worker and a hostile driver, speaking the real contract (KServe v2 gRPC).

The worker side: a fake KServe server that answers late, names another request or stage,
announces the wrong or a huge tensor, sends a payload that does not match its shape, or
returns NaN. The driver must fail with a typed error, in bounded time and memory, and never
read one request's answer as another's. The client side: a driver that floods the real worker
with streams or a huge message, or comes without the token.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from conftest import captured, shared_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_runtime.driver import WorkerClient, WorkerError
from partitioner.api import partition
from partitioner.errors import IntegrityError
from runtime.kserve import DATATYPES, ProtocolError, decode, service, tensor_bytes
from runtime.worker import GPUWorker, serve

EXPECTED = [(torch.float32, [1, 4])]


def reply_for(request, tensors=None, **changes):
    """An honest reply to ``request`` (one [1, 4] float32 output), with fields changed."""
    pb, _ = service()
    response = pb.ModelInferResponse(
        model_name=changes.pop("model_name", request.model_name),
        id=changes.pop("id", request.id),
    )
    for i, t in enumerate(tensors if tensors is not None else [torch.ones(1, 4)]):
        response.outputs.add(
            name=f"out{i}", datatype=changes.get("datatype", "FP32"), shape=list(t.shape)
        )
        response.raw_output_contents.append(changes.get("raw", tensor_bytes(t)))
    return pb.ModelStreamInferResponse(infer_response=response)


_STARTED: list[grpc.Server] = []


@pytest.fixture(autouse=True)
def _stop_fake_workers():
    """Stop each test's fake servers: a stream left open would block the process's exit
    (concurrent.futures joins its threads at exit)."""
    yield
    while _STARTED:
        _STARTED.pop().stop(0).wait()


class FakeWorker:
    """A KServe server whose stream answers each request with ``behave(request)`` (a reply,
    or None for no reply)."""

    def __init__(self, path, behave, **options):
        pb, service_grpc = service()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), **options)
        servicer = service_grpc.GRPCInferenceServiceServicer()
        servicer.ServerLive = lambda request, context: pb.ServerLiveResponse(live=True)

        def stream(requests, context):
            for request in requests:
                reply = behave(request)
                if reply is not None:
                    yield reply

        servicer.ModelStreamInfer = stream
        service_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        self.address = f"unix:{path}"
        self.server.add_insecure_port(self.address)
        self.server.start()
        _STARTED.append(self.server)


def call(worker, timeout=2.0, **kwargs):
    client = WorkerClient(worker.address, timeout=timeout, **kwargs)
    return client, lambda: client.run("gpu_1", [torch.zeros(1, 4)], EXPECTED)


def test_an_honest_reply_passes(tmp_path):
    worker = FakeWorker(tmp_path / "w", reply_for)
    _, run = call(worker)
    assert torch.equal(run()[0], torch.ones(1, 4))


def test_a_silent_worker_hits_one_deadline_per_request(tmp_path):
    worker = FakeWorker(tmp_path / "w", lambda request: time.sleep(5))
    _, run = call(worker, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="did not answer stage gpu_1 within 1 s"):
        run()
    assert time.monotonic() - start < 3.0


def test_a_late_answer_is_never_read_as_the_next_one(tmp_path):
    answers = iter([0.0, 1.5])

    def late(request):
        time.sleep(next(answers, 0.0))
        return reply_for(request, [torch.full((1, 4), float(request.id))])

    worker = FakeWorker(tmp_path / "w", late)
    _, run = call(worker, timeout=1.0)
    assert run()[0][0, 0] == 1.0
    with pytest.raises(WorkerError, match="did not answer"):
        run()
    time.sleep(1.0)  # the late answer to request 2 has arrived by now
    with pytest.raises(WorkerError, match="closed after an earlier failure"):
        run()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda r: reply_for(r, id=str(int(r.id) + 1)), "names request"),
        (lambda r: reply_for(r, model_name="gpu_3"), "of stage 'gpu_3'"),
        (lambda r: reply_for(r, [torch.ones(1, 4, dtype=torch.float64)], datatype="FP64"), "FP64"),
        (lambda r: reply_for(r, [torch.ones(1, 4000)]), r"\[1, 4000\]"),  # a cache 1000x long
        (lambda r: reply_for(r, [torch.ones(1, 4), torch.ones(1)]), "has 2 tensors"),
        (lambda r: reply_for(r, raw=b"\x00" * 15), "15 bytes for a FP32 tensor"),
        (lambda r: reply_for(r, datatype="FP8"), "FP8"),
    ],
)
def test_a_reply_that_is_not_what_was_asked_is_refused(tmp_path, reply, message):
    worker = FakeWorker(tmp_path / "w", reply)
    _, run = call(worker)
    with pytest.raises(WorkerError, match=message):
        run()
    with pytest.raises(WorkerError, match="closed after an earlier failure"):
        run()


def test_a_huge_reply_is_refused_by_the_message_limit(tmp_path):
    """gRPC refuses a reply over the client's limit before handing it over: memory stays
    bounded by the limit, whatever the worker announces."""
    worker = FakeWorker(tmp_path / "w", lambda r: reply_for(r, [torch.ones(1, 1 << 20)]))
    _, run = call(worker, timeout=5.0, max_message=1 << 16)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="RESOURCE_EXHAUSTED"):
        run()
    assert time.monotonic() - start < 3.0


def test_nan_and_inf_results_are_refused(tmp_path):
    sp = partition(captured("tiny-llama"), "cmif", seed=1)
    stage = next(s for s in sp.stages if s.side == "gpu")
    inner = stage.module

    def poisoned(*args):
        outs = [o.clone() for o in inner(*args)]
        outs[0].view(-1)[0] = float("nan")
        return tuple(outs)

    stage.module = poisoned
    with torch.no_grad(), pytest.raises(IntegrityError, match="holds NaN or inf"):
        sp(input_ids=torch.randint(3, 250, (1, 5)))


# -- a hostile driver against the real worker ------------------------------------------------


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    return GPUWorker(shared_bundle(tmp_path_factory, "cmif") / "gpu", device="cpu")


def _stub(address):
    _, service_grpc = service()
    return service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def _idle_stream(stub, stop):
    """A stream that sends nothing until ``stop`` is set: it holds one of the worker's slots."""
    return stub.ModelStreamInfer(iter(lambda: stop.wait() and None, None))


def test_the_worker_caps_concurrent_streams(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(gpu_bundle, address, max_connections=2)
    stop = threading.Event()
    held = [_idle_stream(_stub(address), stop) for _ in range(2)]
    time.sleep(0.3)
    pb, _ = service()
    with pytest.raises(grpc.RpcError) as info:
        list(_stub(address).ModelStreamInfer(iter([pb.ModelInferRequest()]), timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stop.set()
    for stream in held:
        stream.cancel()
    server.shutdown()


def test_the_worker_refuses_an_oversized_message(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(gpu_bundle, address, max_frame_bytes=1 << 16)
    pb, _ = service()
    request = pb.ModelInferRequest(model_name="gpu_1", id="1")
    request.inputs.add(name="x", datatype="FP32", shape=[1 << 16])
    request.raw_input_contents.append(bytes(4 << 16))
    with pytest.raises(grpc.RpcError) as info:
        _stub(address).ModelInfer(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.shutdown()


def test_a_token_is_required_when_set_and_stats_are_not_for_strangers(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(gpu_bundle, address, token="s3cret")
    pb, _ = service()
    with pytest.raises(grpc.RpcError) as info:
        _stub(address).ModelStatistics(pb.ModelStatisticsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(WorkerError, match="UNAUTHENTICATED"):
        WorkerClient(address, token="wrong").run("gpu_1", [torch.zeros(1)])
    client = WorkerClient(address, token="s3cret")
    assert isinstance(client.stats(), dict)
    server.shutdown()
    tcp = serve(gpu_bundle, "127.0.0.1:0")
    stranger = WorkerClient(f"127.0.0.1:{tcp.port}")
    with pytest.raises(WorkerError, match="stats need the worker's token"):
        stranger.stats()
    tcp.shutdown()


@pytest.mark.parametrize("datatype", ["FP64", "BF16", "INT32"])
def test_an_empty_tensor_whose_other_dims_are_huge_is_refused_naming_it(datatype):
    """Hypothesis found these in CI: no byte, but dims numpy cannot lay out (it raised
    ValueError, not a protocol error)."""
    with pytest.raises(ProtocolError, match="tensor x: shape"):
        decode("x", datatype, [0, 10498, 10503, 10508, 995084], b"", limit=1 << 16)
    assert decode("x", datatype, [0, 3, 64], b"", limit=1 << 16).shape == (0, 3, 64)


@settings(max_examples=2000, deadline=None)
@given(
    st.text(max_size=6) | st.sampled_from(sorted(DATATYPES)),
    st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=10),
    st.binary(max_size=64),
)
def test_fuzzed_tensors_decode_or_give_a_protocol_error(datatype, shape, raw):
    try:
        t = decode("x", datatype, shape, raw, limit=1 << 16)
    except ProtocolError:
        return
    assert list(t.shape) == shape and tensor_bytes(t) == raw
