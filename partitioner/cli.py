"""``teesplit``: partition a model into split artifacts, inspect them, serve the GPU side.

    teesplit partition MODEL --policy P --out DIR   # MODEL: a built-in name or a local HF folder
    teesplit inspect DIR [--svg FILE]               # the plan, and a drawing of the stages
    teesplit serve-gpu DIR/gpu --listen ADDR        # the GPU worker (unix:/path or host:port)
    teesplit export-triton DIR/gpu --out REPO       # the GPU stages as a Triton model repository

    teesplit enclave DIR/enclave --worker ADDR     # the enclave driver: prompts on stdin
    teesplit serve DIR --worker ADDR --listen HOST:PORT  # an OpenAI-compatible HTTP server
    teesplit run DIR --prompt TEXT                  # both processes locally, greedy decoding
    teesplit demo                                   # SmolLM2 under cmif, both processes

A causal LM is partitioned as its KV-cache decoder step (``partitioner.generation``), so the
bundle generates with a cache. ``run`` starts a GPU worker process (a private Unix socket, or
TCP on 127.0.0.1 when Gramine will run the driver) unless ``--worker`` names one, then the
enclave driver through ``enclave_runtime.launcher``: under ``gramine-sgx`` or ``gramine-direct``
when on the PATH, else as a plain process, and it says which.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


def _load_model(spec: str) -> Any:
    from partitioner.zoo import BUILTIN

    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(
            f"teesplit: MODEL {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) "
            "nor a local transformers folder"
        )
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except ValueError:  # not a causal LM: an encoder such as BERT
        return AutoModel.from_pretrained(path, local_files_only=True)


def _generates(model: Any) -> bool:
    """A causal LM (partitioned as a KV-cache step), not an encoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    can = getattr(base, "can_generate", None)
    return bool(can()) if callable(can) else False


def _captured(spec: str, start: float, cache: dict[str, Any] | None) -> tuple[Any, int | None]:
    """The model ``spec`` names as ``partition`` takes it (a causal LM's decoder step
    captured), and its embedding rows; kept in ``cache`` when one is given (the demo
    partitions one model under two policies, and ``partition`` leaves a captured program as
    it was given)."""
    if cache is not None and spec in cache:
        _step(f"{spec}: loaded and captured already", start)
        return cache[spec]
    _step(f"loading {spec}", start)
    model = _load_model(spec)
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    rows = int(embedding.weight.shape[0]) if embedding is not None else None
    if _generates(model):
        from partitioner.generation import capture_decoder

        _step("capturing the KV-cache decoder step", start)
        model = capture_decoder(model, model_name=Path(spec).name)
    if cache is not None:
        cache[spec] = (model, rows)
    return model, rows


def _enclave_key(args: argparse.Namespace, protects_model: bool) -> Path | None:
    """The key file to seal the enclave's weights with (``--enclave-key``, made if missing),
    or None. A policy that protects the model must choose: its weights in the clear are
    readable by whoever reads the enclave host's disk (``--plaintext-enclave`` says so)."""
    from partitioner import sealing
    from partitioner.errors import ArtifactError

    path = getattr(args, "enclave_key", None)
    if path is None:
        if protects_model and not getattr(args, "plaintext_enclave", False):
            raise ArtifactError(
                "this policy protects the model, whose weights enclave/ would hold in the "
                "clear: give --enclave-key FILE to seal them (a new key is made there if the "
                "file is missing), or --plaintext-enclave"
            )
        return None
    path = Path(path)
    if not path.exists():
        sealing.new_key(path)
        print(f"made a new enclave key: {path} (the enclave needs it: keep it secret)")
    sealing.load_key(path)  # a bad key file fails before a long model load
    return path


