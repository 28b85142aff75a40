"""Where a server's signing keys come from, so every server of an installation signs alike.

A token minted by one server (API-key sessions, job tokens, storage URLs and the dashboard's
CSRF keys, both derived from the JWT key; registry tokens) must be accepted by every other. With
SQLite there is one server and the keys live in its data directory. With PostgreSQL the keys
live in the database (``shared_secrets``), created by the first server to start; the JWT key
may instead come from a file every server reads (``signing_key_file``).
"""

from __future__ import annotations

from openhtc.auth.keys import (
    SigningKey,
    load_or_create_signing_key,
    new_signing_key_pem,
    signing_key_from_pem,
)
from openhtc.config import Settings
from openhtc.registry.keys import install_registry_key_bundle, new_registry_key_bundle
from openhtc.store.db import Database
from openhtc.store.shared_secrets import shared_secret

JWT_SECRET = "jwt-signing-key"
REGISTRY_SECRET = "registry-token-key"


def jwt_signing_key(settings: Settings, db: Database) -> SigningKey:
    if settings.signing_key_file is not None:
        return load_or_create_signing_key(settings.signing_key_file)
    if db.is_sqlite:
        return load_or_create_signing_key(settings.data_dir / "keys" / "jwt-signing.pem")
    pem = shared_secret(db, JWT_SECRET, lambda: new_signing_key_pem().decode())
    return signing_key_from_pem(pem.encode(), f"shared secret {JWT_SECRET}")


def share_registry_key(settings: Settings, db: Database) -> None:
    """With PostgreSQL: put the shared registry key where the registry service reads it
    (DATA_DIR/keys), so registry tokens of every server verify against one certificate."""
    if not db.is_sqlite:
        bundle = shared_secret(db, REGISTRY_SECRET, new_registry_key_bundle)
        install_registry_key_bundle(settings.data_dir / "keys", bundle)
