"""The GPU side: the worker that serves a bundle's ``gpu/`` stages (``python -m runtime``).

``worker.py`` loads the GPU stages through the bundle reader (``partitioner.bundle``) and runs
them with torch or onnxruntime (``onnx_stage.py``); ``protocol.py`` is the framed tensor wire
format it speaks with the enclave driver. Layer rule (``docs/design.md``): this package imports
the data layer and the bundle reader, never the compiler or the enclave side.
"""
