"""A hostile client's requests (issue 10): each is refused with a typed error naming the fault,
and the driver goes on serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import captured, partition_step_for_tests, shared_step_bundle

from enclave_runtime.generation import generate
from partitioner.api import partition
from partitioner.errors import InputError
from runtime.worker import GPUWorker, serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def step():
    return partition_step_for_tests("cmif")


@pytest.fixture(scope="module")
def saved(step, tmp_path_factory):
    """``step`` saved and signed once (an ONNX export per GPU stage): the tests below read it
    (a worker, the enclave driver) and write nothing into it."""
    return shared_step_bundle(tmp_path_factory, "cmif")


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([[5, -1, 7]]), "outside the vocabulary"),
        (torch.tensor([[5, 10**6, 7]]), "outside the vocabulary"),
        (torch.tensor([[5.0, 6.0]]), "integer token ids"),
        (torch.zeros(1, 0, dtype=torch.int64), "outside the range"),
    ],
)
def test_bad_token_inputs_are_refused(ids, message):
    sp = partition(captured("tiny-llama"), "cmif", seed=3)
    with torch.no_grad(), pytest.raises(InputError, match=message):
        sp(input_ids=ids)


def test_generation_refuses_empty_and_too_long_requests(step):
    with pytest.raises(InputError, match="the prompt is empty"):
        generate(step, torch.zeros(1, 0, dtype=torch.int64), max_new_tokens=2)
    context = step.spec.dim_ranges["past"][1]
    with pytest.raises(InputError, match=f"exceeds the model's context of {context}"):
        generate(step, torch.tensor([[5, 6, 7]]), max_new_tokens=context)
    with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
        generate(step, torch.tensor([[5, 6, 7]]), max_new_tokens=0)


def test_the_enclave_driver_answers_bad_lines_with_errors_and_goes_on(saved, tmp_path):
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(saved / "gpu", device="cpu"), address)
    lines = b"ids: 5,6,x\n\xff\xfe not utf-8\nids: 5,-3\nids: 5,6,7\n"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "enclave_runtime", str(saved), "--worker", address,
             "--allow-unsigned", "--max-new-tokens", "2"],
            input=lines, capture_output=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
    out = run.stdout.decode()
    assert "error: prompt line 1: 'ids:' must be followed by comma-separated integers" in out
    assert "error: prompt line 2: prompt line 2 is not UTF-8 text" in out
    assert "error: prompt line 3:" in out and "outside the vocabulary" in out
    assert "answer: [" in out  # line 4 is served
    assert run.returncode != 0 and "3 prompts refused" in run.stderr.decode()
    assert "Traceback" not in run.stderr.decode()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--worker", "127.0.0.1:99999"], "port in 0..65535"),
        (["--worker", "unix:/nonexistent/w.sock", "--timeout", "-1"], "not in (0, 86400]"),
        (["--worker", "unix:/nonexistent/w.sock", "--max-new-tokens", "0"], "positive integer"),
    ],
)
def test_bad_driver_options_are_one_line_errors(saved, argv, message):
    run = subprocess.run(
        [sys.executable, "-m", "enclave_runtime", str(saved), "--allow-unsigned", *argv],
        capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and message in run.stderr
    assert "Traceback" not in run.stderr


def test_the_worker_refuses_sizes_outside_the_programs_range(step, saved, tmp_path):
    """Found by the red team: 'extends' frames grew a held cache to past = 442,369 (the plan
    allows 128) and the worker's memory by 1 GB."""
    from enclave_runtime.driver import WorkerClient, WorkerError
    from partitioner.dims import concrete_shape

    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(saved / "gpu", device="cpu"), address)
    try:
        stage = next(s for s in step.stages if s.side == "gpu")
        edges = {e.name: e for e in step.edges if e.consumer == stage.name}
        context = step.spec.dim_ranges["past"][1]
        binding = {"batch": 1, "seq": 1, "past": context + 1}
        tensors = [
            torch.zeros(
                concrete_shape(edges[n].shape, binding), dtype=getattr(torch, edges[n].dtype)
            )
            for n in stage.inputs
        ]
        with pytest.raises(WorkerError, match=f"past = {context + 1} is outside"):
            WorkerClient(address, inputs={stage.name: stage.inputs}).run(stage.name, tensors)
    finally:
        server.shutdown()


def test_a_call_whose_inputs_disagree_on_a_size_is_refused(step):
    """Every input that names a dim must give it one value: a cache one position shorter than
    the others (a client's bookkeeping gone wrong, or a hostile one) is refused by name before
    any stage runs, not left to whichever stage reads it first (a compiled stage reads only
    the sizes of some caches, and would build its positions from the wrong one)."""
    ids = torch.tensor([[5, 6, 7]])
    whole = torch.zeros(1, 1, dtype=torch.long)
    names = list(step.spec.input_dims)
    past = [n for n in names if n.startswith("past_")]
    layers = len(past)
    empty = [
        torch.zeros(1, *step.spec.input_dims[n][1:2], 0, step.spec.input_dims[n][3]) for n in past
    ]
    with torch.no_grad():
        cache = list(step(ids, whole, empty)[1:])
    assert len(cache) == layers
    short = list(cache)
    short[3] = cache[3][:, :, 1:]
    with torch.no_grad(), pytest.raises(InputError, match=f"{past[3]}.*past = 2.*past = 3"):
        step(torch.tensor([[8]]), whole, short)
