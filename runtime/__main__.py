"""``python -m runtime DIR/gpu --listen ADDR``: serve a bundle's GPU stages (the GPU worker).

Its own entry point: it imports the worker and the bundle reader, never the compiler.
``teesplit serve-gpu`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import sys

from partitioner.errors import TeesplitError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="DIR/gpu (or DIR) of a saved split program")
    parser.add_argument("--listen", required=True, help="unix:/path or host:port")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from runtime.worker import GPUWorker, serve

    try:
        worker = GPUWorker(args.bundle, backend=args.backend, device=args.device)
        server = serve(worker, args.listen)
    except (TeesplitError, OSError, ValueError) as exc:
        raise SystemExit(f"teesplit GPU worker: {type(exc).__name__}: {exc}") from None
    print(
        f"teesplit GPU worker: {len(worker.stages)} stages on {args.listen} "
        f"({args.backend}, {worker.device})",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
