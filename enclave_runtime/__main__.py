"""``python -m enclave_runtime DIR --worker ADDR``: the enclave driver, prompts on stdin.

The entry point the Gramine manifest names, and its own: it imports the executor, the bundle
reader and the worker client, never the compiler (capture, labelling, placement, protection).
``teesplit enclave`` calls :func:`main`. A prompt line is text, or ``ids: 1,2,3``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from enclave_runtime import allocator
from enclave_runtime.driver import connect
from enclave_runtime.generation import encode_prompt, generate
from enclave_runtime.launcher import bundle_root
from enclave_runtime.tokenizer import bundle_tokenizer
from partitioner.bundle import VerifiedFiles, read_document
from partitioner.errors import InputError, TeesplitError


def _tokenizer(root: Path, trusted_key: str | None) -> Any:
    """The bundle's own tokenizer (saved by ``teesplit partition``), read through the verified
    file list of its (signature-checked) plan.json, or None."""
    document = read_document(root, trusted_key=trusted_key)
    return bundle_tokenizer(root, VerifiedFiles(root, document["files"]))


def _encode(line: str, tokenizer: Any) -> tuple[Any, Any]:
    """A stdin line, ``ids: 1,2,3`` or a prompt -> ``(input_ids, public positions or None)``."""
    if line.startswith("ids:"):
        try:
            return torch.tensor([[int(x) for x in line[4:].split(",")]]), None
        except (ValueError, RuntimeError):
            raise InputError("'ids:' must be followed by comma-separated integers") from None
    if tokenizer is None:
        raise InputError("no tokenizer in this bundle; send 'ids: 1,2,3'")
    return encode_prompt(tokenizer, line)


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"teesplit enclave: cannot read the worker token {path}: {exc}") from None


def _tls_root(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(
            f"teesplit enclave: cannot read the worker's TLS root {path}: {exc.strerror}"
        ) from None


def serve_stdin(args: argparse.Namespace) -> None:
    """Load enclave/, connect to the worker, answer prompts from stdin."""
    root = bundle_root(args.bundle)
    if args.allow_unsigned:
        print(UNSIGNED_WARNING, file=sys.stderr, flush=True)
    program = connect(
        root,
        args.worker,
        trusted_key=args.trusted_key,
        allow_unsigned=args.allow_unsigned,
        timeout=args.timeout,
        token=_token(args.worker_token_file),
        tls_root=_tls_root(args.worker_tls_root),
    )
    plan = program.plan()
    if not program.spec.state:
        raise SystemExit(
            f"teesplit enclave: {root} holds no decoder step (no KV-cache state) to generate with"
        )
    tokenizer = _tokenizer(root, args.trusted_key)
    trust = "UNSIGNED bundle (--allow-unsigned)" if args.allow_unsigned else "signature verified"
    print(
        f"enclave driver ready: {plan['model']} under {plan['policy']['name']!r}; {trust}",
        flush=True,
    )
    failed = 0
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:  # a bad prompt is answered with its error, and the driver serves the next one
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"prompt line {number} is not UTF-8 text") from None
            if not line:
                continue
            ids, public = _encode(line, tokenizer)
            sent, received = program.runner.bytes_sent, program.runner.bytes_received
            start = time.perf_counter()
            out = generate(
                program,
                ids,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=getattr(tokenizer, "eos_token_id", None),
                public_prompt=public,
            )
        except InputError as exc:
            failed += 1
            print(f"error: prompt line {number}: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        show = (lambda t: repr(tokenizer.decode(t, skip_special_tokens=True))) if tokenizer else str
        print(f"prompt: {line!r}")
        request = program.last_request
        if "sanitised_tokens" in request:
            print(
                f"sanitised prompt (what the GPU saw; RNM on the user's words, "
                f"ε = {request['epsilon']:g} in all): "
                f"{show(request['sanitised_tokens'][0].tolist())}"
            )
        print(f"answer: {show(new)}")
        up = program.runner.bytes_sent - sent
        down = program.runner.bytes_received - received
        print(
            f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s); "
            f"to the GPU worker {up:,} B, back {down:,} B "
            f"({(up + down) / max(len(new), 1):,.0f} B per token)",
            flush=True,
        )
    if failed:
        raise SystemExit(f"teesplit enclave: {failed} prompts refused (see the error lines)")


UNSIGNED_WARNING = (
    "teesplit enclave: WARNING --allow-unsigned: the bundle's signature is not checked, so "
    "whoever can write the bundle chooses the code this enclave runs"
)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 86400] seconds")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m enclave_runtime", description=__doc__.splitlines()[0]
    )
    parser.add_argument("bundle", help="DIR or DIR/enclave of a saved decoder step")
    parser.add_argument("--worker", required=True, help="the GPU worker (unix:/path or host:port)")
    verification = parser.add_mutually_exclusive_group(required=True)
    verification.add_argument(
        "--trusted-key", default=None, help="the compiler's Ed25519 public key (PEM)"
    )
    verification.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="run a bundle nothing authenticates (development only; said on every start)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds per worker call")
    parser.add_argument(
        "--worker-tls-root", default=None, help="PEM root certificate: TLS to the worker"
    )
    parser.add_argument(
        "--worker-token-file", default=None, help="the worker's shared secret (TCP)"
    )
    args = parser.parse_args(argv)
    for note in allocator.prepare():
        print(f"teesplit enclave: {note}", file=sys.stderr, flush=True)
    try:
        serve_stdin(args)
    except TeesplitError as exc:  # typed errors name what is at fault; no traceback needed
        raise SystemExit(f"teesplit enclave: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
