"""The enclave driver's Gramine manifest, rendered from a Jinja2 template.

Reads an enclave bundle (``DIR/enclave``, whose file hashes ``plan.json`` records); writes TOML
text. The rendering follows ``gramine-manifest``: a Jinja2 template with a ``gramine`` object
(``libos``, ``runtimedir()``), ``python`` paths and ``env`` in scope. Gramine is not installed on
the development machines, so its paths default to the Debian/Ubuntu package layout and can be
overridden; where ``gramine-manifest`` is on the PATH a deployer can render the same template
with it instead.

Guarantees: every file of the enclave bundle is listed in ``sgx.trusted_files`` with its sha256
(and nothing from ``gpu/``); ``sgx.enclave_size`` is the measured peak memory times a margin,
rounded up to a power of two; the output parses as TOML.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from partitioner.errors import ArtifactError

TEMPLATE = Path(__file__).parent / "templates" / "teesplit-enclave.manifest.template"
ATTESTATION = ("none", "dcap", "epid")
_MIN_ENCLAVE = 256 << 20


@dataclass
class _Gramine:
    libos: str = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"
    runtime: str = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"

    def runtimedir(self, libc: str = "glibc") -> str:
        return self.runtime


@dataclass
class ManifestOptions:
    peak_bytes: int
    max_threads: int = 16
    compute_threads: int = 4
    remote_attestation: str = "dcap"
    debug: bool = False
    log_level: str = "error"
    entrypoint: str = field(default_factory=lambda: sys.executable)
    gramine: _Gramine = field(default_factory=_Gramine)


def enclave_size(peak_bytes: int, margin: float = 1.5) -> str:
    """``peak * margin`` rounded up to a power of two, as Gramine wants it (``"2G"``)."""
    size = max(_MIN_ENCLAVE, int(peak_bytes * margin))
    size = 1 << math.ceil(math.log2(size))
    for unit, shift in (("G", 30), ("M", 20)):
        if size >= 1 << shift:
            return f"{size >> shift}{unit}"
    return str(size)


def render_manifest(bundle: str | Path, options: ManifestOptions) -> str:
    """The manifest for the enclave driver serving ``bundle`` (a saved split program)."""
    root = Path(bundle).resolve()
    plan_path = root / "plan.json"
    try:
        files = json.loads(plan_path.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"cannot read the file hashes in {plan_path}: {exc}") from None
    if options.remote_attestation not in ATTESTATION:
        raise ArtifactError(
            f"remote_attestation={options.remote_attestation!r}; allowed: {list(ATTESTATION)}"
        )
    bundle_files = [
        {"path": rel, "sha256": digest}
        for rel, digest in sorted(files.items())
        if rel.startswith("enclave/")
    ]
    bundle_files.insert(0, {"path": "plan.json", "sha256": _sha256(plan_path)})
    paths = sysconfig.get_paths()
    python_paths = sorted({paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]})
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    template = env.get_template(TEMPLATE.name)
    return template.render(
        gramine=options.gramine,
        env={},
        entrypoint=options.entrypoint,
        argv=[options.entrypoint, "-m", "enclave_runtime", "/bundle"],
        log_level=options.log_level,
        arch_libdir="/lib/x86_64-linux-gnu",
        compute_threads=options.compute_threads,
        python_paths=python_paths,
        bundle_dir=str(root),
        debug=options.debug,
        enclave_size=enclave_size(options.peak_bytes),
        max_threads=options.max_threads,
        remote_attestation=options.remote_attestation,
        bundle_files=bundle_files,
    )


def _sha256(path: Path) -> str:
    from partitioner.artifacts import _sha256 as digest

    return digest(path)


def gramine_runner() -> str | None:
    """``gramine-sgx`` or ``gramine-direct`` when on the PATH (in that order), else ``None``."""
    for tool in ("gramine-sgx", "gramine-direct"):
        if shutil.which(tool):
            return tool
    return None
