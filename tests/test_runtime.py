"""Two processes: the GPU worker serves a saved bundle, the enclave driver runs the rest."""

import socket
import threading
import time

import pytest
import torch
from conftest import SIGN_KEY, TRUSTED, captured, model_output

from enclave_runtime.driver import WorkerError, connect, spawn_worker
from partitioner.api import partition
from runtime.protocol import ERROR, MAGIC, read_frame
from runtime.worker import GPUWorker, serve


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = {}
    for preset in ("secureinfer", "slalom", "cmif"):
        path = tmp_path_factory.mktemp(preset)
        partition(captured("tiny-llama"), preset, seed=4).save(path, sign_key=SIGN_KEY)
        out[preset] = path
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
    program = connect(bundles["slalom"], address, seed=4, trusted_key=TRUSTED)
    reference = partition(captured("tiny-llama"), "slalom", seed=4)
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            model_output(program(input_ids=ids)), model_output(reference(input_ids=ids))
        )
    stats = program.runner.stats()
    assert stats and all(s["calls"] == 1 and s["bytes_in"] > 0 for s in stats.values())


def _serve_in_thread(bundle, address, backend="torch"):
    server = serve(GPUWorker(bundle, backend=backend, device="cpu"), address)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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


def _fake_worker(tmp_path, behaviour):
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        if behaviour == "die":
            read_frame(conn)
            conn.close()  # dies mid-request
        else:
            time.sleep(30)  # hangs

    threading.Thread(target=run, daemon=True).start()
    return f"unix:{path}"


@pytest.mark.parametrize("behaviour", ["die", "hang"])
def test_a_dead_or_hung_worker_fails_the_request_within_the_timeout(bundles, tmp_path, behaviour):
    address = _fake_worker(tmp_path, behaviour)
    program = connect(bundles["slalom"], address, timeout=1.0, trusted_key=TRUSTED)
    start = time.perf_counter()
    with pytest.raises(WorkerError, match=r"GPU worker at .* failed on stage gpu_\d+"):
        program(input_ids=torch.randint(3, 250, (1, 5)))
    assert time.perf_counter() - start < 10


def test_malformed_frames_and_wrong_shapes_are_named(bundles, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["slalom"], address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address[5:])
    sock.sendall(b"JUNK" + bytes(13))
    frame = read_frame(sock)
    assert frame.kind == ERROR and "bad magic b'JUNK'" in frame.header["error"]
    sock.close()
    program = connect(bundles["slalom"], address, trusted_key=TRUSTED)
    stage = next(s for s in program.stages if s.side == "gpu")
    with pytest.raises(WorkerError, match=f"refused stage {stage.name}: stage {stage.name} input"):
        program.runner.run(stage.name, [torch.zeros(3, dtype=torch.int64)])
    server.shutdown()
    assert MAGIC == b"TSP1"


def test_the_enclave_host_needs_no_gpu_bundle(bundles, tmp_path):
    import shutil

    enclave_only = tmp_path / "enclave-host"
    shutil.copytree(bundles["cmif"], enclave_only, ignore=shutil.ignore_patterns("gpu"))
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _serve_in_thread(bundles["cmif"], address)
    program = connect(enclave_only, address, seed=4, trusted_key=TRUSTED)
    reference = partition(captured("tiny-llama"), "cmif", seed=4)
    ids = torch.randint(3, 250, (1, 6))
    with torch.no_grad():
        assert torch.equal(
            model_output(program(input_ids=ids)), model_output(reference(input_ids=ids))
        )
    server.shutdown()


def test_an_extension_of_nothing_is_refused_naming_the_input(bundles, tmp_path):
    """``extends`` may only grow an input this connection sent before."""
    from runtime.protocol import RUN, send_frame

    server = serve(GPUWorker(bundles["cmif"] / "gpu"), f"unix:{tmp_path / 'x.sock'}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(tmp_path / "x.sock"))
        send_frame(sock, RUN, {"stage": "gpu_1", "extends": {"0": 1}}, [torch.zeros(1, 2)])
        frame = read_frame(sock)
        assert frame.kind == ERROR
        assert "input 0 extends an input this connection never sent" in frame.header["error"]
        sock.close()
    finally:
        server.shutdown()
        server.server_close()


def test_grown_dim_only_for_a_true_extension():
    from enclave_runtime.driver import grown_dim

    old = torch.arange(6.0).reshape(1, 2, 3)
    assert grown_dim(old, torch.cat([old, torch.ones(1, 2, 1)], 2)) == 2
    assert grown_dim(old, torch.cat([old + 1, torch.ones(1, 2, 1)], 2)) is None  # re-masked
    assert grown_dim(old, old.clone()) is None
    assert grown_dim(old[:, :, :0], torch.ones(1, 2, 4)) is None  # nothing held to extend
    assert grown_dim(old, torch.ones(2, 2, 4)) is None
