"""Against a real Triton: the ``tritonserver`` binary that ``nvidia-pytriton`` ships serves a
repository exported by ``teesplit export-triton``, and the enclave driver generates through it.

PyTriton's server has the Python backend only (no onnxruntime backend), so each exported model
is served by a small Python-backend ``model.py`` that runs the very ``model.onnx`` the export
wrote under onnxruntime; the ``config.pbtxt`` is the export's, with ``backend: "python"``. A GPU
host runs the Triton container with the onnxruntime backend and serves the export directly.

Skipped, saying why, where the server cannot start (no pytriton, no Python 3.11 stub, a
missing shared library).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from conftest import SIGN_KEY, TRUSTED, built

from enclave_runtime.driver import WorkerClient, WorkerError
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from partitioner.api import partition
from partitioner.bundle import load_program
from partitioner.generation import capture_decoder
from partitioner.triton_repo import export_repository

MODEL_PY = """
import sys

sys.path[:0] = PATHS  # the stub runs the base interpreter: this environment's packages

import json
import os

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        here = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(here, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            get = pb_utils.get_input_tensor_by_name
            feeds = {n: get(request, n).as_numpy() for n in self.inputs}
            outs = self.session.run(self.outputs, feeds)
            tensors = [pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""


# numpy 1 for PyTriton's Python backend (the Makefile installs it here; numpy 2 makes its
# tensors come back empty)
NUMPY1 = Path(sys.prefix) / "triton-numpy"


def _triton() -> Path:
    # found, not imported: the Makefile installs the wheel without its deps (only its server
    # binary and backend are used), so importing pytriton's Python API may fail
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed: no tritonserver binary to test against")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not (root / "bin" / "tritonserver").is_file() or not stub.is_dir():
        pytest.skip(f"pytriton ships no tritonserver or no Python stub for {sys.version}")
    if not (NUMPY1 / "numpy").is_dir():
        pytest.skip(f"no numpy 1 at {NUMPY1} for PyTriton's Python backend (make installs it)")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_backend(repo: Path) -> None:
    """The export's configs with ``backend: "python"`` and the ONNX runner beside each model."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for config_path in repo.glob("*/config.pbtxt"):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        config.backend = "python"
        del config.instance_group[:]  # this machine has no GPU: one CPU instance
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
        config_path.write_text(text_format.MessageToString(config))
        for version in config_path.parent.iterdir():
            if version.is_dir():
                # PyTriton's backend utilities are built against numpy 1: it goes first
                paths = [str(NUMPY1)] + [p for p in sys.path if p and Path(p).is_dir()]
                (version / "model.py").write_text(MODEL_PY.replace("PATHS", repr(paths)))


@pytest.fixture
def triton(tmp_path):
    """A bundle (the tiny Llama's decoder step under slalom), its export served by Triton."""
    root = _triton()
    bundle = tmp_path / "bundle"
    split = partition(capture_decoder(built("tiny-llama")), "slalom", seed=3)
    split.save(bundle, sign_key=SIGN_KEY)
    repo = tmp_path / "repo"
    export_repository(bundle, repo, trusted_key=TRUSTED)
    _python_backend(repo)
    # pytriton's Python backend with this interpreter's stub beside it (Triton looks there)
    backends = tmp_path / "backends" / "python"
    backends.mkdir(parents=True)
    for item in (root / "backends" / "python").iterdir():
        (backends / item.name).symlink_to(item)
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    (backends / "triton_python_backend_stub").symlink_to(stub / "triton_python_backend_stub")
    port = _free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = sysconfig.get_config_var("LIBDIR")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    log = (tmp_path / "triton.log").open("w")
    proc = subprocess.Popen(
        [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={backends.parent}",
            f"--grpc-port={port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                WorkerClient(address, timeout=2.0).close()
                break
            except WorkerError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = (tmp_path / "triton.log").read_text()
                    pytest.skip(f"tritonserver did not start here: {text}")
                time.sleep(0.5)
        yield split, bundle, address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_split_generation_through_a_real_triton_equals_in_process(triton):
    split, bundle, address = triton
    plan = load_program(bundle, gpu=False, trusted_key=TRUSTED)
    inputs = {s.name: list(s.inputs) for s in plan.stages if s.side == "gpu"}
    client = WorkerClient(address, timeout=60.0, inputs=inputs, extends=False)
    remote = Executor(plan, client, seed=3)
    ids = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = generate(split, ids, max_new_tokens=5)
        got = generate(remote, ids, max_new_tokens=5)
    assert torch.equal(got, want)
    assert client.bytes_sent > 0 and client.bytes_received > 0
    client.close()  # the session's stream ends
