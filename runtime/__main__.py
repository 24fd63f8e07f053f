"""``python -m runtime DIR/gpu --listen ADDR``: serve a bundle's GPU stages."""

from __future__ import annotations

import argparse

from runtime.worker import GPUWorker, serve


def main() -> None:
    parser = argparse.ArgumentParser(description="teesplit GPU worker")
    parser.add_argument("bundle", help="the saved bundle's gpu/ directory (or the bundle)")
    parser.add_argument("--listen", required=True, help="unix:/path/to/socket or host:port")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    worker = GPUWorker(args.bundle, backend=args.backend, device=args.device)
    server = serve(worker, args.listen)
    print(
        f"teesplit GPU worker: {len(worker.stages)} stages on {args.listen} "
        f"({args.backend}, {worker.device})",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
