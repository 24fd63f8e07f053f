"""The framed tensor protocol between the enclave driver and the GPU worker.

A frame is ``MAGIC (4 bytes) | kind (u8) | header length (u32) | payload length (u64)``, then a
JSON header and the raw tensor bytes. The header names the stage (or the error) and describes
each tensor (``dtype``, ``shape``); the payload is the tensors' bytes back to back, little
endian, C order. Every field is checked on receipt and a bad one raises :class:`ProtocolError`
naming it: a wrong magic, an unknown kind, a dtype outside the allowed set, a size that does not
match the shape, a frame larger than the limit, or a connection closed mid-frame.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from partitioner.errors import TeesplitError

MAGIC = b"TSP1"
RUN, RESULT, ERROR, STATS = 1, 2, 3, 4
KINDS = {RUN: "run", RESULT: "result", ERROR: "error", STATS: "stats"}
_PREFIX = struct.Struct("<4sBIQ")
MAX_FRAME = 8 << 30
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


class ProtocolError(TeesplitError):
    """A frame is malformed, or the peer closed or timed out."""


@dataclass
class Frame:
    kind: int
    header: dict[str, Any]
    tensors: list[torch.Tensor]


def encode(kind: int, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> bytes:
    metas, blobs = [], []
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ProtocolError(f"cannot send a {name} tensor; allowed: {sorted(DTYPES)}")
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        blob = raw.numpy().tobytes()
        metas.append({"dtype": name, "shape": list(t.shape), "nbytes": len(blob)})
        blobs.append(blob)
    head = json.dumps({**header, "tensors": metas}).encode()
    body = b"".join(blobs)
    return _PREFIX.pack(MAGIC, kind, len(head), len(body)) + head + body


def _read_exact(sock: socket.socket, n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            raise ProtocolError(f"timed out waiting for the {what}") from None
        except OSError as exc:
            raise ProtocolError(f"connection failed while reading the {what}: {exc}") from None
        if not chunk:
            raise ProtocolError(f"connection closed while reading the {what} ({got}/{n} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Frame:
    magic, kind, head_len, body_len = _PREFIX.unpack(
        _read_exact(sock, _PREFIX.size, "frame prefix")
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} in frame prefix (expected {MAGIC!r})")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if head_len > 16 << 20 or body_len > MAX_FRAME:
        raise ProtocolError(f"frame too large: header {head_len} B, payload {body_len} B")
    try:
        header = json.loads(_read_exact(sock, head_len, "frame header"))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    body = _read_exact(sock, body_len, "frame payload")
    tensors, offset = [], 0
    for i, meta in enumerate(header.get("tensors", [])):
        dtype = DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ProtocolError(f"tensor {i}: dtype {meta.get('dtype')!r} is not allowed")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {i}: shape {shape!r} is not a list of sizes")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if meta.get("nbytes") != nbytes or offset + nbytes > len(body):
            raise ProtocolError(
                f"tensor {i}: {meta.get('nbytes')} bytes declared, shape {shape} of "
                f"{meta['dtype']} needs {nbytes}, payload has {len(body) - offset} left"
            )
        raw = np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=offset).copy()
        if nbytes == 0:  # an empty KV cache at the prefill: numpy cannot view 0 bytes as float
            tensor = torch.empty(shape, dtype=dtype)
        elif dtype == torch.bfloat16:
            tensor = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
        else:
            tensor = torch.from_numpy(raw).view(dtype).reshape(shape)
        tensors.append(tensor)
        offset += nbytes
    if offset != len(body):
        raise ProtocolError(f"payload has {len(body) - offset} bytes no tensor describes")
    return Frame(kind, header, tensors)


def send_frame(
    sock: socket.socket, kind: int, header: dict[str, Any], tensors: list[torch.Tensor] = ()
) -> int:
    data = encode(kind, header, list(tensors))
    sock.sendall(data)
    return len(data)


def parse_address(address: str) -> tuple[int, Any]:
    """``unix:/path`` or ``/path`` -> a Unix socket; ``tcp:host:port`` or ``host:port`` -> TCP."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:]
    if address.startswith("/") or address.startswith("."):
        return socket.AF_UNIX, address
    host_port = address.removeprefix("tcp:")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ProtocolError(f"address {address!r} is neither unix:/path nor host:port")
    return socket.AF_INET, (host, int(port))
