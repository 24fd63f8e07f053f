"""Ed25519 signatures over a bundle's ``plan.json`` (``cryptography``).

``plan.json`` lists the sha256 of every other file of the bundle, so a signature over its exact
bytes authenticates the whole bundle: a stage swapped for another valid one changes a hash, the
hash change changes ``plan.json``, and the signature no longer verifies. The compiler signs
with a private key (``teesplit keygen``, ``teesplit partition --sign-key``); the enclave
verifies with the public key it was given (``--trusted-key``), *before* it parses anything from
the bundle. Keys are PEM files: PKCS#8 for the private key (written with mode 0600),
SubjectPublicKeyInfo for the public one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from partitioner.errors import ArtifactError

SIGNATURE_FILE = "plan.json.sig"
_MAX_KEY_BYTES = 4096


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """Write a new private key to ``path`` (0600) and its public key to ``path.pub``."""
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    if path.exists() or public_path.exists():
        raise ArtifactError(f"{path} or {public_path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path, public_path


def _read_key_file(path: str | Path, what: str) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()[: _MAX_KEY_BYTES + 1]
    except OSError as exc:
        raise ArtifactError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_BYTES:
        raise ArtifactError(f"the {what} {path} is not a PEM key (too large)")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"{path} is not an Ed25519 public key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def verify(data: bytes, signature: bytes, key: Ed25519PublicKey, where: str) -> None:
    """Raise :class:`ArtifactError` unless ``signature`` is ``key``'s over ``data``."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise ArtifactError(
            f"{where}: the signature does not verify with the trusted key (the bundle was "
            "modified, or signed by another key)"
        ) from None
