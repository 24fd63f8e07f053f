"""A real Triton on a machine without a GPU or a container: the ``tritonserver`` binary that
``nvidia-pytriton`` ships, serving a repository written by ``teesplit export-triton``.

For development, tests and benchmarks only. A GPU host runs the Triton container with the
onnxruntime backend and serves the export as it is. PyTriton's server has the Python backend
only, so :func:`python_backend` rewrites each exported ``config.pbtxt`` to ``backend:
"python"`` (one CPU instance) and puts beside each ``model.onnx`` a ``model.py`` that runs it
under onnxruntime. A stage that holds a KV cache is exported with Triton implicit state; the
Python backend does not keep implicit state, so that ``model.py`` keeps it itself, per
sequence (the ``CORRID`` control the export adds... see :data:`MODEL_PY`), exactly as the
onnxruntime backend would: input state = the last ``NAME__next``.

:func:`start` runs the server (its ``LD_LIBRARY_PATH`` pointed at this interpreter's ``lib/``,
its numpy 1 first on the path: PyTriton's backend utilities are built against it) and waits
until it answers; :class:`TritonUnavailable` says why it cannot.
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

import grpc

from partitioner.errors import TeesplitError
from runtime.kserve import service

MODEL_PY = """
import sys

sys.path[:0] = PATHS  # the stub runs the base interpreter: this environment's packages

import json
import os

import numpy
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        batching = config.get("sequence_batching") or {}
        # implicit state, kept here as the onnxruntime backend keeps it: per sequence
        self.states = [(s["input_name"], s["output_name"]) for s in batching.get("state", [])]
        self.initial = {
            s["input_name"]: (s["initial_state"][0]["dims"], s["data_type"])
            for s in batching.get("state", [])
        }
        self.controls = [c["name"] for c in batching.get("control_input", [])]
        self.held = {}
        here = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(here, providers=["CPUExecutionProvider"])
        self.graph_inputs = [i.name for i in self.session.get_inputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            get = pb_utils.get_input_tensor_by_name
            feeds = {n: get(request, n).as_numpy() for n in self.inputs}
            for name in self.controls:
                tensor = get(request, name)
                feeds[name] = tensor.as_numpy() if tensor is not None else numpy.zeros([1], "int32")
            key = request.correlation_id()
            if self.states:
                start = "START" in feeds and int(feeds["START"][0]) == 1
                if start or key not in self.held:
                    self.held[key] = {}
                for name, _ in self.states:
                    dims, dtype = self.initial[name]
                    empty = numpy.zeros([int(d) for d in dims], "float32")
                    feeds[name] = self.held[key].get(name, empty)
            feeds = {n: v for n, v in feeds.items() if n in self.graph_inputs}
            names = self.outputs + [out for _, out in self.states]
            outs = self.session.run(names, feeds)
            for (name, _), value in zip(self.states, outs[len(self.outputs):]):
                self.held[key][name] = value
            if "END" in feeds and int(feeds["END"][0]) == 1:
                self.held.pop(key, None)
            tensors = [pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""


class TritonUnavailable(TeesplitError):
    """PyTriton's ``tritonserver`` is not installed here, or did not start."""


def root() -> Path:
    """PyTriton's bundled server (found, not imported: the Makefile installs the wheel without
    its deps, and only its server binary and backend are used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable("nvidia-pytriton is not installed: no tritonserver binary")
    found = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (found / "bin" / "tritonserver").is_file() or not _stub(found).is_dir():
        raise TritonUnavailable(
            f"pytriton ships no tritonserver or no Python stub for {sys.version}"
        )
    if not (numpy1() / "numpy").is_dir():
        raise TritonUnavailable(f"no numpy 1 at {numpy1()} for PyTriton's Python backend")
    return found


def numpy1() -> Path:
    """numpy 1 for PyTriton's Python backend (the Makefile installs it here; with numpy 2 its
    tensors come back empty)."""
    return Path(sys.prefix) / "triton-numpy"


def _stub(server: Path) -> Path:
    return server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"


def python_backend(repo: Path) -> None:
    """The export's configs with ``backend: "python"`` and the ONNX runner beside each model."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for config_path in repo.glob("*/config.pbtxt"):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        config.backend = "python"
        del config.instance_group[:]  # no GPU here: one CPU instance
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
        config_path.write_text(text_format.MessageToString(config))
        for version in config_path.parent.iterdir():
            if version.is_dir():
                paths = [str(numpy1())] + [p for p in sys.path if p and Path(p).is_dir()]
                (version / "model.py").write_text(MODEL_PY.replace("PATHS", repr(paths)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(repo: Path, workdir: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Serve ``repo`` (already :func:`python_backend`-ed) on a free loopback port; returns the
    process and its gRPC address once it answers. The caller terminates the process."""
    server = root()
    backends = workdir / "backends" / "python"
    backends.mkdir(parents=True, exist_ok=True)
    for item in (server / "backends" / "python").iterdir():
        if not (backends / item.name).exists():
            (backends / item.name).symlink_to(item)
    stub = backends / "triton_python_backend_stub"
    if not stub.exists():  # Triton looks for this interpreter's stub beside the backend
        stub.symlink_to(_stub(server) / "triton_python_backend_stub")
    port = free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = sysconfig.get_config_var("LIBDIR")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    log_path = workdir / "triton.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(server / "bin" / "tritonserver"),
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
    deadline = time.monotonic() + timeout
    pb, service_grpc = service()
    while True:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = service_grpc.GRPCInferenceServiceStub(channel)
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2.0).ready:
                    return proc, address
        except grpc.RpcError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            tail = log_path.read_text()[-2000:]
            raise TritonUnavailable(f"tritonserver did not start: {tail}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Terminate ``proc``, and kill it if it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


__all__ = ["TritonUnavailable", "python_backend", "root", "start", "stop"]
