"""The enclave's weights sealed at rest: AES-GCM under a key only the enclave is given.

Why: ``enclave/weights.safetensors`` holds every tensor the enclave's stages read, and under
``protects: [model]`` those are the protected parameters (a fine-tune's adapter, changed
layers; without a public base, the whole model). SGX does not trust the enclave host's
operating system, and the Gramine manifest's ``sgx.trusted_files`` checks their integrity
only: in the clear, whoever can read the host's disk reads the protected weights.

What: :func:`seal` encrypts a file's bytes with AES-GCM (``cryptography``; a 128- or 256-bit
key, a fresh 96-bit nonce per file, the file's bundle path as associated data, so a sealed
file cannot be moved to another path) behind a magic prefix; :func:`unseal` refuses bytes
that are not sealed, a wrong key, and any change to the ciphertext (GCM's tag), each with an
:class:`ArtifactError` naming the file. ``plan.json`` records which files are sealed and the
key's :func:`fingerprint` (a hash that names the key without revealing it), and the signature
over ``plan.json`` covers both and the ciphertext's sha256.

The key: :func:`new_key` writes one (32 random bytes, mode 0600, never over an existing file);
the enclave reads it from a file (:func:`load_key`). Under Gramine that file is what secret
provisioning delivers to the attested enclave (``/dev/attestation/keys/…``); nothing here
has run under SGX. This module is part of the enclave's trusted code (it imports only
``cryptography`` and the data model's errors).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from partitioner.errors import ArtifactError

MAGIC = b"teesplit-sealed-1\n"
CIPHER = "AES-GCM"
KEY_SIZES = (16, 32)  # AES-128 (Gramine's provisioned keys) or AES-256
ENV = "TEESPLIT_ENCLAVE_KEY"  # a key file's path, where no key is passed in code
_NONCE = 12


def fingerprint(key: bytes) -> str:
    """A name for ``key`` that reveals nothing of it (a domain-separated sha256, 16 bytes)."""
    return hashlib.sha256(b"teesplit enclave key\n" + key).hexdigest()[:32]


def new_key(path: str | Path) -> Path:
    """Write a fresh 256-bit key to ``path`` (mode 0600); an existing file is not replaced."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ArtifactError(f"{target} exists: not replacing a key") from None
    except OSError as exc:
        raise ArtifactError(f"enclave key {target}: cannot create it ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return target


def load_key(source: str | Path | bytes | bytearray) -> bytes:
    """A key given as bytes, or read from a regular file of exactly 16 or 32 raw bytes (a
    link is followed: the deployer names the path, and secret stores such as Kubernetes'
    mount keys as links; a FIFO or a folder is refused, not waited on)."""
    if isinstance(source, (bytes, bytearray)):
        key, where = bytes(source), "the enclave key"
    elif not isinstance(source, (str, Path)):
        raise ArtifactError(
            f"enclave key: expected raw bytes or a key file's path, got {type(source).__name__}"
        )
    else:
        where = str(source)
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise ArtifactError(f"enclave key {where}: cannot read it ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ArtifactError(f"enclave key {where}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            key = f.read(65)
    if len(key) not in KEY_SIZES:
        raise ArtifactError(
            f"{where}: an enclave key is {' or '.join(map(str, KEY_SIZES))} raw bytes, "
            f"got {len(key)}"
        )
    return key


def seal(data: bytes, key: bytes, rel: str) -> bytes:
    """``data`` (the bytes of bundle file ``rel``) encrypted under ``key``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE)
    return MAGIC + nonce + AESGCM(load_key(key)).encrypt(nonce, data, MAGIC + rel.encode())


def unseal(data: bytes, key: bytes, rel: str) -> bytes:
    """The plaintext of sealed bundle file ``rel``; :class:`ArtifactError` if it is not
    sealed, or does not decrypt under ``key`` (another key, or changed bytes)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _NONCE + 16:
        raise ArtifactError(f"{rel}: not a sealed file, though plan.json says it is")
    nonce = data[len(MAGIC) : len(MAGIC) + _NONCE]
    try:
        return AESGCM(load_key(key)).decrypt(
            nonce, data[len(MAGIC) + _NONCE :], MAGIC + rel.encode()
        )
    except InvalidTag:
        raise ArtifactError(
            f"{rel}: does not decrypt under the enclave key (another key, or changed bytes)"
        ) from None
