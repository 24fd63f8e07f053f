"""``python -m runtime DIR/gpu --listen ADDR``: serve a bundle's GPU stages (the GPU worker).

Its own entry point: it imports the worker and the bundle reader, never the compiler.
``teesplit serve-gpu`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from partitioner.errors import TeesplitError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="DIR/gpu (or DIR) of a saved split program")
    parser.add_argument("--listen", required=True, help="unix:/path or host:port")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--token-file", default=None, help="a shared secret every request must carry (TCP)"
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key (TLS)")
    parser.add_argument("--max-connections", type=int, default=64)
    parser.add_argument("--max-frame-mb", type=int, default=1024, help="largest message")
    parser.add_argument(
        "--batch-delay-ms",
        type=float,
        default=20.0,
        help="how long a decode step's call (a stage holding caches) waits for other "
        "sessions' calls to batch with (0: no wait); other stages batch what is queued",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="most rows in one batch")
    args = parser.parse_args(argv)
    from runtime.worker import GPUWorker, serve

    try:
        token = None
        if args.token_file is not None:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if args.max_connections < 1 or args.max_frame_mb < 1 or args.max_batch < 1:
            raise ValueError("--max-connections, --max-frame-mb and --max-batch must be >= 1")
        if not 0 <= args.batch_delay_ms <= 1000:
            raise ValueError("--batch-delay-ms must be between 0 and 1000")
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = None
        if args.tls_cert is not None:
            tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
        worker = GPUWorker(
            args.bundle,
            backend=args.backend,
            device=args.device,
            batch_delay=args.batch_delay_ms / 1000,
            max_batch=args.max_batch,
        )
        server = serve(
            worker,
            args.listen,
            token=token,
            max_connections=args.max_connections,
            max_frame_bytes=args.max_frame_mb << 20,
            tls=tls,
        )
    except (TeesplitError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"teesplit GPU worker: {type(exc).__name__}: {exc}") from None
    print(
        f"teesplit GPU worker: {len(worker.stages)} stages on {args.listen} "
        f"({args.backend}, {worker.device})",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
