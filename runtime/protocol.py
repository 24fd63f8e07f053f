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
import time
from collections.abc import Callable
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
MAX_HEADER = 1 << 20
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


_NUMPY = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
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


def _read_exact(sock: socket.socket, n: int, what: str, deadline: float | None) -> bytes:
    """``n`` bytes, before ``deadline`` (a ``time.monotonic()`` instant) if one is given: one
    deadline for the whole read, so a peer that trickles a byte at a time cannot stretch it."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(f"timed out waiting for the {what} ({got}/{n} bytes)")
            sock.settimeout(left)
        try:
            count = sock.recv_into(view[got:], min(n - got, 1 << 20))
        except TimeoutError:
            raise ProtocolError(f"timed out waiting for the {what} ({got}/{n} bytes)") from None
        except OSError as exc:
            raise ProtocolError(f"connection failed while reading the {what}: {exc}") from None
        if not count:
            raise ProtocolError(f"connection closed while reading the {what} ({got}/{n} bytes)")
        got += count
    return bytes(buffer) if n < (1 << 16) else buffer


def _tensor_metas(header: Any) -> list[tuple[torch.dtype, list[int], int]]:
    """``(dtype, shape, nbytes)`` of each tensor a header announces, checked."""
    metas = header.get("tensors", [])
    if not isinstance(metas, list) or len(metas) > 4096:
        raise ProtocolError("frame header: 'tensors' must be a list of at most 4096 entries")
    out = []
    for i, meta in enumerate(metas):
        if not isinstance(meta, dict):
            raise ProtocolError(f"tensor {i}: its description is not an object")
        dtype = DTYPES.get(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {i}: dtype {meta.get('dtype')!r} is not allowed")
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ProtocolError(f"tensor {i}: shape {shape!r} is not a list of sizes")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(np.prod(shape, dtype=object)) * itemsize
        if meta.get("nbytes") != nbytes:
            raise ProtocolError(
                f"tensor {i}: {meta.get('nbytes')} bytes declared, shape {shape} of "
                f"{meta['dtype']} needs {nbytes}"
            )
        out.append((dtype, shape, nbytes))
    return out


def read_frame(
    sock: socket.socket,
    *,
    deadline: float | None = None,
    max_payload: int = MAX_FRAME,
    check: Callable[[int, dict[str, Any], list[tuple[torch.dtype, list[int], int]]], None]
    | None = None,
) -> Frame:
    """One frame. ``check(kind, header, metas)`` runs after the header is read and before
    a byte of payload is: a receiver that knows what it expects refuses anything else there,
    so what it buffers is bounded by what it expects, not by what the peer announces."""
    magic, kind, head_len, body_len = _PREFIX.unpack(
        _read_exact(sock, _PREFIX.size, "frame prefix", deadline)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} in frame prefix (expected {MAGIC!r})")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if head_len > MAX_HEADER or body_len > max_payload:
        raise ProtocolError(f"frame too large: header {head_len} B, payload {body_len} B")
    try:
        header = json.loads(_read_exact(sock, head_len, "frame header", deadline))
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    metas = _tensor_metas(header)
    if sum(m[2] for m in metas) != body_len:
        raise ProtocolError(
            f"payload of {body_len} B, but the header's tensors take {sum(m[2] for m in metas)}"
        )
    if check is not None:
        check(kind, header, metas)
    body = _read_exact(sock, body_len, "frame payload", deadline)
    tensors, offset = [], 0
    for dtype, shape, nbytes in metas:
        if nbytes == 0:  # an empty KV cache at the prefill: numpy cannot view 0 bytes as float
            tensor = torch.empty(shape, dtype=dtype)
        else:
            raw = np.frombuffer(body, dtype=np.uint8, count=nbytes, offset=offset)
            if dtype == torch.bfloat16:
                tensor = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(raw.view(_NUMPY[dtype]).copy())
            tensor = tensor.reshape(shape)
        tensors.append(tensor)
        offset += nbytes
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
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ProtocolError(
            f"address {address!r} is neither unix:/path nor host:port with a port in 0..65535"
        )
    return socket.AF_INET, (host, int(port))
