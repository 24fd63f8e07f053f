"""The enclave driver's Gramine manifest, rendered from a Jinja2 template.

Reads an enclave bundle (``DIR/enclave``, whose file hashes ``plan.json`` records); writes TOML
text. The rendering follows ``gramine-manifest``: a Jinja2 template with a ``gramine`` object
(``libos``, ``runtimedir()``), ``python`` paths and ``env`` in scope. Gramine is not installed on
the development machines, so its paths default to the Debian/Ubuntu package layout and can be
overridden; where ``gramine-manifest`` is on the PATH a deployer can render the same template
with it instead.

Guarantees: every file of the enclave bundle is listed in ``sgx.trusted_files`` with its sha256
(and nothing from ``gpu/``); the interpreter's library folders and the enclave's own package
folders (``enclave_runtime``, ``partitioner``, ``runtime``: in the checkout under an editable
install, which its site-packages only points to) are mounted and trusted; ``sgx.enclave_size``
is the measured peak memory times a margin, rounded up to a power of two; the output parses as
TOML.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from enclave_runtime import allocator
from partitioner.bundle import read_document, sha256
from partitioner.errors import ArtifactError
from partitioner.signing import SIGNATURE_FILE

_SAFE_PATH = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_ARG = re.compile(r"[A-Za-z0-9_.,:/@=+\-\[\]]+")
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
    worker: str = "127.0.0.1:7070"  # the GPU worker (Gramine fixes argv in the manifest)
    driver_args: list[str] = field(default_factory=list)  # further options, e.g. token limit
    # The compiler's public key, as a path inside the bundle root (the launcher copies it to
    # gramine/trusted-key.pub): a trusted file, so the enclave measurement pins it too.
    trusted_key: str | None = None
    allow_unsigned: bool = False  # the explicit opt-out: the driver then says so on every start
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


def check_worker(worker: str) -> None:
    """Refuse a worker address the driver cannot reach from inside Gramine."""
    if worker.startswith("unix:"):
        # Gramine emulates Unix sockets inside the enclave; a host socket is out of reach
        raise ArtifactError(
            f"worker {worker!r}: under Gramine the GPU worker must listen on TCP "
            "(host:port); Unix sockets do not cross the enclave boundary"
        )


# the packages the enclave process imports its own code from (the data layer and the bundle
# reader are in ``partitioner``; the wire contract in ``runtime``)
_OWN_PACKAGES = ("enclave_runtime", "partitioner", "runtime")


def _own_code(python_paths: list[str]) -> tuple[list[str], list[str]]:
    """Where this interpreter imports the enclave's own packages from, when that is outside
    ``python_paths`` (an editable install: the checkout): the folders to mount, and each
    package's folder to trust (not the checkout: its caches and tests are not the enclave's)."""
    roots: set[str] = set()
    dirs: set[str] = set()
    resolved = [Path(p).resolve() for p in python_paths]  # the folders below are resolved too
    for name in _OWN_PACKAGES:
        spec = __import__(name).__spec__
        origin = spec.origin if spec is not None else None
        if origin is None:
            raise ArtifactError(f"cannot tell where the enclave's package {name} is installed")
        folder = Path(origin).resolve().parent
        if any(folder.is_relative_to(p) for p in resolved):
            continue  # a regular install: its site-packages is mounted and trusted already
        for value in (str(folder), str(folder.parent)):
            if not _SAFE_ARG.fullmatch(value):
                raise ArtifactError(f"{value!r} cannot be written into the manifest")
        roots.add(str(folder.parent))
        dirs.add(str(folder))
    return sorted(roots), sorted(dirs)


def render_manifest(bundle: str | Path, options: ManifestOptions) -> str:
    """The manifest for the enclave driver serving ``bundle`` (a saved split program)."""
    root = Path(bundle).resolve()
    plan_path = root / "plan.json"
    try:
        key = root / options.trusted_key if options.trusted_key is not None else None
        files = read_document(root, trusted_key=key)["files"]  # signed: the list is the compiler's
    except ArtifactError as exc:
        raise ArtifactError(f"cannot read the file hashes in {plan_path}: {exc}") from None
    check_worker(options.worker)
    if options.remote_attestation not in ATTESTATION:
        raise ArtifactError(
            f"remote_attestation={options.remote_attestation!r}; allowed: {list(ATTESTATION)}"
        )
    # Every value pasted into the TOML is checked to be what it claims: a path of plain
    # characters, a hex digest, an address; so a bundle's file list cannot write TOML.
    for rel, digest in files.items():
        if not (isinstance(rel, str) and _SAFE_PATH.fullmatch(rel) and ".." not in rel.split("/")):
            raise ArtifactError(f"{plan_path}: file name {rel!r} is not a plain bundle path")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ArtifactError(f"{plan_path}: {rel} has no sha256 digest")
    for value in [options.worker, *options.driver_args, str(root)]:
        if not _SAFE_ARG.fullmatch(value):
            raise ArtifactError(f"{value!r} cannot be written into the manifest")
    bundle_files = [
        {"path": rel, "sha256": digest}
        for rel, digest in sorted(files.items())
        if rel.startswith("enclave/")
    ]
    bundle_files.insert(0, {"path": "plan.json", "sha256": sha256(plan_path)})
    if options.trusted_key is not None:
        key_path = root / options.trusted_key
        if not key_path.is_file():
            raise ArtifactError(f"trusted key {key_path} is missing")
        bundle_files.append({"path": options.trusted_key, "sha256": sha256(key_path)})
        signature = root / SIGNATURE_FILE
        if signature.is_file():
            bundle_files.append({"path": SIGNATURE_FILE, "sha256": sha256(signature)})
        verification = ["--trusted-key", f"/bundle/{options.trusted_key}"]
    elif options.allow_unsigned:
        verification = ["--allow-unsigned"]
    else:
        raise ArtifactError(
            "the manifest needs the compiler's public key (trusted_key) or an explicit "
            "allow_unsigned opt-out"
        )
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    python_paths = sorted({paths[key] for key in keys})
    code_roots, code_dirs = _own_code(python_paths)
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
        argv=[
            options.entrypoint,
            *("-m", "enclave_runtime", "/bundle", "--worker", options.worker),
            *verification,
            *options.driver_args,
        ],
        log_level=options.log_level,
        arch_libdir="/lib/x86_64-linux-gnu",
        compute_threads=options.compute_threads,
        glibc_tunables=allocator.TUNABLES,
        python_paths=python_paths,
        code_roots=code_roots,
        code_dirs=code_dirs,
        bundle_dir=str(root),
        debug=options.debug,
        enclave_size=enclave_size(options.peak_bytes),
        max_threads=options.max_threads,
        remote_attestation=options.remote_attestation,
        bundle_files=bundle_files,
    )


_MEASURE = """
import resource, sys, torch
from enclave_runtime import allocator
allocator.install()  # the enclave process's own allocator, as its main installs it
from enclave_runtime.executor import Executor
from enclave_runtime.generation import generate
from partitioner.bundle import load_program
key = sys.argv[2] if sys.argv[2] != "-" else None  # verified before anything from it runs
program = Executor(load_program(sys.argv[1], trusted_key=key, allow_unsigned=key is None))
dims = {name: int(v) for name, v in (a.split("=") for a in sys.argv[3:])}
context = program.spec.dim_ranges.get("past", [0, None])[1]
if program.spec.state and context is not None:  # a request the model's context can hold
    dims["seq"] = max(1, min(dims["seq"], context - dims.get("new", 8)))
