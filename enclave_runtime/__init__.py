"""The enclave side: everything the enclave process runs (``python -m enclave_runtime``).

``executor.py`` runs a plan's stages with a stage runner for the GPU side; ``pool.py``,
``randomness.py`` and ``integrity.py`` are the mask pool, the CSPRNG and the Freivalds check it
owns; ``generation.py`` decodes with a KV cache; ``driver.py`` is the worker client (a stage
runner over the wire); ``tokenizer.py`` reads the bundle's tokenizer; ``manifest.py`` and
``launcher.py`` render the Gramine manifest and start the driver under Gramine when it is
installed. Layer rule (``docs/design.md``): this package imports the data layer, the bundle
reader and the wire format, never the compiler (capture, labelling, placement, protection).
"""

import os

# gRPC's C core logs connection events (a peer's GOAWAY at shutdown) to stderr at INFO: the
# driver's and the worker's output is for their users; errors still print.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
