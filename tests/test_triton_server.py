"""Against a real Triton: the ``tritonserver`` binary that ``nvidia-pytriton`` ships serves a
repository exported by ``teesplit export-triton``, and the enclave driver generates through it.

PyTriton's server has the Python backend only (no onnxruntime backend), so each exported model
is served by a small Python-backend ``model.py`` that runs the very ``model.onnx`` the export
wrote under onnxruntime (:mod:`runtime.local_triton`); the ``config.pbtxt`` is the export's,
with ``backend: "python"``. A GPU host runs the Triton container with the onnxruntime backend
and serves the export directly.

Skipped, saying why, where the server cannot start (no pytriton, no Python 3.11 stub, a
missing shared library).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRUSTED, partition_step_for_tests, shared_step_bundle

from enclave_runtime.driver import WorkerClient
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from partitioner.bundle import load_program
from partitioner.triton_repo import export_repository
from runtime import local_triton


@pytest.fixture(params=["slalom", "cmif"])
def triton(request, tmp_path_factory, tmp_path):
    """A bundle (the tiny Llama's decoder step: under slalom, stateless masked stages; under
    cmif, a stage holding its KV cache as implicit state), its export served by Triton."""
    bundle = shared_step_bundle(tmp_path_factory, request.param)
    split = partition_step_for_tests(request.param)
    repo = tmp_path / "repo"
    export_repository(bundle, repo, trusted_key=TRUSTED)
    local_triton.python_backend(repo)
    try:
        proc, address = local_triton.start(repo, tmp_path)
    except local_triton.TritonUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield split, bundle, address
    finally:
        local_triton.stop(proc)


def test_split_generation_through_a_real_triton_equals_in_process(triton):
    split, bundle, address = triton
    plan = load_program(bundle, gpu=False, trusted_key=TRUSTED)
    gpu = [s for s in plan.stages if s.side == "gpu"]
    client = WorkerClient(
        address,
        timeout=60.0,
        inputs={s.name: list(s.inputs) for s in gpu},
        outputs={s.name: list(s.outputs) for s in gpu},
        held=plan.held(),
        extends=False,
    )
    remote = Executor(plan, client, seed=3)
    ids = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = generate(split, ids, max_new_tokens=5)
        got = generate(remote, ids, max_new_tokens=5)
    assert torch.equal(got, want)
    assert client.bytes_sent > 0 and client.bytes_received > 0
    if plan.held():  # the cache stayed in Triton: only the last logits came back
        assert client.bytes_received == 5 * plan.vocab * 4
    client.close()  # the session's stream ends
