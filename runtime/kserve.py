"""The GPU side's one contract: KServe v2 / Open Inference Protocol over gRPC.

Both ends use the generated stubs of the protos that ``tritonclient`` ships
(``tritonclient.grpc.service_pb2``), not its numpy client wrappers. Each GPU stage is a model
named after the stage; its inputs and outputs are named after the plan's values and travel as
``raw_input_contents`` / ``raw_output_contents`` (little-endian, C order), with the KServe
datatype and shape of each in the request. Request parameters (KServe ``parameters``, as
Triton's sequence batcher reads them):

* ``sequence_id`` (string), ``sequence_start``, ``sequence_end`` (bool): one session, whose
  state (the inputs a stage was last sent, for ``extends``) the worker frees at its end or
  after an idle timeout;
* per input, ``teesplit_extends`` (int64): the tensor is only the new part of what this session
  last sent that input, along this dim (a KV cache one position longer);
* ``teesplit_rows`` (string, ``"id1,id2,..."``): on a stage that holds state, one sequence id
  per row of the batch instead of one ``sequence_id`` for the request: an enclave that decodes
  many sessions in one call names whose cache each row continues (``sequence_start``: every
  row starts a sequence);
* ``teesplit_release`` (string, the same form), on a request without tensors: free those
  row-addressed sequences of the stage now.

This module decodes what a peer sent and refuses anything malformed with a
:class:`ProtocolError` naming the tensor: an unknown datatype, a negative or absurd shape, a
payload whose size does not match its shape, a count of payloads that does not match the
tensors. It is imported by the enclave's client, so it stays small.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from partitioner.errors import TeesplitError

# KServe v2 datatypes <-> torch (bf16 has no numpy dtype: it travels as its raw 16 bits)
DATATYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP64": torch.float64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DATATYPES.items()}
MAX_DIMS = 8
MAX_MESSAGE = 1 << 30  # bytes of one request or reply: grpc's limits are set from this
EXTENDS = "teesplit_extends"
ROWS = "teesplit_rows"
RELEASE = "teesplit_release"


class ProtocolError(TeesplitError):
    """A KServe message is malformed or is not what was asked."""


def service() -> tuple[Any, Any]:
    """``(service_pb2, service_pb2_grpc)`` from tritonclient's generated protos."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def decode(
    name: str, datatype: str, shape: Any, raw: bytes, limit: int = MAX_MESSAGE
) -> torch.Tensor:
    """One tensor from its KServe description and raw bytes; :class:`ProtocolError` naming
    ``name`` when any part is malformed."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(
            f"tensor {name}: datatype {datatype!r} is not one of {sorted(DATATYPES)}"
        )
    dims = list(shape)
    if len(dims) > MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in dims):
        raise ProtocolError(f"tensor {name}: shape {dims[: MAX_DIMS + 1]} is not a valid shape")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(dims) * itemsize
    # each dim counted as at least 1: an empty tensor's other dims still make its strides
    # ([0, 10**4, 10**4, 10**4, 10**6] holds no byte, but numpy cannot lay it out)
    if math.prod(max(d, 1) for d in dims) * itemsize > limit:
        raise ProtocolError(
            f"tensor {name}: shape {dims} of {datatype} is over the limit of {limit} bytes"
        )
    if len(raw) != expected:
        raise ProtocolError(
            f"tensor {name}: {len(raw)} bytes for a {datatype} tensor of shape {dims} "
            f"({expected} bytes)"
        )
    if dtype == torch.bool and raw.translate(None, b"\x00\x01"):
        raise ProtocolError(f"tensor {name}: a BOOL tensor holds bytes other than 0 and 1")
    if dtype == torch.bfloat16:
        array = np.frombuffer(raw, dtype=np.int16).reshape(dims)
        return torch.from_numpy(array.copy()).view(torch.bfloat16)
    array = np.frombuffer(raw, dtype=torch.empty((), dtype=dtype).numpy().dtype).reshape(dims)
    return torch.from_numpy(array.copy())


def target(address: str) -> str:
    """The gRPC target of a worker address: ``unix:/path`` (or ``/path``) or ``host:port``."""
    if not isinstance(address, str) or not address or any(c.isspace() for c in address):
        raise ProtocolError(f"address {address!r} is neither unix:/path nor host:port")
    if address.startswith("unix:"):
        return address
    if address.startswith(("/", ".")):
        return f"unix:{address}"
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ProtocolError(
            f"address {address!r} is neither unix:/path nor host:port with a port in 0..65535"
        )
    return f"{host}:{port}"


def sequence_parameters(params: Any, session: str, start: bool, end: bool) -> None:
    """Set a request's session parameters (Triton's sequence batcher reads the same)."""
    params["sequence_id"].string_param = session
    params["sequence_start"].bool_param = start
    params["sequence_end"].bool_param = end
