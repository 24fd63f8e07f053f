"""``python -m enclave_runtime DIR --worker ADDR``: the enclave driver (``teesplit enclave``).

This is the entrypoint the Gramine manifest names; it delegates to the CLI's one parser.
"""

import sys

from partitioner.cli import main

main(["enclave", *sys.argv[1:]])
