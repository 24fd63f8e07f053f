"""A hostile GPU worker and a hostile driver, speaking the real protocol (issue 10).

The worker side: a fake worker that trickles, answers late, names another request or stage,
announces the wrong or a huge tensor, or returns NaN. The driver must fail with a typed error,
in bounded time and memory, and never read one request's answer as another's. The client side:
a driver that floods the real worker with connections, huge frames or a stalled frame, or comes
without the token.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch
from conftest import SIGN_KEY, captured
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_runtime.driver import WorkerClient, WorkerError
from partitioner.api import partition
from partitioner.errors import IntegrityError
from runtime.protocol import (
    ERROR,
    MAGIC,
    RESULT,
    RUN,
    STATS,
    ProtocolError,
    encode,
    read_frame,
    send_frame,
)
from runtime.worker import GPUWorker, serve

EXPECTED = [(torch.float32, [1, 4])]


class FakeWorker:
    """Accepts one driver and answers each request with ``behave(sock, header)``."""

    def __init__(self, path, behave):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.address = f"unix:{path}"
        self.behave = behave
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        conn, _ = self.server.accept()
        try:
            while True:
                frame = read_frame(conn)
                self.behave(conn, frame.header)
        except (ProtocolError, OSError):
            conn.close()


def result(header, tensors=None, **changes):
    return encode(RESULT, {"id": header["id"], "stage": header["stage"], **changes},
                  tensors if tensors is not None else [torch.ones(1, 4)])  # fmt: skip


def call(worker, timeout=2.0):
    client = WorkerClient(worker.address, timeout=timeout)
    return client, lambda: client.run("gpu_1", [torch.zeros(1, 4)], EXPECTED)


def test_an_honest_reply_passes(tmp_path):
    worker = FakeWorker(tmp_path / "w", lambda s, h: s.sendall(result(h)))
    _, run = call(worker)
    assert torch.equal(run()[0], torch.ones(1, 4))


def test_a_trickling_worker_hits_one_deadline_per_request(tmp_path):
    def trickle(sock, header):
        for byte in result(header):
            sock.sendall(bytes([byte]))
            time.sleep(0.05)  # each byte well inside a per-recv timeout

    worker = FakeWorker(tmp_path / "w", trickle)
    _, run = call(worker, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="timed out"):
        run()
    assert time.monotonic() - start < 3.0


def test_a_late_answer_is_never_read_as_the_next_one(tmp_path):
    answers = iter([0.0, 1.5])

    def late(sock, header):
        time.sleep(next(answers, 0.0))
        sock.sendall(result(header, [torch.full((1, 4), float(header["id"]))]))

    worker = FakeWorker(tmp_path / "w", late)
    _, run = call(worker, timeout=1.0)
    assert run()[0][0, 0] == 1.0
    with pytest.raises(WorkerError, match="timed out"):
        run()
    time.sleep(1.0)  # the late answer to request 2 has arrived by now
    with pytest.raises(WorkerError, match="closed after an earlier failure"):
        run()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda h: result(h, id=h["id"] + 1), "names request"),
        (lambda h: result(h, stage="gpu_3"), "of stage 'gpu_3'"),
        (lambda h: result(h, [torch.ones(1, 4, dtype=torch.float64)]), "torch.float64"),
        (lambda h: result(h, [torch.ones(1, 4000)]), r"\[1, 4000\]"),  # a cache 1000x too long
        (lambda h: result(h, [torch.ones(1, 4), torch.ones(1)]), "has 2 tensors"),
        (lambda h: encode(STATS, {"id": h["id"], "stage": h["stage"]}), "expected a result"),
    ],
)
def test_a_reply_that_is_not_what_was_asked_is_refused(tmp_path, reply, message):
    worker = FakeWorker(tmp_path / "w", lambda s, h: s.sendall(reply(h)))
    _, run = call(worker)
    with pytest.raises(WorkerError, match=message):
        run()
    with pytest.raises(WorkerError, match="closed after an earlier failure"):
        run()


def test_a_huge_reply_is_refused_before_its_payload_is_read(tmp_path):
    def huge(sock, header):
        gib = [{"dtype": "float32", "shape": [1, 1 << 28], "nbytes": 1 << 30}]
        head = (
            (b'{"id": %d, "stage": "gpu_1", "tensors": ' % header["id"])
            + str(gib).replace("'", '"').encode()
            + b"}"
        )
        sock.sendall(struct.pack("<4sBIQ", MAGIC, RESULT, len(head), 1 << 30) + head)
        # and no payload: the driver must not wait for a GiB it never asked for

    worker = FakeWorker(tmp_path / "w", huge)
    _, run = call(worker, timeout=5.0)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"output 0 is torch.float32 \[1, 268435456\]"):
        run()
    assert time.monotonic() - start < 2.0


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
    root = tmp_path_factory.mktemp("hostile-client")
    partition(captured("tiny-llama"), "cmif", seed=1).save(root, sign_key=SIGN_KEY)
    return GPUWorker(root / "gpu", device="cpu")


def _start(worker, address, **limits):
    server = serve(worker, address, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _connect(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(address[5:])
    return sock


def test_the_worker_caps_connections(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _start(gpu_bundle, address, max_connections=2)
    held = [_connect(address), _connect(address)]
    time.sleep(0.2)
    third = _connect(address)
    frame = read_frame(third)
    assert frame.kind == ERROR and "no more connections" in frame.header["error"]
    for sock in [*held, third]:
        sock.close()
    server.shutdown()


def test_the_worker_refuses_oversized_and_stalled_frames(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _start(gpu_bundle, address, max_frame_bytes=1 << 20, frame_timeout=0.5)
    sock = _connect(address)
    sock.sendall(struct.pack("<4sBIQ", MAGIC, RUN, 2, 1 << 32))  # refused at the prefix
    frame = read_frame(sock)
    assert frame.kind == ERROR and "frame too large" in frame.header["error"]
    assert sock.recv(1) == b""  # and the connection is closed
    sock = _connect(address)
    sock.sendall(struct.pack("<4sBIQ", MAGIC, RUN, 100, 0))  # then nothing more
    start = time.monotonic()
    frame = read_frame(sock)
    assert frame.kind == ERROR and "timed out" in frame.header["error"]
    assert time.monotonic() - start < 3.0
    server.shutdown()


def test_a_token_is_required_when_set_and_stats_are_not_for_strangers(gpu_bundle, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = _start(gpu_bundle, address, token="s3cret")
    sock = _connect(address)
    send_frame(sock, STATS, {"id": 0, "stage": None})
    frame = read_frame(sock)
    assert frame.kind == ERROR and "token" in frame.header["error"]
    client = WorkerClient(address, token="s3cret")
    assert isinstance(client.stats(), dict)
    server.shutdown()
    tcp = _start(gpu_bundle, "127.0.0.1:0")
    port = tcp.server_address[1]
    stranger = WorkerClient(f"127.0.0.1:{port}")
    with pytest.raises(WorkerError, match="stats need the worker's token"):
        stranger.stats()
    tcp.shutdown()
    tcp.server_close()


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=256))
def test_fuzzed_frames_give_a_frame_or_a_protocol_error(data):
    left, right = socket.socketpair()
    try:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        right.settimeout(1)
        try:
            read_frame(right, deadline=time.monotonic() + 1, max_payload=1 << 16)
        except ProtocolError:
            pass
    finally:
        left.close()
        right.close()


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "stage", "tensors", "extends", "x"]),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5) | st.booleans(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=8,
        ),
    )
)
def test_fuzzed_headers_give_a_frame_or_a_protocol_error(header):
    head = str(header).replace("'", '"').replace("None", "null").replace("True", "true")
    head = head.replace("False", "false").encode()
    left, right = socket.socketpair()
    try:
        left.sendall(struct.pack("<4sBIQ", MAGIC, RESULT, len(head), 0) + head)
        right.settimeout(1)
        try:
            read_frame(right, deadline=time.monotonic() + 1)
        except ProtocolError:
            pass
    finally:
        left.close()
        right.close()