ids = torch.zeros(dims["batch"], dims["seq"], dtype=torch.int64)
with torch.no_grad():
    if program.spec.state:
        generate(program, ids, max_new_tokens=dims.get("new", 8))
    else:
        program(input_ids=ids)
try:  # this program's own peak: VmHWM starts afresh at exec, while ru_maxrss may carry the
    # peak of the process that spawned it (a test runner holding gigabytes)
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) * 1024)
except (OSError, StopIteration):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def measure_peak(
    bundle: str | Path, dims: dict[str, int] | None = None, *, trusted_key: str | None = None
) -> int:
    """Peak RSS in bytes of a fresh process that loads ``bundle`` and serves one request:
    ``seq`` prompt tokens (default batch 1, seq 128) and, for a decoder step, ``new`` generated
    tokens (default 8).

    The GPU stages run in the same process, so this is an upper bound on the enclave's peak;
    the process runs on the enclave process's CPU allocator.
    The bundle runs on this host: give ``trusted_key`` so that its signature is checked first
    (without it the bundle is loaded unsigned: measure only bundles you made).
    """
    import subprocess

    dims = dims or {"batch": 1, "seq": 128, "new": 8}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            str(bundle),
            str(trusted_key) if trusted_key is not None else "-",
            *(f"{k}={v}" for k, v in dims.items()),
        ],
        capture_output=True,
        text=True,
        env=allocator.environment(),  # glibc's cache holds memory too: measure it as it runs
    )
    if result.returncode != 0:
        raise ArtifactError(f"measuring {bundle} failed: {result.stderr.strip()[-500:]}")
    return int(result.stdout.strip().splitlines()[-1])


def gramine_runner() -> str | None:
    """``gramine-sgx`` or ``gramine-direct`` when on the PATH (in that order), else ``None``."""
    for tool in ("gramine-sgx", "gramine-direct"):
        if shutil.which(tool):
            return tool
    return None
