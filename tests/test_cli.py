"""The ``teesplit`` command: partition -> inspect, and clear errors for bad arguments.

Partitioning is the slow part (a capture and an ONNX export per bundle), so the commands that
only read a bundle share one, made by the command line itself (``signed_cmif``); the tests
that change it work on a copy.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import built

from partitioner import cli
from partitioner.signing import load_private_key, sign

ROOT = Path(__file__).resolve().parent.parent


def teesplit(*args):
    return subprocess.run(
        [sys.executable, "-m", "partitioner.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def teesplit_here(capsys, *args):
    """The command in this process (no interpreter start-up): (exit code, stdout, stderr).
    An exception other than the command's own exit fails the test, as a traceback would."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a typed error: main's one line
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The tiny Llama as a local transformers folder: the CLI's built-in names are real models.

    The folder's name, ``tiny-llama``, is the model's name in the plan.
    """
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    built("tiny-llama").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def signed_cmif(tmp_path_factory, tiny_llama, key_files):
    """A cmif bundle the command line partitioned and signed with ``key_files``; its stdout."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    made = teesplit(
        "partition", tiny_llama, "--policy", "cmif", "--out", str(out),
        "--sign-key", str(key_files[0]),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    return out, made.stdout


def test_partition_then_inspect(tmp_path, tiny_llama, signed_cmif, capsys):
    """An unsigned partition says so and signs nothing (all_enclave: no GPU stage to export,
    in this process); ``inspect`` draws the signed cmif bundle's stages, both sides."""
    out, key = tmp_path / "bundle", tmp_path / "enclave.key"
    code, stdout, err = teesplit_here(
        capsys, "partition", tiny_llama, "--policy", "all_enclave", "--out", str(out),
        "--enclave-key", str(key),
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert "audit passed" in stdout and "done" in stdout
    assert "NOT signed" in stdout  # no --sign-key: it says so, and signs nothing
    assert not (out / "plan.json.sig").exists() and (out / "plan.json").is_file()
    # all_enclave protects the model: its weights sealed under a key made for it
    assert "made a new enclave key" in stdout and len(key.read_bytes()) == 32
    assert json.loads((out / "plan.json").read_text())["sealed"]["files"] == [
        "enclave/weights.safetensors"
    ]
    bundle = tmp_path / "cmif"
    shutil.copytree(signed_cmif[0], bundle)  # inspect writes stages.svg into it
    assert list((bundle / "gpu" / "stages").glob("*.onnx"))
    code, stdout, err = teesplit_here(capsys, "inspect", str(bundle))
    assert code == 0, err[-2000:]
    assert "tiny-llama under 'cmif'" in stdout and "protections:" in stdout
    svg = (bundle / "stages.svg").read_text()
    stages = json.loads((bundle / "plan.json").read_text())["plan"]["stages"]
    assert svg.startswith("<svg") and svg.count("<rect") == len(stages)
    assert "#fdc086" in svg and "#7fc97f" in svg  # GPU and enclave stages both drawn


def test_a_protected_model_is_not_written_in_the_clear_unless_asked(tmp_path, capsys):
    """A policy that protects the model must seal its weights or say it will not: refused,
    in one line, before the model is read."""
    code, _, err = teesplit_here(
        capsys, "partition", "no-such-model", "--policy", "all_enclave", "--out", "x"
    )
    assert code != 0 and "--enclave-key" in err and "no-such-model" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = teesplit_here(
        capsys, "partition", "m", "--policy", "all_enclave", "--out", "x",
        "--enclave-key", str(tmp_path / "x.key"), "--plaintext-enclave",
    )  # fmt: skip
    assert code == 2 and "not allowed with" in err


def test_unknown_model_and_missing_bundle_are_named(tmp_path, capsys):
    run = teesplit(
        "partition", "no-such-model", "--out", str(tmp_path / "x"), "--plaintext-enclave"
    )
    assert run.returncode != 0 and "MODEL 'no-such-model' is neither a built-in" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    code, _, err = teesplit_here(capsys, "inspect", str(tmp_path / "nothing"))
    assert code != 0 and "cannot read" in err
    for bad in ("nan", "inf", "1", "0.5", "two"):  # refused before any model is read
        code, _, err = teesplit_here(
            capsys, "partition", "no-such-model", "--prior-ratio", bad, "--out", "x"
        )
        assert code == 2 and "--prior-ratio" in err, bad
        assert "no-such-model" not in err


def test_run_drives_a_worker_and_an_enclave_process(tmp_path, signed_cmif, key_files):
    out, made = tmp_path / "bundle", signed_cmif[1]
    shutil.copytree(signed_cmif[0], out)  # with Gramine on the PATH, run writes gramine/ here
    assert "capturing the KV-cache decoder step" in made
    run = teesplit(
        "run",
        str(out),
        "--ids",
        "5,6,7,8",
        "--max-new-tokens",
        "3",
        "--trusted-key",
        str(key_files[1]),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "teesplit GPU worker" in run.stdout and "answer: [" in run.stdout
    assert "enclave driver: plain process" in run.stdout  # no Gramine here, and it says so
    assert "sanitised prompt (what the GPU saw" in run.stdout and "ε = 4 in all" in run.stdout
    assert "3 tokens in" in run.stdout and "B per token" in run.stdout
    assert "signature verified" in run.stdout


def test_unsigned_and_wrongly_signed_bundles_are_refused(
    tmp_path, signed_cmif, key_files, capsys, monkeypatch
):
    """A bundle the trusted key did not sign is refused before a worker or an enclave
    process starts (``run`` never reaches the step that starts them)."""
    out = tmp_path / "bundle"
    shutil.copytree(signed_cmif[0], out)
    (out / "plan.json.sig").unlink()
    ids = ("--ids", "5,6,7,8", "--max-new-tokens", "2")
    # in this process: each refusal is one line, and nothing is started

    def started(*args):
        raise AssertionError("teesplit run started a worker and an enclave for a refused bundle")

    monkeypatch.setattr(cli, "_run_both", started)
    code, stdout, err = teesplit_here(capsys, "run", str(out), *ids)
    assert code != 0 and "--trusted-key" in err and stdout == ""
    code, stdout, err = teesplit_here(
        capsys, "run", str(out), *ids, "--trusted-key", str(key_files[1])
    )
    assert code != 0 and "is not signed" in err and stdout == ""
    assert len(err.strip().splitlines()) == 1
    # the enclave driver refuses it itself, before it looks for a worker
    worker = f"unix:{tmp_path / 'none.sock'}"
    code, _, err = teesplit_here(
        capsys, "enclave", str(out / "enclave"), "--worker", worker,
        "--trusted-key", str(key_files[1]),
    )  # fmt: skip
    assert code != 0 and "is not signed" in err and "none.sock" not in err
    opted_out = teesplit("run", str(out), *ids, "--allow-unsigned")
    assert opted_out.returncode == 0, opted_out.stderr[-2000:]
    assert "UNSIGNED bundle" in opted_out.stdout and "WARNING --allow-unsigned" in opted_out.stderr
    other = tmp_path / "other.key"
    code, _, _ = teesplit_here(capsys, "keygen", "--out", str(other))
    assert code == 0 and (tmp_path / "other.key.pub").is_file()
    assert (other.stat().st_mode & 0o777) == 0o600
    # signed by a key the enclave was not told to trust
    (out / "plan.json.sig").write_bytes(
        sign((out / "plan.json").read_bytes(), load_private_key(other))
    )
    code, stdout, err = teesplit_here(
        capsys, "run", str(out), *ids, "--trusted-key", str(key_files[1])
    )
    assert code != 0 and "does not verify with the trusted key" in err and stdout == ""


def test_enclave_reports_a_missing_worker(tmp_path, signed_cmif, key_files):
    out = signed_cmif[0]
    worker = f"unix:{tmp_path / 'none.sock'}"
    run = teesplit(
        "enclave", str(out / "enclave"), "--worker", worker, "--trusted-key", str(key_files[1])
    )
    assert run.returncode != 0 and "none.sock" in run.stderr


def test_the_demo_loads_and_captures_its_model_once_for_both_bundles(tmp_path, monkeypatch):
    """The demo's bundles share one load and capture of SmolLM2 (one cache, handed to each
    partition); a plain `teesplit partition` keeps nothing between calls."""
    import partitioner.deploy

    class Served(Exception):
        pass

    def serve(*args, **kwargs):
        raise Served  # stop before serving

    seen = []
    monkeypatch.setattr(cli, "_demo_bundle", lambda *args: seen.append(args))
    monkeypatch.setattr(partitioner.deploy, "local_deployment", serve)
    with pytest.raises(Served):
        cli.cmd_demo(cli._parser().parse_args(["demo", "--out", str(tmp_path / "demo")]))
    assert [args[1] for args in seen] == ["cmif", "slalom"]
    assert isinstance(seen[0][4], dict) and seen[0][4] is seen[1][4]
    loads = []
    monkeypatch.setattr(cli, "_load_model", lambda spec: loads.append(spec) or built("tiny-llama"))
    cache = {}
    first = cli._captured("m", 0.0, cache)
    assert cli._captured("m", 0.0, cache)[0] is first[0] and loads == ["m"]
    cli._captured("m", 0.0, None)
    cli._captured("m", 0.0, None)
    assert loads == ["m", "m", "m"]


def test_the_demo_partitions_with_every_option_the_command_line_has(tmp_path, monkeypatch):
    """The demo builds its bundles by calling the partition command; a namespace written by
    hand lacked an option added later (--compile-enclave), and a clean `make demo` failed."""
    from partitioner import cli

    seen = []
    monkeypatch.setattr(cli, "cmd_partition", lambda args, cache=None: seen.append(args))
    cli._demo_bundle(tmp_path / "cmif", "cmif", tmp_path / "key", tmp_path / "key.pub")
    parsed = cli._parser().parse_args(["partition", "m", "--out", "x"])
    (args,) = seen
    assert set(vars(args)) == set(vars(parsed))
    assert (args.model, args.policy, args.compile_enclave) == ("smollm2-135m", "cmif", False)
    assert parsed.policy == "secureinfer"  # the default
