"""Ed25519 signed documents.

A signed document is JSON: `{"signer": ..., "key_id": ..., "signature": ..., "body": ...}` where
`body` is the exact text that was signed. `open_signed` verifies the signature over those bytes
and returns them: the caller parses the very buffer that was verified, never a re-read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from esper._fs import atomic_write_bytes
from esper.errors import IntegrityError


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: sha256 of its raw bytes, 16 hex digits."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair: the private key 0600 (PEM, PKCS8), the public key 0644 (PEM)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem, mode=0o644)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _key_bytes(path, "private key")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise IntegrityError(f"{path}: private key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: not an Ed25519 private key in PEM")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _key_bytes(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path}: not an Ed25519 public key in PEM")
    return key


def _key_bytes(path: Path, what: str) -> bytes:
    """A key file's bytes; a missing or unreadable key is an integrity failure naming it (the
    workspace's trust rests on its keys: nothing is signed or verified without them)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: the workspace's {what} is missing; restore it from a "
                             "backup (keys are made once, by `esper library init`)") from None
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def sign(body: bytes, key: Ed25519PrivateKey, signer: str) -> bytes:
    """Wrap `body` (UTF-8 text, usually canonical JSON) in a signed document."""
    doc = {
        "signer": signer,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(body)).decode("ascii"),
        "body": body.decode("utf-8"),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def open_signed(document: bytes, trusted: Ed25519PublicKey, *, what: str = "document") -> bytes:
    """Verify a signed document against the one trusted key and return the signed body bytes."""
    try:
        doc = json.loads(document)
        body = doc["body"].encode("utf-8")
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{what}: not a signed document") from None
    if doc.get("key_id") != key_id(trusted):
        raise IntegrityError(f"{what}: signed by key {doc.get('key_id')!r} "
                             f"(claims signer {doc.get('signer')!r}), not the trusted key {key_id(trusted)}")
    try:
        trusted.verify(signature, body)
    except InvalidSignature:
        raise IntegrityError(f"{what}: signature does not verify") from None
    return body