def cmd_partition(args: argparse.Namespace, cache: dict[str, Any] | None = None) -> None:
    """``teesplit partition``; ``cache`` keeps loaded models between calls (see _captured)."""
    from partitioner.api import partition
    from partitioner.policy import Policy
    from passes.audit import audit

    policy = Policy.resolve(args.policy)  # a bad policy fails before a long model load
    enclave_key = _enclave_key(args, "model" in policy.protects)
    start = time.perf_counter()
    name = Path(args.model).name
    model, rows = _captured(args.model, start, cache)
    tokenizer = _source_tokenizer(args.model)
    prior, public = None, None
    if policy.rnm is not None:
        from partitioner.token_prior import prior_from

        spec = getattr(args, "prior", None) or ("wordfreq" if tokenizer is not None else "none")
        _step(f"RNM groups against the token prior: {spec}", start)
        ratio = getattr(args, "prior_ratio", None)
        prior = prior_from(spec, tokenizer, rows, ratio)  # one count per embedding row
        public = _public_tokens(policy.rnm.public, tokenizer, rows)
    else:
        for option in ("prior", "prior_ratio"):
            value = getattr(args, option, None)
            if value is not None:
                flag = "--" + option.replace("_", "-")
                print(f"{flag} {value} is not used: policy {policy.name} has no RNM")
    _step(f"partitioning under {args.policy}", start)
    split = partition(model, policy, model_name=name, token_prior=prior, public_tokens=public)
    report = audit(split, verbose=False)
    print("\n".join(split.report().splitlines()[:2]))
    _step(f"audit passed: {len(report.rows)} cut edges; saving to {args.out}", start)
    if args.compile_enclave:
        _step("compiling the enclave stages ahead of time (AOTInductor)", start)
    split.save(
        args.out,
        tokenizer=tokenizer,
        sign_key=args.sign_key,
        compile_enclave=args.compile_enclave,
        enclave_key=enclave_key,
    )
    if enclave_key is not None:
        sealed = " and enclave/rnm.safetensors" if split.protection and split.protection.rnm else ""
        print(f"enclave/weights.safetensors{sealed} sealed under the enclave key {enclave_key}")
    if args.sign_key is None:
        print(
            "plan.json is NOT signed (no --sign-key): the enclave will refuse it unless run "
            "with --allow-unsigned"
        )
    _step("done", start)


def _public_tokens(classes: tuple[str, ...], tokenizer: Any, rows: int | None) -> Any:
    """The ids of each public token class (``rnm.public``) but ``special``, which is the
    captured program's own."""
    from partitioner.errors import PolicyError
    from partitioner.token_classes import public_tokens

    named = [c for c in classes if c != "special"]
    if named and tokenizer is None:
        raise PolicyError(f"rnm.public names {named}, which need the model's tokenizer")
    return public_tokens(tokenizer, named, rows) if named else None


def _source_tokenizer(spec: str) -> Any:
    """The model's fast tokenizer, saved into the enclave bundle (None if it has none)."""
    from partitioner.zoo import TOKENIZERS

    if spec in TOKENIZERS:
        return TOKENIZERS[spec]()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        return None


