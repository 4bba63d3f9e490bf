"""The proxy's signing keys: Ed25519 (JWS ``EdDSA``), rotated, published as JWKS.

One key ring signs both kinds of token the proxy issues: the access tokens it gives users
(audience :data:`ACCESS_AUDIENCE`) and the short-lived tokens it forwards to agents (audience =
the domain alias, see :class:`ForwardSigner`). An alias can never equal the access audience
(aliases have no ':'), so neither kind can be replayed as the other.

Rotation: the newest un-retired key signs. Rotating creates a new key and retires the others;
a retired key stays in the JWKS (and keeps verifying) until ``expires_at`` = retirement + the
longest token lifetime + leeway, after which no token it signed can be valid, and it is
removed from the JWKS. Keys are rotated automatically after ``key_rotation_seconds`` and on
demand (``POST /admin/keys/rotate``). Replicas sharing a PostgreSQL database re-read the keys
periodically and whenever a token names a kid they do not know.

Private keys at rest — the trade-off: the proxy must sign without a human present, so the key
has to be readable by the proxy process. With ``key_secret`` (``CUBE_PROXY_KEY_SECRET``) set,
each private key is stored encrypted with AES-256-GCM under a key derived from that secret
(HKDF-SHA256; the kid is the associated data), so a copy of the database or a backup alone does
not yield the keys; the secret must then live elsewhere (a systemd credential, a KMS-fed env).
Without it, keys are stored as PKCS#8 PEM protected only by the database's access control
(file mode 0600 for SQLite; database roles for PostgreSQL). Either way private keys are never
logged, never returned by any API, and never part of an exception message. A database holding
encrypted keys is refused if the secret is missing or wrong (fail closed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import OKPAlgorithm

from proxy.db import Database
from proxy.db.schema import signing_keys
from proxy.directory import AuthError, Caller

__all__ = [
    "ACCESS_AUDIENCE",
    "ALGORITHM",
    "ForwardSigner",
    "KeyError_",
    "KeyRing",
    "SigningKey",
]

log = logging.getLogger("cube.proxy.keys")

ALGORITHM = "EdDSA"
#: The audience of the proxy's own access tokens (contains ':', which no domain alias may).
ACCESS_AUDIENCE = "urn:cube:proxy"
LEEWAY_SECONDS = 30
_ENC_PREFIX = "enc:v1:"
_RELOAD_MIN_INTERVAL = 1.0
# Any constant other than the migrations': serializes signing-key rotation across replicas.
_LOCK_KEY = 0x4B455953  # "KEYS"


class KeyError_(Exception):  # not the builtin KeyError
    """The signing keys cannot be used (missing/wrong key secret); the proxy must not start."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public_jwk: dict[str, Any]
    created_at: float
    retired_at: float | None
    expires_at: float | None

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


def _kek(secret: str) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"cube-proxy-signing-keys", info=b"v1"
    ).derive(secret.encode())
    return AESGCM(key)


def _seal(private: Ed25519PrivateKey, kid: str, secret: str | None) -> str:
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if secret is None:
        return pem.decode()
    nonce = os.urandom(12)
    sealed = nonce + _kek(secret).encrypt(nonce, pem, kid.encode())
    return _ENC_PREFIX + base64.b64encode(sealed).decode()


