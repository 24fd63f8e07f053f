"""Scale-out (issue 13, item 6): two GPU workers behind nginx hashing the session id, several
concurrent enclave sessions, one worker killed mid-run.

Runs the scenario of ``examples/scale_out.py`` (what ``make scale-out`` shows) on the tiny
Llama's cmif bundle, whose GPU stage holds each session's KV cache in its worker, and checks
what it observed against the in-process program: every token reached the worker that holds
its session's cache (the workers' statistics, nginx's access log and the hash agree), the
sessions on the killed worker end with ``WorkerError`` and nothing hangs, the others finish
with the in-process tokens. Skipped only where nginx is not installed.
"""

import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRUSTED, partition_step_for_tests, shared_step_bundle

from enclave_runtime.driver import WorkerError
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from runtime import balancer

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")
needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None,
    reason="nginx is not on PATH (Debian: apt-get install nginx-light; `make` installs it)",
)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "scale_out.py"


def example():
    """examples/scale_out.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("scale_out", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cmif():
    return partition_step_for_tests("cmif")


@pytest.fixture(scope="module")
def cmif_bundle(cmif, tmp_path_factory):
    return shared_step_bundle(tmp_path_factory, "cmif")


@needs_nginx
def test_two_workers_behind_a_load_balancer_with_a_worker_killed_mid_run(
    cmif, cmif_bundle, tmp_path
):
    scale = example()
    new, first = 6, 2
    outcome = scale.scenario(
        cmif_bundle,
        tmp_path,
        trusted_key=TRUSTED,
        sessions=4,
        workers=2,
        new_tokens=new,
        first=first,
        kill=0,
        timeout=20.0,
    )
    references = [
        generate(Executor(cmif.spec, seed=s.seed), s.prompt, max_new_tokens=new)
        for s in outcome.sessions
    ]
    assert outcome.hung == []
    on = {w: [s for s in outcome.sessions if s.worker == w] for w in (0, 1)}
    assert len(on[0]) == len(on[1]) == 2  # every session attributed, both workers used
    for s, want in zip(outcome.sessions, references, strict=True):
        tokens = want[0, s.prompt.shape[1] :].tolist()
        # the worker whose statistics grew is the one nginx hashed the id to and logged
        assert s.worker == s.predicted, s
        assert outcome.routes[s.id] == [outcome.workers[s.worker]], outcome.routes
        assert s.tokens[:first] == tokens[:first]  # equal to the reference until the kill
        if s.worker == outcome.killed:
            assert isinstance(s.error, WorkerError), repr(s.error)
            assert s.result is None and len(s.tokens) == first  # nothing decoded after it
        else:
            assert s.error is None, repr(s.error)
            assert torch.equal(s.result, want)
    # each worker counted exactly its sessions' calls: before the kill, and (the survivor)
    # at the end, when its sessions had gone on after the other worker died
    assert outcome.calls_at_kill == [sum(s.calls_at_pause for s in on[w]) for w in (0, 1)]
    assert min(outcome.calls_at_kill) > 0
    assert outcome.calls_at_end[0] is None
    assert outcome.calls_at_end[1] == sum(s.calls for s in on[1]) > outcome.calls_at_kill[1]
    assert scale.problems(outcome, references) == []


def test_upstream_for_spreads_ids_over_the_ring():
    workers = ["unix:/run/teesplit/w0.sock", "unix:/run/teesplit/w1.sock", "10.0.0.7:8001"]
    picks = [balancer.upstream_for(f"{i:016x}", workers) for i in range(600)]
    assert {w: picks.count(w) for w in range(3)} == {
        w: pytest.approx(200, abs=80) for w in range(3)
    }
    # consistent: removing a worker moves only the ids that were on it
    rest = [balancer.upstream_for(f"{i:016x}", workers[:2]) for i in range(600)]
    assert all(r == p for r, p in zip(rest, picks, strict=True) if p != 2)


def test_a_configuration_that_would_break_out_of_its_directive_is_refused(tmp_path):
    with pytest.raises(balancer.BalancerError, match=r"cannot be written into nginx\.conf"):
        balancer.render(["unix:/tmp/w.sock; include /etc/passwd"], "127.0.0.1:1", tmp_path)
    with pytest.raises(balancer.BalancerError, match="not on PATH"):
        balancer.start(["unix:/tmp/w.sock"], tmp_path, nginx="no-such-nginx")


@needs_nginx
def test_nginx_that_cannot_listen_is_a_one_line_typed_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(balancer.BalancerError, match="nginx did not start") as error:
            balancer.start([f"unix:{tmp_path / 'w.sock'}"], tmp_path / "nginx", port=port)
    assert "in use" in str(error.value) and "\n" not in str(error.value)
