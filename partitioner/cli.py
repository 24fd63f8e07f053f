"""``teesplit``: partition a model into split artifacts, inspect them, serve the GPU side.

    teesplit partition MODEL --policy P --out DIR   # MODEL: a built-in name or a local HF folder
    teesplit inspect DIR [--svg FILE]               # the plan, and a drawing of the stages
    teesplit serve-gpu DIR/gpu --listen ADDR        # the GPU worker (unix:/path or host:port)

    teesplit run DIR --prompt TEXT                  # both processes locally, greedy decoding

``run`` starts a GPU worker process on a private Unix socket (unless ``--worker`` names one),
drives it from this process and decodes greedily by recomputing the prefix: there is no KV cache
yet (issue #4), so long answers are slow. Not yet: ``enclave`` and ``demo``.
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def _step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


def _load_model(spec: str) -> Any:
    from partitioner.models import BUILTIN

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


def cmd_partition(args: argparse.Namespace) -> None:
    from partitioner.api import partition
    from passes.audit import audit

    start = time.perf_counter()
    _step(f"loading {args.model}", start)
    model = _load_model(args.model)
    _step(f"capturing and partitioning under {args.policy}", start)
    split = partition(model, args.policy, model_name=Path(args.model).name)
    report = audit(split, verbose=False)
    print("\n".join(split.report().splitlines()[:2]))
    _step(f"audit passed: {len(report.rows)} cut edges; saving to {args.out}", start)
    split.save(args.out)
    _step("done", start)


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
    from partitioner.artifacts import read_document
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
    svg = Path(args.svg) if args.svg else root / "stages.svg"
    svg.write_text(_svg(plan))
    print(f"drawing: {svg}")


def cmd_serve_gpu(args: argparse.Namespace) -> None:
    from runtime.worker import GPUWorker, serve

    worker = GPUWorker(args.bundle, backend=args.backend, device=args.device)
    server = serve(worker, args.listen)
    print(
        f"teesplit GPU worker: {len(worker.stages)} stages on {args.listen} "
        f"({args.backend}, {worker.device})",
        flush=True,
    )
    server.serve_forever()


def _tokenizer(spec: str) -> Any:
    from partitioner import models

    builtin = {"smollm2-135m": models.smollm2_tokenizer, "minilm": models.minilm_tokenizer}
    if spec in builtin:
        return builtin[spec]()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"teesplit: no tokenizer for {spec!r} ({exc}); pass --ids") from None


def cmd_run(args: argparse.Namespace) -> None:
    import subprocess
    import tempfile

    import torch

    from enclave_runtime.driver import connect

    start = time.perf_counter()
    from partitioner.artifacts import read_document

    plan = read_document(Path(args.dir))["plan"]
    tokenizer = None
    if args.ids:
        ids = torch.tensor([[int(x) for x in args.ids.split(",")]])
    elif args.prompt is not None:
        tokenizer = _tokenizer(args.tokenizer or plan["model"])
        chat = [{"role": "user", "content": args.prompt}]
        text = (
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            if getattr(tokenizer, "chat_template", None)
            else args.prompt
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        raise SystemExit("teesplit run: give --prompt TEXT or --ids 1,2,3")
    worker, proc = args.worker, None
    if worker is None:
        socket_path = Path(tempfile.mkdtemp(prefix="teesplit-")) / "worker.sock"
        worker = f"unix:{socket_path}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", str(Path(args.dir) / "gpu"), "--listen", worker],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = proc.stdout.readline()
        if "teesplit GPU worker" not in line:
            raise SystemExit(f"teesplit run: the GPU worker did not start ({line.strip()!r})")
        _step(line.strip(), start)
    try:
        program = connect(args.dir, worker)
        _step(f"enclave side loaded from {args.dir}; decoding", start)
        prompt_len = ids.shape[1]
        eos = getattr(tokenizer, "eos_token_id", None)
        with torch.no_grad():
            for _ in range(args.max_new_tokens):
                logits = program(input_ids=ids).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                if eos is not None and ids[0, -1].item() == eos:
                    break
        new = ids[0, prompt_len:].tolist()
        answer = tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new
        print(f"answer: {answer!r}")
        print(
            f"{len(new)} tokens; crossed to the GPU worker {program.worker.bytes_sent:,} B, "
            f"back {program.worker.bytes_received:,} B"
        )
        _step("done", start)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="teesplit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("partition", help="partition a model and save its split artifacts")
    p.add_argument("model")
    p.add_argument("--policy", default="secureinfer", help="a preset or a .yaml/.json file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_partition)
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
    p = sub.add_parser("run", help="run a prompt through both processes locally")
    p.add_argument("dir")
    p.add_argument("--prompt", default=None)
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of a prompt")
    p.add_argument("--tokenizer", default=None, help="built-in name or local folder")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--worker", default=None, help="an already running worker's address")
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