def _open(stored: str, kid: str, secret: str | None) -> Ed25519PrivateKey:
    if stored.startswith(_ENC_PREFIX):
        if secret is None:
            raise KeyError_(
                "the signing keys are encrypted: set the key secret (CUBE_PROXY_KEY_SECRET)"
            )
        try:
            sealed = base64.b64decode(stored[len(_ENC_PREFIX) :], validate=True)
            pem = _kek(secret).decrypt(sealed[:12], sealed[12:], kid.encode())
        except (InvalidTag, ValueError) as exc:
            raise KeyError_(f"cannot decrypt signing key {kid}: wrong key secret?") from exc
    else:
        pem = stored.encode()
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise KeyError_(f"signing key {kid} is not a valid private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"signing key {kid} is not an Ed25519 key")
    return key


def _public_jwk(private: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    return jwk


class KeyRing:
    """The signing keys, loaded from the database and kept in memory."""

    def __init__(
        self,
        db: Database,
        *,
        max_token_ttl: int,
        rotation_seconds: float,
        secret: str | None = None,
    ) -> None:
        self._db = db
        self._max_token_ttl = max_token_ttl
        self._rotation_seconds = rotation_seconds
        self._secret = secret
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._last_load = 0.0
        self._last_unknown_reload = 0.0
        self._reload_lock = asyncio.Lock()
        self.warned_plaintext = False

    # -- loading and rotation ------------------------------------------------------------------

    async def load(self) -> None:
        """Read every published key; create the first key, or rotate one that is due."""
        await self._read()
        now = time.time()
        if self._active is None or now - self._active.created_at >= self._rotation_seconds:
            await self.rotate(only_if_due=True)
        await self._prune()

    async def _read(self) -> None:
        now = time.time()
        async with self._db.read() as conn:
            rows = (await conn.execute(sa.select(signing_keys))).mappings().all()
        keys: dict[str, SigningKey] = {}
        plaintext = False
        for row in rows:
            if row["expires_at"] is not None and row["expires_at"] <= now:
                continue
            if row["alg"] != ALGORITHM:
                raise KeyError_(f"signing key {row['kid']} has unsupported algorithm")
            stored = str(row["private_key"])
            plaintext = plaintext or not stored.startswith(_ENC_PREFIX)
            private = _open(stored, row["kid"], self._secret)
            keys[row["kid"]] = SigningKey(
                kid=row["kid"],
                private=private,
                public_jwk=_public_jwk(private, row["kid"]),
                created_at=row["created_at"],
                retired_at=row["retired_at"],
                expires_at=row["expires_at"],
            )
        if plaintext and self._secret is not None and not self.warned_plaintext:
            self.warned_plaintext = True
            log.warning(
                "some signing keys are stored unencrypted although a key secret is set; "
                "rotate the keys (POST /admin/keys/rotate) to replace them"
            )
        active = [k for k in keys.values() if k.retired_at is None]
        self._keys = keys
        self._active = max(active, key=lambda k: k.created_at) if active else None
        self._last_load = time.monotonic()

    async def rotate(self, *, only_if_due: bool = False) -> str:
        """Make a new signing key; retire the others. Returns the active kid."""
        now = time.time()
        kid = uuid.uuid4().hex[:16]
        private = Ed25519PrivateKey.generate()
        async with self._db.write() as conn:
            if self._db.dialect == "postgresql":
                # FOR UPDATE below locks no row while there is none: replicas creating the
                # first key at once would each add one. (SQLite's write lock already is one.)
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            current = (
                (
                    await conn.execute(
                        sa.select(signing_keys.c.kid, signing_keys.c.created_at)
                        .where(signing_keys.c.retired_at.is_(None))
                        .with_for_update()
                    )
                )
                .mappings()
                .all()
            )
            newest = max((r["created_at"] for r in current), default=None)
            if only_if_due and newest is not None and now - newest < self._rotation_seconds:
                kid = ""  # another replica rotated meanwhile
            else:
                await conn.execute(
                    sa.update(signing_keys)
                    .where(signing_keys.c.retired_at.is_(None))
                    .values(
                        retired_at=now,
                        expires_at=now + self._max_token_ttl + 2 * LEEWAY_SECONDS,
                    )
                )
                await conn.execute(
                    sa.insert(signing_keys).values(
                        kid=kid,
                        alg=ALGORITHM,
                        private_key=_seal(private, kid, self._secret),
                        public_jwk=json.dumps(_public_jwk(private, kid)),
                        created_at=now,
                    )
                )
        if kid:
            log.info("signing key rotated", extra={"kid": kid})
        await self._read()
        assert self._active is not None
        return self._active.kid

    async def _prune(self) -> None:
        """Forget keys that left the JWKS more than a day ago."""
        async with self._db.write() as conn:
            await conn.execute(
                sa.delete(signing_keys).where(signing_keys.c.expires_at < time.time() - 86400)
            )

    async def reload_if_unknown(self, kid: str) -> bool:
        """Another replica may have rotated: re-read (rate limited). True if kid is now known."""
        if kid in self._keys:
            return True
        async with self._reload_lock:
            # Rate limited, so that tokens naming random kids cannot hammer the database.
            now = time.monotonic()
            if kid not in self._keys and now - self._last_unknown_reload > _RELOAD_MIN_INTERVAL:
                self._last_unknown_reload = now
                await self._read()
        return kid in self._keys

    async def refresh(self) -> None:
        """Periodic: see other replicas' rotations, rotate when due, drop expired keys."""
        await self.load()

    # -- signing and verifying -----------------------------------------------------------------

    @property
    def active(self) -> SigningKey:
        if self._active is None:
            raise KeyError_("no signing key loaded")
        return self._active

    def sign(self, claims: dict[str, Any]) -> str:
        key = self.active
        return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})

    def key_for(self, kid: str) -> SigningKey | None:
        key = self._keys.get(kid)
        if key is None or (key.expires_at is not None and key.expires_at <= time.time()):
            return None
        return key

    def jwks(self) -> dict[str, Any]:
        now = time.time()
        keys = sorted(
            (k for k in self._keys.values() if k.expires_at is None or k.expires_at > now),
            key=lambda k: k.created_at,
            reverse=True,
        )
        return {"keys": [dict(k.public_jwk) for k in keys]}

    def kids(self) -> list[dict[str, Any]]:
        """Key metadata for the admin API (never key material)."""
        return [
            {
                "kid": k.kid,
                "alg": ALGORITHM,
                "created_at": k.created_at,
                "retired_at": k.retired_at,
                "expires_at": k.expires_at,
                "active": self._active is not None and k.kid == self._active.kid,
            }
            for k in sorted(self._keys.values(), key=lambda k: k.created_at)
        ]


