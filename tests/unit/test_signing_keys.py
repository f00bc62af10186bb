"""Key files that are missing, empty, unreadable or of another kind: one IntegrityError naming
the file (exit 3), never a library's own exception."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from esper import signing
from esper.errors import IntegrityError


def _private(tmp_path, data: bytes):
    path = tmp_path / "forge.key"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_a_missing_key_names_its_file(tmp_path):
    for load in (signing.load_private_key, signing.load_public_key):
        with pytest.raises(IntegrityError, match=r"forge\.key: the workspace's .* is missing"):
            load(tmp_path / "forge.key")


@pytest.mark.parametrize("data", [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_an_empty_or_garbled_key_names_its_file(tmp_path, data):
    with pytest.raises(IntegrityError, match=r"forge\.key: not an Ed25519 private key in PEM"):
        signing.load_private_key(_private(tmp_path, data))
    public = tmp_path / "forge.pub"
    public.write_bytes(data)
    with pytest.raises(IntegrityError, match=r"forge\.pub: not an Ed25519 public key in PEM"):
        signing.load_public_key(public)


def test_a_key_of_another_algorithm_is_refused(tmp_path):
    other = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(IntegrityError, match="not an Ed25519 private key"):
        signing.load_private_key(_private(tmp_path, other))


def test_a_key_directory_in_place_of_the_file_is_unreadable(tmp_path):
    (tmp_path / "forge.pub").mkdir()
    with pytest.raises(IntegrityError, match=r"forge\.pub: cannot read the public key"):
        signing.load_public_key(tmp_path / "forge.pub")