def _svg(plan: dict[str, Any]) -> str:
    """Stages as boxes in execution order, enclave green and GPU orange, with edge counts."""
    colours = {"enclave": "#7fc97f", "gpu": "#fdc086"}
    width, height, per_row = 120, 44, 10
    stages = plan["stages"]
    rows = (len(stages) + per_row - 1) // per_row
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{per_row * (width + 10) + 10}" '
        f'height="{rows * (height + 20) + 40}" font-family="sans-serif" font-size="11">',
        f'<text x="10" y="18">{html.escape(plan["model"])} under '
        f"{html.escape(plan['policy']['name'])}: {len(stages)} stages</text>",
    ]
    for i, stage in enumerate(stages):
        x = 10 + (i % per_row) * (width + 10)
        y = 30 + (i // per_row) * (height + 20)
        ops = len(stage["nodes"])
        parts.append(
            f"<g><title>{html.escape(stage['name'])}: {ops} ops, inputs "
            f"{html.escape(', '.join(stage['inputs'][:6]))}</title>"
            f'<rect x="{x}" y="{y}" width="{width}" height="{height}" rx="6" '
            f'fill="{colours[stage["side"]]}" stroke="#333"/>'
            f'<text x="{x + 6}" y="{y + 18}">{html.escape(stage["name"])}</text>'
            f'<text x="{x + 6}" y="{y + 34}">{ops} ops</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def cmd_inspect(args: argparse.Namespace) -> None:
    from partitioner.bundle import read_document
    from partitioner.errors import ArtifactError

    root = Path(args.dir)
    try:
        document = read_document(root)
    except ArtifactError as exc:
        raise SystemExit(f"teesplit: cannot read the bundle: {exc}") from None
    plan = document["plan"]
    sides = Counter(s["side"] for s in plan["stages"])
    crossing = [e for e in plan["edges"] if e["direction"] in ("enclave->gpu", "gpu->enclave")]
    print(
        f"{plan['model']} under {plan['policy']['name']!r} "
        f"(artifact schema {document['artifact_schema_version']}, "
        f"torch {document['versions']['torch']})"
    )
    print(
        f"stages: {len(plan['stages'])} ({sides['enclave']} enclave, {sides['gpu']} gpu); "
        f"cut edges: {len(crossing)}; bytes at {plan['reference_dims']}: "
        f"{plan['bytes_crossing']}"
    )
    print("protections:", dict(sorted(Counter(e["protection"] for e in crossing).items())))
    print(f"  {'stage':<12}{'side':<9}{'ops':>6}{'inputs':>8}{'outputs':>9}")
    for stage in plan["stages"]:
        print(
            f"  {stage['name']:<12}{stage['side']:<9}{len(stage['nodes']):>6}"
            f"{len(stage['inputs']):>8}{len(stage['outputs']):>9}"
        )
    if args.svg:
        svg = Path(args.svg)
        svg.write_text(_svg(plan))
    else:  # inside the bundle: never through a link planted there
        from partitioner.bundle import write_inside

        svg = write_inside(root, "stages.svg", _svg(plan).encode())
    print(f"drawing: {svg}")


def cmd_serve_gpu(args: argparse.Namespace) -> None:
    from runtime.__main__ import main as worker_main

    worker_main(
        [args.bundle, "--listen", args.listen, "--backend", args.backend, "--device", args.device]
    )


def cmd_export_triton(args: argparse.Namespace) -> None:
    from partitioner.triton_repo import export_repository

    written = export_repository(
        args.bundle,
        args.out,
        trusted_key=args.trusted_key,
        idle_us=round(args.idle_seconds * 1_000_000),
    )
    for stage, path in written.items():
        print(f"{stage}: {path}")
    print(f"Triton model repository: {args.out} ({len(written)} models, onnxruntime backend)")


def _read_plan(directory: str | Path, trusted_key: str | None = None) -> dict[str, Any]:
    """The bundle's plan, one line on failure; with ``trusted_key``, only if that key signed
    it (checked before the plan is parsed)."""
    from partitioner.bundle import read_document
    from partitioner.errors import ArtifactError
    from partitioner.signing import load_public_key

    key = None
    if trusted_key is not None:
        try:
            key = load_public_key(trusted_key)
        except ArtifactError as exc:
            raise SystemExit(f"teesplit run: --trusted-key: {exc}") from None
    try:
        return read_document(Path(directory), trusted_key=key)["plan"]
    except ArtifactError as exc:
        why = "teesplit run: refused" if key is not None else "teesplit: cannot read the bundle"
        raise SystemExit(f"{why}: {exc}") from None


def cmd_keygen(args: argparse.Namespace) -> None:
    from partitioner.signing import generate_keypair

    private, public = generate_keypair(args.out)
    print(f"signing key: {private} (keep it secret); public key for --trusted-key: {public}")


def _verification(args: argparse.Namespace) -> list[str]:
    if args.trusted_key is not None:
        return ["--trusted-key", args.trusted_key]
    return ["--allow-unsigned"] if args.allow_unsigned else []


def cmd_enclave(args: argparse.Namespace) -> None:
    from enclave_runtime.__main__ import main as enclave_main

    argv = [args.bundle, "--worker", args.worker, "--max-new-tokens", str(args.max_new_tokens)]
    argv += _verification(args)
    argv += ["--timeout", str(args.timeout)]
    enclave_main(argv)


def _worker_address(tcp: bool) -> str:
    """A free local address: TCP when Gramine runs the driver (it cannot reach a host Unix
    socket), else a private Unix socket."""
    import socket
    import tempfile

    if tcp:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{probe.getsockname()[1]}"
    return f"unix:{Path(tempfile.mkdtemp(prefix='teesplit-')) / 'worker.sock'}"


def _run_both(
    bundle: Path,
    prompts: list[str],
    max_new_tokens: int,
    worker: str | None,
    trusted_key: str | None,
    allow_unsigned: bool,
) -> None:
    """Start the worker (unless ``worker`` names one) and the enclave driver through the
    launcher, send the prompts, and relay the driver's answers."""
    import subprocess

    from enclave_runtime.driver import spawn_worker
    from enclave_runtime.launcher import enclave_command
    from enclave_runtime.manifest import gramine_runner

    start = time.perf_counter()
    runner = gramine_runner()
    proc = None
    if worker is None:
        worker = _worker_address(tcp=runner is not None)
        proc, banner = spawn_worker(bundle / "gpu", worker)
        _step(banner, start)
    try:
        launch = enclave_command(
            bundle,
            worker,
            ["--max-new-tokens", str(max_new_tokens)],
            runner=runner,
            trusted_key=trusted_key,
            allow_unsigned=allow_unsigned,
        )
        _step(launch.mode, start)
        enclave = subprocess.run(
            launch.argv,
            cwd=launch.cwd,
            env=launch.env,
            input="\n".join(prompts) + "\n",
            text=True,
            stdout=sys.stdout,
            stderr=subprocess.PIPE,
        )
        if enclave.returncode != 0:
            raise SystemExit(f"teesplit: the enclave driver failed:\n{enclave.stderr[-2000:]}")
        for line in enclave.stderr.splitlines():  # the driver's warnings, e.g. an opt-out
            if "WARNING" in line:
                print(line, file=sys.stderr)
        _step("done", start)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def cmd_run(args: argparse.Namespace) -> None:
    if args.ids:
        prompts = [f"ids: {args.ids}"]
    elif args.prompt is not None:
        if not args.prompt.strip() or "\n" in args.prompt:
            raise SystemExit("teesplit run: --prompt must be one non-empty line of text")
        prompts = [args.prompt]
    else:
        raise SystemExit("teesplit run: give --prompt TEXT or --ids 1,2,3")
    if args.trusted_key is None and not args.allow_unsigned:
        raise SystemExit("teesplit run: give --trusted-key PUB (or --allow-unsigned)")
    # the enclave checks the signature too: this refuses before anything is started
    _read_plan(args.dir, args.trusted_key)
    _run_both(
        Path(args.dir),
        prompts,
        args.max_new_tokens,
        args.worker,
        args.trusted_key,
        args.allow_unsigned,
    )


DEMO_PROMPT = "What is the capital of France?"


def _demo_bundle(
    out: Path,
    policy: str,
    key: Path,
    public: Path,
    cache: dict[str, Any] | None = None,
    enclave_key: Path | None = None,
) -> None:
    """SmolLM2 partitioned under ``policy`` into ``out``, signed with the demo's key (and,
    for a policy that protects the model, sealed with ``enclave_key``), unless ``out`` holds
    that already."""
    from partitioner.bundle import read_document
    from partitioner.errors import ArtifactError

    try:
        plan = read_document(out, trusted_key=public)["plan"]
        rnm = (plan.get("protection") or {}).get("rnm") or {}
        fresh = (
            plan["policy"]["name"] != policy
            or plan["model"] != "smollm2-135m"
            or (rnm and rnm.get("grouping", {}).get("method") != "strata")  # before issue 16
        )
    except ArtifactError:
        fresh = True
    if fresh:
        log = out.with_name(f"{out.name}-partition.log")
        print(
            f"partitioning SmolLM2-135M under {policy} (once; reused afterwards; log: {log}) ...",
            flush=True,
        )
        with _quiet(log):  # the report is `teesplit inspect`'s; the libraries' noise the log's
            command = ["partition", "smollm2-135m", "--policy", policy, "--out", str(out)]
            command += ["--sign-key", str(key)]
            if enclave_key is not None and _protects_model(policy):
                command += ["--enclave-key", str(enclave_key)]
            cmd_partition(_parser().parse_args(command), cache)


def _protects_model(policy: str) -> bool:
    from partitioner.policy import Policy

    return "model" in Policy.resolve(policy).protects


@contextlib.contextmanager
def _quiet(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to ``log`` meanwhile, at the file-descriptor
    level: progress bars, C++ and logging handlers write there, not only ``sys.stdout``."""
    import os
    import warnings

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with log.open("w") as sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


DEMO_POLICIES = {
    "cmif": "RNM on the prompt's words, then the GPU computes in the clear",
    "slalom": "exact masks: the GPU sees uniformly random values; Freivalds checks its work",
}


def cmd_demo(args: argparse.Namespace) -> None:
    """Partition SmolLM2 under each demo policy (once; the bundles are reused), serve each
    bundle (GPU worker + OpenAI-compatible server in the enclave process), and ask the same
    question through the ``openai`` client, streaming the answer."""
    from partitioner import sealing
    from partitioner.deploy import local_deployment
    from partitioner.signing import generate_keypair

    try:
        import openai
    except ImportError:
        raise SystemExit("teesplit demo needs the openai client: pip install openai") from None
    root = Path(args.out)
    key = root.with_name(root.name + "-signing-key")  # the demo's own compiler key
    public = key.with_name(key.name + ".pub")
    if not key.exists():
        generate_keypair(key)
    # a policy that protects the model has its weights sealed under the demo's enclave key,
    # which its enclave process is then given ($TEESPLIT_ENCLAVE_KEY)
    enclave_key = root.with_name(root.name + "-enclave-key")
    policies = args.policies or list(DEMO_POLICIES)
    loaded: dict[str, Any] = {}  # SmolLM2 loaded and captured once for both bundles
    for policy in policies:
        _demo_bundle(root / policy, policy, key, public, loaded, enclave_key)
    loaded.clear()  # the bundles are saved: the model is not needed in this process
    print(f"question: {args.prompt}")
    for policy in policies:
        print(f"\n{policy}: {DEMO_POLICIES.get(policy, 'policy ' + policy)}", flush=True)
        log = root / f"{policy}-serve.log"
        os.environ.pop(sealing.ENV, None)
        if _protects_model(policy):
            os.environ[sealing.ENV] = str(enclave_key)
        with local_deployment(root / policy, trusted_key=str(public), log=log) as deployed:
            client = openai.OpenAI(
                base_url=deployed.url, api_key="local", max_retries=0, timeout=600
            )
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": args.prompt}],
                max_tokens=args.max_new_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            print("  answer: ", end="", flush=True)
            account, used = {}, None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content.replace("\n", " "), end="", flush=True)
                account = (chunk.model_extra or {}).get("teesplit", account)
                used = chunk.usage or used
            seconds = time.perf_counter() - start
        tokens = used.completion_tokens if used is not None else 0
        up, down = account.get("bytes_to_gpu", 0), account.get("bytes_from_gpu", 0)
        print(
            f"\n  ε spent: {account.get('epsilon', 0.0):g}; bytes to the GPU {_size(up)}, "
            f"back {_size(down)}; {tokens} tokens in {seconds:.1f} s (logs: {log})",
            flush=True,
        )


def ratio(text: str) -> float:
    """A strata ratio: a finite number above 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 1")
    return value


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _add_verification(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--trusted-key", default=None, help="the compiler's Ed25519 public key")
    group.add_argument(
        "--allow-unsigned", action="store_true", help="run an unsigned bundle (development only)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # its options are defined once, by enclave_runtime.server
        from enclave_runtime.server import main as serve_main

        serve_main(argv[1:])
        return
    args = _parser().parse_args(argv)
    from partitioner.errors import TeesplitError

    try:
        args.func(args)
    except TeesplitError as exc:  # typed errors name what is at fault; no traceback needed
        raise SystemExit(f"teesplit {args.command}: {type(exc).__name__}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    """The command line; the demo parses its own partition command with it, so that it gets
    every option's default."""
    from enclave_runtime.__main__ import positive_int, seconds

    parser = argparse.ArgumentParser(prog="teesplit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("partition", help="partition a model and save its split artifacts")
    p.add_argument("model")
    p.add_argument("--policy", default="secureinfer", help="a preset or a .yaml/.json file")
    p.add_argument("--out", required=True)
    p.add_argument("--sign-key", default=None, help="Ed25519 private key (teesplit keygen)")
    seal = p.add_mutually_exclusive_group()
    seal.add_argument(
        "--enclave-key",
        default=None,
        help="seal enclave/weights.safetensors (and enclave/rnm.safetensors, under RNM) under "
        "the AES key in this file (made if missing); the enclave loads them with "
        "$TEESPLIT_ENCLAVE_KEY naming the file",
    )
    seal.add_argument(
        "--plaintext-enclave",
        action="store_true",
        help="write a protected model's weights to enclave/ in the clear (whoever reads the "
        "enclave host's disk reads them)",
    )
    p.add_argument(
        "--compile-enclave",
        nargs="?",
        const="stages",
        choices=["stages", "step"],
        default=False,
        help="compile the enclave stages ahead of time into enclave/aot/ (stages: one shared "
        "object per distinct stage graph; step: an exactly masked program as one library "
        "calling back for its GPU stages, ~17 min for SmolLM2, else as stages); the enclave "
        "loads them instead of running op by op",
    )
    p.add_argument(
        "--prior",
        default=None,
        help="what RNM's groups are built against: wordfreq (the default with a tokenizer), "
        "a text corpus file (one text per line, like the traffic served), or none (cosine "
        "groups only: the group may give its most frequent word away)",
    )
    p.add_argument(
        "--prior-ratio",
        type=ratio,
        default=None,
        help="the most two members of a frequency stratum may differ in prior count (> 1; "
        "default 8: see benchmarks/README.md)",
    )
    p.set_defaults(func=cmd_partition)
    p = sub.add_parser("keygen", help="make an Ed25519 key pair to sign bundles with")
    p.add_argument("--out", required=True, help="private key path; the public key gets .pub")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("inspect", help="summarise a saved split and draw its stages")
    p.add_argument("dir")
    p.add_argument(
        "--svg", default=None, help="where to write the drawing (default DIR/stages.svg)"
    )
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("serve-gpu", help="serve a bundle's GPU stages")
    p.add_argument("bundle")
    p.add_argument("--listen", required=True)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve_gpu)
    p = sub.add_parser(
        "export-triton", help="write the GPU stages as a Triton Inference Server model repository"
    )
    p.add_argument("bundle", help="DIR/gpu (or DIR) of a saved split program")
    p.add_argument("--out", required=True, help="the model repository to write into")
    p.add_argument("--trusted-key", default=None, help="also check plan.json's signature")
    p.add_argument(
        "--idle-seconds", type=seconds, default=60.0, help="drop an idle session's state after"
    )
    p.set_defaults(func=cmd_export_triton)
    p = sub.add_parser("enclave", help="the enclave driver: answers prompts read from stdin")
    p.add_argument("bundle", help="DIR or DIR/enclave of a saved decoder step")
    p.add_argument("--worker", required=True, help="the GPU worker (unix:/path or host:port)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds per worker call")
    _add_verification(p)
    p.set_defaults(func=cmd_enclave)
    # listed here; `teesplit serve ...` is handed to the server's own parser above
    sub.add_parser(
        "serve", help="the enclave side as an OpenAI-compatible HTTP server (teesplit serve -h)"
    )
    p = sub.add_parser("demo", help="SmolLM2 served under cmif and slalom, asked one question")
    p.add_argument("--out", default="build/demo-smollm2")
    p.add_argument("--policies", nargs="+", default=None, help="default: cmif slalom")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("run", help="run a prompt through both processes locally")
    p.add_argument("dir")
    p.add_argument("--prompt", default=None)
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of a prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--worker", default=None, help="an already running worker's address")
    _add_verification(p)
    p.set_defaults(func=cmd_run)
    return parser


if __name__ == "__main__":
    sys.exit(main())
