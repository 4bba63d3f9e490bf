"""Random identifiers and bearer secrets, and how they are stored (SHA-256 only)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid

__all__ = [
    "PAT_PREFIX",
    "REFRESH_PREFIX",
    "new_id",
    "new_secret",
    "same_secret_hash",
    "secret_hash",
]

PAT_PREFIX = "cube_pat_"
REFRESH_PREFIX = "cube_rt_"
_SECRET_BYTES = 32


def new_id() -> str:
    """A random 128-bit identifier (hex); not guessable, not sequential."""
    return uuid.uuid4().hex


def new_secret(prefix: str) -> str:
    """A bearer secret: the prefix (so leaked ones are recognisable by scanners) and 256 bits."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()
    return prefix + raw


def secret_hash(secret: str) -> str:
    """What is stored for a bearer secret: SHA-256 hex. The secrets are 256-bit random, so a
    fast hash is enough (no dictionary to attack) and lookups stay O(1)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
