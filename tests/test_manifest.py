"""The rendered Gramine manifest parses as TOML and says what the enclave needs."""

import json
import tomllib
from pathlib import Path

import pytest
from conftest import shared_bundle

from enclave_runtime import allocator
from enclave_runtime.manifest import ManifestOptions, enclave_size, render_manifest
from partitioner.errors import ArtifactError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = shared_bundle(tmp_path_factory, "slalom")
    (path / "plan.json.sig").unlink()  # unsigned: the manifests below allow it
    return path


def test_enclave_size_is_a_power_of_two_above_the_peak():
    assert enclave_size(100 << 20) == "256M"
    assert enclave_size(700 << 20) == "2G"  # 700 MB * 1.5 = 1050 MB -> 2 GB
    assert enclave_size(3 << 30) == "8G"


def test_rendered_manifest_parses_and_trusts_exactly_the_enclave_bundle(bundle):
    text = render_manifest(
        bundle, ManifestOptions(peak_bytes=900 << 20, max_threads=8, allow_unsigned=True)
    )
    manifest = tomllib.loads(text)
    assert (
        manifest["libos"]["entrypoint"].endswith("python")
        or "python" in manifest["libos"]["entrypoint"]
    )
    sgx = manifest["sgx"]
    assert sgx["enclave_size"] == "2G" and sgx["max_threads"] == 8
    assert sgx["remote_attestation"] == "dcap"
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/bundle"]["uri"] == f"file:{bundle.resolve()}"
    hashed = {
        entry["uri"].removeprefix(f"file:{bundle.resolve()}/"): entry["sha256"]
        for entry in sgx["trusted_files"]
        if isinstance(entry, dict)
    }
    files = json.loads((bundle / "plan.json").read_text())["files"]
    enclave_files = {k: v for k, v in files.items() if k.startswith("enclave/")}
    assert enclave_files and {k: hashed[k] for k in enclave_files} == enclave_files
    assert "plan.json" in hashed
    assert not [k for k in hashed if k.startswith("gpu/")]
    # the enclave process starts with glibc's settings for compiled stages
    assert manifest["loader"]["env"]["GLIBC_TUNABLES"] == allocator.TUNABLES


def test_bad_attestation_setting_and_missing_plan_are_refused(bundle, tmp_path):
    with pytest.raises(ArtifactError, match="remote_attestation='sometimes'"):
        render_manifest(
            bundle,
            ManifestOptions(peak_bytes=1, remote_attestation="sometimes", allow_unsigned=True),
        )
    with pytest.raises(ArtifactError, match=r"cannot read the file hashes in .*plan\.json"):
        render_manifest(tmp_path, ManifestOptions(peak_bytes=1, allow_unsigned=True))


def test_the_enclave_size_comes_from_a_measured_peak(bundle):
    from enclave_runtime.manifest import measure_peak

    peak = measure_peak(bundle, {"batch": 1, "seq": 16})
    assert 50 << 20 < peak < 4 << 30  # a python process with torch loaded and the bundle
    size = tomllib.loads(
        render_manifest(bundle, ManifestOptions(peak_bytes=peak, allow_unsigned=True))
    )["sgx"]["enclave_size"]
    assert size == enclave_size(peak)


def test_a_file_name_cannot_write_toml_into_the_manifest(bundle, tmp_path):
    """Found by the red team: a files key could close the trusted-files array and add
    loader.env.PYTHONPATH and sgx.allowed_files to the manifest."""
    import json
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    document = json.loads((copy / "plan.json").read_text())
    evil = (
        'enclave/x"}]\nloader.env.PYTHONPATH = "/bundle/enclave/py"\nsgx.allowed_files = ["file:/'
    )
    document["files"][evil] = "0" * 64
    (copy / "plan.json").write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="is not a plain bundle path"):
        render_manifest(copy, ManifestOptions(peak_bytes=1, allow_unsigned=True))
    with pytest.raises(ArtifactError, match="cannot be written into the manifest"):
        worker = '127.0.0.1:1"\nsgx.debug = true'
        render_manifest(bundle, ManifestOptions(peak_bytes=1, worker=worker, allow_unsigned=True))


def test_the_enclaves_own_code_is_mounted_and_trusted_wherever_it_is_installed(bundle):
    """The enclave imports ``enclave_runtime`` (and the data layer, and the wire contract) from
    wherever this interpreter finds them: under ``make``'s editable install that is the
    checkout, outside the interpreter's site-packages. Unmounted, the driver could not import
    itself inside Gramine; untrusted, a host could swap its code. Each package folder is a
    trusted folder of the manifest (not the checkout: its caches and tests are not the
    enclave's), and the folder they are imported from is mounted."""
    import enclave_runtime
    import partitioner
    import runtime

    manifest = tomllib.loads(
        render_manifest(
            bundle, ManifestOptions(peak_bytes=900 << 20, max_threads=8, allow_unsigned=True)
        )
    )
    mounted = {m["uri"].removeprefix("file:") for m in manifest["fs"]["mounts"] if "uri" in m}
    trusted = {
        t.removeprefix("file:") for t in manifest["sgx"]["trusted_files"] if isinstance(t, str)
    }

    def covered(path: str, folders: set[str]) -> bool:
        return any(path == f.rstrip("/") or path.startswith(f.rstrip("/") + "/") for f in folders)

    for package in (enclave_runtime, partitioner, runtime):
        folder = str(Path(package.__file__).resolve().parent)
        assert covered(folder, mounted), folder
        assert covered(folder, trusted), folder
    checkout = str(Path(enclave_runtime.__file__).resolve().parent.parent)
    assert checkout + "/" not in trusted  # the packages, not everything beside them
