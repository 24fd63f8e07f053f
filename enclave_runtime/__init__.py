"""Enclave side of the runtime (DESIGN.md "Runtime").

Built so far: the Gramine manifest (``manifest.py``: Jinja2 template rendered the way
``gramine-manifest`` does, the enclave bundle as hashed trusted files, the enclave size from a
measured peak). Not built yet (issue #4): the driver process that loads ``enclave/``, owns the
mask pool and talks to the GPU worker. Until then ``SplitProgram.__call__`` runs every stage
in-process.
"""
