"""The GPU side: the worker that serves a bundle's ``gpu/`` stages (``python -m runtime``).

``worker.py`` loads the GPU stages through the bundle reader (``partitioner.bundle``) and runs
them with torch or onnxruntime (``onnx_stage.py``); ``kserve.py`` is the KServe v2 / Open
Inference Protocol codec it speaks with the enclave driver over gRPC. Layer rule
(``docs/design.md``): this package imports the data layer and the bundle reader, never the
compiler or the enclave side.
"""

import os

# gRPC's C core logs connection events (a peer's GOAWAY at shutdown) to stderr at INFO: the
# driver's and the worker's output is for their users; errors still print.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
