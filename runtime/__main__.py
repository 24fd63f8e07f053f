"""``python -m runtime DIR/gpu --listen ADDR``: serve a bundle's GPU stages.

The same as ``teesplit serve-gpu``, for hosts where the console script is not on the PATH.
"""

from __future__ import annotations

import sys

from partitioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve-gpu", *sys.argv[1:]]))
