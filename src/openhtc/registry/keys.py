"""The key the registry trusts: EC P-256, with a self-signed certificate the registry reads.

docker-registry verifies our ES256 tokens against ``rootcertbundle`` and finds the key by the
JWT header's ``kid``, which must be the key's *libtrust* fingerprint (not an arbitrary name).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_FILE = "registry-token.pem"
CERT_FILE = "registry-token.crt"
CERT_YEARS = 20


@dataclass(frozen=True)
class RegistryKey:
    private_key: ec.EllipticCurvePrivateKey
    cert_path: Path  # PEM certificate: the registry's ``auth.token.rootcertbundle``
    kid: str


def libtrust_kid(public_key: ec.EllipticCurvePublicKey) -> str:
    """``base32(sha256(DER SubjectPublicKeyInfo)[:30])`` unpadded, in ':'-joined groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openhtc registry token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def load_or_create_registry_key(keys_dir: Path) -> RegistryKey:
    """Read ``keys_dir/registry-token.{pem,crt}``; create both (mode 0600) on first start.

    Replicas of a cluster must share these two files, so every replica signs tokens the one
    registry accepts.
    """
    key_path, cert_path = keys_dir / KEY_FILE, keys_dir / CERT_FILE
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} does not hold an EC private key")
    else:
        keys_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(key_path, pem)
    if not cert_path.exists() or not _cert_matches(cert_path, key):
        _write_private(cert_path, _self_signed(key).public_bytes(serialization.Encoding.PEM))
    return RegistryKey(key, cert_path, libtrust_kid(key.public_key()))


def _cert_matches(cert_path: Path, key: ec.EllipticCurvePrivateKey) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return bool(cert.public_key() == key.public_key())


def new_registry_key_bundle() -> str:
    """A new key and its certificate as one PEM text (key first): what several servers on one
    PostgreSQL share through the database (services/shared_keys.py)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (pem + _self_signed(key).public_bytes(serialization.Encoding.PEM)).decode()


def install_registry_key_bundle(keys_dir: Path, bundle: str) -> None:
    """Write a shared bundle's key and certificate where :func:`load_or_create_registry_key` reads them."""
    marker = "-----BEGIN CERTIFICATE-----"
    key_pem, _, cert_pem = bundle.partition(marker)
    keys_dir.mkdir(parents=True, exist_ok=True)
    for path, data in (
        (keys_dir / KEY_FILE, key_pem.encode()),
        (keys_dir / CERT_FILE, (marker + cert_pem).encode()),
    ):
        if not path.exists() or path.read_bytes() != data:
            _write_private(path, data)