class ForwardSigner:
    """Signs the per-domain JWT the proxy forwards to agents (the agent's token contract)."""

    def __init__(self, ring: KeyRing, issuer_url: str, *, default_ttl: int) -> None:
        self._ring = ring
        self._issuer_url = issuer_url
        self._default_ttl = default_ttl

    @property
    def issuer_url(self) -> str:
        return self._issuer_url

    def sign_forward(
        self,
        caller: Caller,
        *,
        models: tuple[str, ...] | None = None,
        endpoints: tuple[str, ...] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        if "inference" not in caller.actions:
            raise AuthError(403, "this credential does not allow inference")
        scoped: tuple[str, ...] | None
        if models is None:
            scoped = None if caller.models is None else tuple(sorted(caller.models))
        elif caller.models is None:
            scoped = tuple(models)
        else:
            # (The gateway checked the request's model against the scope already, Ollama's
            # spellings of one model as one on its routes; the agent compares them alike.)
            scoped = tuple(m for m in models if caller.may_use_model(m, ollama_names=True))
        if scoped is not None and not scoped:
            # An empty model list in the scope would mean "any model" to the agent.
            raise AuthError(403, "this credential does not allow that model")
        scope = ["inference"]
        scope += [f"model:{m}" for m in scoped or ()]
        scope += [f"endpoint:{e}" for e in endpoints or ()]
        now = int(time.time())
        ttl = self._default_ttl if ttl_seconds is None else ttl_seconds
        claims: dict[str, Any] = {
            "iss": self._issuer_url,
            "aud": caller.domain_alias,
            "sub": caller.user_id,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(scope),
            "cube_domain": caller.domain_id,
            "cube_token_kind": caller.token_kind,
        }
        if caller.token_id is not None:
            claims["cube_token_id"] = caller.token_id
        return self._ring.sign(claims)

    def jwks(self) -> dict[str, Any]:
        return self._ring.jwks()
