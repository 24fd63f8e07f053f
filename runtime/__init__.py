"""GPU side of the runtime (DESIGN.md "Runtime").

``protocol.py``: the framed tensor protocol; ``worker.py``: the GPU worker that loads ``gpu/``
and serves stages to enclave drivers over a Unix socket or TCP (``python -m runtime``). Not
built yet (issue #4): CUDA measurements (no GPU was lent to this work) and KV-cache generation.
"""
