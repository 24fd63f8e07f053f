"""Start the enclave driver: under ``gramine-sgx`` or ``gramine-direct`` when on the PATH,
as a plain process otherwise, and say which.

Reads a saved bundle (``DIR`` with ``plan.json`` and ``enclave/``); writes, for Gramine, the
rendered manifest (and under SGX the signed one) into ``DIR/gramine/``. Gramine fixes an
enclave's command line in its manifest, so the worker address is rendered into it and
prompts reach the driver on standard input in every mode.

Guarantees: :func:`enclave_command` never claims an enclave it does not start. A plain process
is reported as "no enclave"; ``gramine-direct`` as "Gramine without SGX (no isolation)"; only
``gramine-sgx`` as an SGX enclave.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from enclave_runtime import allocator
from enclave_runtime.manifest import (
    ManifestOptions,
    check_worker,
    gramine_runner,
    measure_peak,
    render_manifest,
)
from partitioner.bundle import write_inside
from partitioner.errors import ArtifactError

APP = "teesplit-enclave"


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    cwd: Path | None
    mode: str  # what a user is told, once, before the driver starts
    # the process's environment (None: the caller's; Gramine's comes from the manifest); a
    # copy of the host's, so kept out of repr (a log of the launch)
    env: dict[str, str] | None = field(default=None, repr=False)


def bundle_root(path: str | Path) -> Path:
    """``DIR`` for ``DIR`` or ``DIR/enclave`` (the enclave side reads ``DIR/plan.json``)."""
    path = Path(path)
    if path.name == "enclave" and (path.parent / "plan.json").is_file():
        return path.parent
    if (path / "plan.json").is_file():
        return path
    raise ArtifactError(f"{path} is neither a bundle (no plan.json) nor its enclave/ folder")


def enclave_command(
    bundle: str | Path,
    worker: str,
    options: list[str] = (),
    runner: str | None = None,
    *,
    trusted_key: str | Path | None = None,
    allow_unsigned: bool = False,
) -> Launch:
    """The command that starts the enclave driver for ``bundle`` against ``worker``, with
    further driver ``options`` (``--max-new-tokens 32``); under Gramine they are rendered into
    the manifest, whose argv is fixed.

    ``runner`` defaults to :func:`gramine_runner` (``gramine-sgx``, then ``gramine-direct``).
    ``trusted_key`` is the compiler's public key the driver verifies the bundle with; without
    it the caller must opt out with ``allow_unsigned`` (and the driver says so on start).
    """
    root = bundle_root(bundle)
    runner = runner or gramine_runner()
    if trusted_key is not None:
        verification = ["--trusted-key", str(Path(trusted_key).resolve())]
    elif allow_unsigned:
        verification = ["--allow-unsigned"]
    else:
        raise ArtifactError("the enclave driver needs a trusted key or an explicit allow_unsigned")
    driver = ["-m", "enclave_runtime", str(root), "--worker", worker, *verification, *options]
    if runner is None:
        return Launch(
            [sys.executable, *driver],
            None,
            "enclave driver: plain process (gramine-sgx / gramine-direct not on the PATH), "
            "so no enclave protects it",
            allocator.environment(),
        )
    # what would refuse the launch is checked before the peak is measured (a request served
    # in a fresh process, ~10 s)
    check_worker(worker)
    signer = shutil.which("gramine-sgx-sign") if runner == "gramine-sgx" else None
    if runner == "gramine-sgx" and signer is None:
        raise ArtifactError("gramine-sgx is on the PATH but gramine-sgx-sign is not")
    out = root / "gramine"
    if out.is_symlink():
        raise ArtifactError(f"{out} is a link; refusing to write the manifest through it")
    out.mkdir(exist_ok=True)
    manifest = out / f"{APP}.manifest"
    key_in_bundle = None
    if trusted_key is not None:  # inside the mounted bundle, so the manifest can pin it
        key_in_bundle = "gramine/trusted-key.pub"
        write_inside(root, key_in_bundle, Path(trusted_key).read_bytes())
    settings = ManifestOptions(
        peak_bytes=measure_peak(root, trusted_key=trusted_key),
        worker=worker,
        driver_args=list(options),
        trusted_key=key_in_bundle,
        allow_unsigned=allow_unsigned,
    )
    write_inside(root, f"gramine/{manifest.name}", render_manifest(root, settings).encode())
    if signer is not None:
        subprocess.run(
            [signer, "--manifest", str(manifest), "--output", str(out / f"{APP}.manifest.sgx")],
            check=True,
            capture_output=True,
        )
        mode = f"enclave driver: SGX enclave via gramine-sgx (manifest {manifest})"
    else:
        mode = f"enclave driver: gramine-direct, Gramine without SGX: no isolation ({manifest})"
    return Launch([runner, APP], out, mode)
