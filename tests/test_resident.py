"""Values a GPU stage hands to a later GPU stage stay on the worker (``Plan.resident``): the
enclave does not send them back up, and does not even receive them when no Freivalds check
of the later stage reads them (``Plan.passing``).

What the worker keeps it computed itself, so it learns nothing new. Integrity does not change
either: a Freivalds check of the later stage reads the enclave's own copy of its inputs, and a
stage no check covers (secureinfer checks none) could return anything in either design. A
stream may omit such an input only after its producer ran in that session.
"""

import grpc
import pytest
import torch
from conftest import TRUSTED, partition_step_for_tests, shared_step_bundle
from test_generation import prompt

from enclave_runtime.driver import connect
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from runtime.kserve import NAMES, service, tensor_bytes
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")


@pytest.fixture(scope="module")
def secureinfer(tmp_path_factory):
    return partition_step_for_tests("secureinfer"), shared_step_bundle(
        tmp_path_factory, "secureinfer"
    )


def test_gpu_to_gpu_values_are_not_sent_back_up(secureinfer, tmp_path):
    split, root = secureinfer
    assert split.spec.resident()  # masked attention: GPU stages feed GPU stages
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(root / "gpu"), address)
    try:
        ids = prompt(batch=1)
        want = generate(Executor(split.spec, seed=4), ids, max_new_tokens=4)
        kept = connect(root, address, trusted_key=TRUSTED, seed=4)
        assert torch.equal(generate(kept, ids, max_new_tokens=4), want)
        resent = connect(root, address, trusted_key=TRUSTED, seed=4)
        resent.runner._resident = resent.runner._passing = {}  # as before: all sent, all back
        assert torch.equal(generate(resent, ids, max_new_tokens=4), want)
        assert kept.runner.bytes_sent < 0.75 * resent.runner.bytes_sent
        # secureinfer checks no stage: what only a later GPU stage reads never comes down
        assert split.spec.passing() and not split.spec.protection.freivalds
        assert kept.runner.bytes_received < 0.75 * resent.runner.bytes_received
    finally:
        server.shutdown()


def test_an_omitted_value_no_stage_produced_is_refused(secureinfer, tmp_path):
    """A stream may omit a GPU-produced input only after its producer ran in that session."""
    split, root = secureinfer
    consumer, names = next(iter(split.spec.resident().items()))
    stage = split.spec.stage(consumer)
    pb, service_grpc = service()
    request = pb.ModelInferRequest(model_name=consumer, id="1")
    edges = {e.name: e for e in split.edges if e.consumer == consumer}
    for name in stage.inputs:
        if name in names:
            continue
        shape = [1 if isinstance(d, str) else d for d in edges[name].shape]
        tensor = torch.zeros(shape, dtype=getattr(torch, edges[name].dtype))
        request.inputs.add(name=name, datatype=NAMES[tensor.dtype], shape=shape)
        request.raw_input_contents.append(tensor_bytes(tensor))
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(root / "gpu"), address)
    try:
        stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        (reply,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert "no stage of this session produced it" in reply.error_message
        with pytest.raises(grpc.RpcError, match=r"is .*, not"):
            stub.ModelInfer(request, timeout=10)  # outside a session nothing is kept
    finally:
        server.shutdown()
