"""Bundles compiled on one host, served by the GPU worker on another host's CUDA.

A deployment compiles on the development machine (the pinned torch, CPU build) and ships the
signed bundle to a GPU host, whose torch is whatever its image holds. Two steps:

* ``python benchmarks/cuda_worker.py make DIR`` (here): the tiny Llama's decoder step
  partitioned under ``slalom`` (exact masking) and ``cmif`` (float, the cache held on the GPU),
  each saved and signed under ``DIR``, with what the in-process executor gives for them (same
  seeds): 8 greedily generated tokens, and for ``slalom`` the logits of a prefill and three
  decode steps.
* ``python3 benchmarks/cuda_worker.py check DIR [--device cuda] [--out FILE]`` (on the GPU
  host): per bundle, our worker as a process (``python -m runtime DIR/<preset> --device
  cuda``), the enclave side in this process connected over the worker's KServe v2 gRPC socket
  with the bundle's signature checked; the same calls, compared: exact masking bit for bit,
  tokens identical. Prints a line per comparison, writes a JSON report, exits 1 on a mismatch.

The tiny model keeps the bundles small (a few MB travel); what is checked is the path, not
the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = ("slalom", "cmif")
SEED, STEPS, NEW_TOKENS = 11, 4, 8
IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


def _calls(executor: Any, steps: int) -> list[torch.Tensor]:
    """The logits of a prefill of :data:`IDS` and ``steps - 1`` greedy decode steps."""
    dims = executor.spec.input_dims
    cache = [torch.zeros(1, dims[n][1], 0, dims[n][3]) for n in dims if str(n).startswith("past_")]
    whole = torch.zeros(1, 1, dtype=torch.long)
    ids, logits = IDS, []
    with torch.no_grad():
        for _ in range(steps):
            out = executor(ids, whole, cache)
            logits.append(out[0])
            cache, ids = list(out[1:]), out[0][:, -1:].argmax(-1)
    return logits


def make(folder: Path) -> None:
    from enclave_runtime.executor import Executor, InProcessRunner
    from enclave_runtime.generation import generate
    from partitioner.api import partition
    from partitioner.bundle import load_program
    from partitioner.generation import capture_decoder
    from partitioner.signing import generate_keypair
    from tests.models import tiny_llama

    folder.mkdir(parents=True, exist_ok=False)
    private, public = generate_keypair(folder / "compiler.key")
    step = capture_decoder(tiny_llama())
    expected: dict[str, Any] = {"torch": str(torch.__version__)}
    for preset in PRESETS:
        partition(step, preset, seed=3).save(folder / preset, sign_key=private)
        plan = load_program(folder / preset, trusted_key=public)
        expected[f"{preset}:tokens"] = generate(
            Executor(plan, InProcessRunner(plan), seed=SEED), IDS, max_new_tokens=NEW_TOKENS
        )
        if preset == "slalom":  # exact: the logits too, bit for bit
            expected[f"{preset}:logits"] = _calls(
                Executor(plan, InProcessRunner(plan), seed=SEED), STEPS
            )
    torch.save(expected, folder / "expected.pt")
    print(f"bundles and expected outputs in {folder} (torch {torch.__version__})")


def _worker(bundle: Path, device: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Our GPU worker serving ``bundle`` as a process, once its socket is there."""
    sock = f"/tmp/teesplit-worker-{bundle.name}-{os.getpid()}.sock"
    command = [sys.executable, "-m", "runtime", str(bundle), "--listen", f"unix:{sock}"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    worker = subprocess.Popen(
        [*command, "--device", device],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(sock) and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker, f"unix:{sock}"


def check(folder: Path, device: str, out: Path) -> bool:
    from enclave_runtime.driver import connect
    from enclave_runtime.generation import generate

    expected = torch.load(folder / "expected.pt")
    public = folder / "compiler.key.pub"
    report: dict[str, Any] = {
        "torch": str(torch.__version__),
        "compiled_with": expected["torch"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "rows": [],
    }
    print(f"torch {report['torch']} (bundles from {report['compiled_with']}), {report['device']}")
    for preset in PRESETS:
        worker, address = _worker(folder / preset, device, out.with_name(f"worker-{preset}.log"))
        try:
            tokens = generate(
                connect(folder / preset, address, trusted_key=public, seed=SEED),
                IDS,
                max_new_tokens=NEW_TOKENS,
            )
            rows = [("tokens", torch.equal(tokens, expected[f"{preset}:tokens"]), 0.0)]
            want = expected.get(f"{preset}:logits", [])
            if want:
                executor = connect(folder / preset, address, trusted_key=public, seed=SEED)
                for i, (got, w) in enumerate(zip(_calls(executor, STEPS), want, strict=True)):
                    rows.append(
                        (f"logits, call {i}", torch.equal(got, w), float((got - w).abs().max()))
                    )
        finally:
            worker.terminate()
            worker.wait(10)
        for what, same, diff in rows:
            print(f"{preset} {what}: identical {same} (max |d| {diff:.1e})")
            report["rows"].append(
                {"preset": preset, "what": what, "identical": same, "max_abs_diff": diff}
            )
    out.write_text(json.dumps(report, indent=1) + "\n")
    return all(row["identical"] for row in report["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["make", "check"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cuda", help="the worker's device (check)")
    parser.add_argument("--out", type=Path, default=None, help="the report (check)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.step == "make":
        make(args.folder)
        return
    ok = check(args.folder, args.device, args.out or args.folder / "cuda_worker.json")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
