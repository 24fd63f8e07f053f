"""The enclave launcher: Gramine when on the PATH (with the worker rendered into the manifest),
a plain process otherwise, and it never claims an enclave it does not start."""

import os
import stat
import sys
import tomllib

import pytest
from conftest import shared_step_bundle

from enclave_runtime import allocator, launcher
from enclave_runtime.launcher import bundle_root, enclave_command
from partitioner.errors import ArtifactError
from partitioner.signing import load_private_key


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, key_files):
    key = load_private_key(key_files[0])
    return shared_step_bundle(tmp_path_factory, "secureinfer", key=key)


def fake_tool(directory, name):
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_plain_process_without_gramine(bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gramine-* here
    launch = enclave_command(
        bundle / "enclave", "unix:/tmp/w.sock", ["--max-new-tokens", "3"], allow_unsigned=True
    )
    assert launch.argv[0] == sys.executable and launch.cwd is None
    assert launch.argv[1:] == [
        "-m",
        "enclave_runtime",
        str(bundle),
        "--worker",
        "unix:/tmp/w.sock",
        "--allow-unsigned",
        "--max-new-tokens",
        "3",
    ]
    assert "plain process" in launch.mode and "no enclave" in launch.mode
    # started with glibc's settings for compiled stages, in the caller's environment
    assert launch.env is not None and launch.env["PATH"] == str(tmp_path)
    assert launch.env["GLIBC_TUNABLES"].split(":")[-1] == allocator.TUNABLES


def test_gramine_direct_renders_the_worker_into_the_manifest(
    bundle, monkeypatch, tmp_path, key_files
):
    fake_tool(tmp_path, "gramine-direct")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    launch = enclave_command(
        bundle, "127.0.0.1:7071", ["--max-new-tokens", "5"], trusted_key=key_files[1]
    )
    assert launch.argv == ["gramine-direct", "teesplit-enclave"]
    assert "no isolation" in launch.mode  # gramine-direct is not an SGX enclave
    manifest = tomllib.loads((launch.cwd / "teesplit-enclave.manifest").read_text())
    assert manifest["loader"]["argv"][1:] == [
        "-m",
        "enclave_runtime",
        "/bundle",
        "--worker",
        "127.0.0.1:7071",
        "--trusted-key",
        "/bundle/gramine/trusted-key.pub",
        "--max-new-tokens",
        "5",
    ]
    trusted = {f["uri"] for f in manifest["sgx"]["trusted_files"] if isinstance(f, dict)}
    assert any(uri.endswith("gramine/trusted-key.pub") for uri in trusted)  # pinned
    assert manifest["sgx"]["enclave_size"].endswith(("M", "G"))
    with pytest.raises(ArtifactError, match="must listen on TCP"):
        enclave_command(bundle, "unix:/tmp/w.sock", trusted_key=key_files[1])


def test_gramine_sgx_needs_its_signer(bundle, monkeypatch, tmp_path):
    """Refused before the launcher measures the enclave's peak (a request served in a fresh
    process): nothing is run for a launch that cannot happen."""
    fake_tool(tmp_path, "gramine-sgx")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def measured(*args, **kwargs):
        raise AssertionError("the peak was measured for a launch that is refused")

    monkeypatch.setattr(launcher, "measure_peak", measured)
    with pytest.raises(ArtifactError, match="gramine-sgx-sign is not"):
        enclave_command(bundle, "127.0.0.1:7071", allow_unsigned=True)
    fake_tool(tmp_path, "gramine-sgx-sign")
    with pytest.raises(ArtifactError, match="must listen on TCP"):
        enclave_command(bundle, "unix:/tmp/w.sock", allow_unsigned=True)


def test_bundle_root_names_a_wrong_folder(tmp_path):
    with pytest.raises(ArtifactError, match=r"no plan\.json"):
        bundle_root(tmp_path)


def test_the_launcher_needs_a_key_or_an_explicit_opt_out(bundle):
    with pytest.raises(ArtifactError, match="trusted key or an explicit allow_unsigned"):
        enclave_command(bundle, "unix:/tmp/w.sock")


def test_the_launcher_writes_nothing_through_a_planted_link(
    bundle, monkeypatch, tmp_path, key_files
):
    """Found by the red team: a link at gramine/teesplit-enclave.manifest had the manifest
    written over the file it pointed to."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    shutil.rmtree(copy / "gramine", ignore_errors=True)
    (copy / "gramine").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    # the measured peak is not what this test is about (tests/test_manifest.py measures it)
    monkeypatch.setattr(launcher, "measure_peak", lambda *args, **kwargs: 1 << 30)
    (copy / "gramine" / "teesplit-enclave.manifest").symlink_to(victim)
    fake_tool(tmp_path, "gramine-direct")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ArtifactError, match="cannot write"):
        enclave_command(copy, "127.0.0.1:7071", trusted_key=key_files[1])
    assert victim.read_text() == "untouched"
