"""Tokens from an external OpenID Connect issuer, mapped to proxy users by email.

For deployments that already run an identity provider: its JWTs (ID or access tokens) are
accepted where the proxy's own access tokens are, if they are signed by a key in the issuer's
JWKS (a file, or an https URL re-read periodically and when an unknown kid appears), carry the
configured ``iss`` and ``aud``, are within ``nbf``/``exp``, and name by email an existing,
enabled user (users are never created from a token). Asymmetric algorithms only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from cube._http import BodyTooLarge, read_at_most
from proxy.identity.config import OidcConfig
from proxy.identity.errors import Unauthorized
from proxy.identity.models import normal_email

__all__ = ["ASYMMETRIC", "JwksError", "OidcVerifier", "parse_jwks"]

log = logging.getLogger("cube.proxy.oidc")

ASYMMETRIC = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
_KTY_ALGS = {
    "OKP": frozenset({"EdDSA"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
}
LEEWAY_SECONDS = 30
_MAX_JWKS = 1024 * 1024
_MIN_REFETCH_SECONDS = 10.0


_MIN_RSA_BITS = 2048


class JwksError(ValueError):
    """The JWKS document is unusable."""


@dataclass(frozen=True)
class _Key:
    key: Any
    algorithms: frozenset[str]


def parse_jwks(data: bytes) -> dict[str, _Key]:
    """kid -> key. Symmetric or private keys, unknown types, missing kids are refused."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise JwksError("the OIDC JWKS is not JSON") from exc
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise JwksError("the OIDC JWKS has no 'keys' list")
    out: dict[str, _Key] = {}
    for jwk in keys:
        if not isinstance(jwk, dict):
            raise JwksError("a JWKS entry is not an object")
        kid, kty = jwk.get("kid"), jwk.get("kty")
        if not isinstance(kid, str) or not kid or kid in out:
            raise JwksError("a JWKS entry has a missing or duplicate kid")
        if not all(isinstance(jwk.get(k, ""), str) for k in ("kty", "alg", "use")):
            raise JwksError(f"JWKS key {kid}: kty, alg and use must be strings")
        if kty not in _KTY_ALGS:
            raise JwksError(f"JWKS key {kid}: unsupported key type")
        if "d" in jwk:
            raise JwksError(f"JWKS key {kid} contains a private key")
        if jwk.get("use", "sig") != "sig":
            continue
        algorithms = _KTY_ALGS[str(kty)]
        alg = jwk.get("alg")
        if alg is not None:
            if alg not in algorithms:
                raise JwksError(f"JWKS key {kid}: algorithm does not fit the key")
            algorithms = frozenset({str(alg)})
        try:
            key = jwt.PyJWK(jwk, algorithm=sorted(algorithms)[0]).key
        # Not only PyJWKError: an unknown curve or a missing member is InvalidKeyError, and a
        # malformed member may be a TypeError or ValueError.
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise JwksError(f"JWKS key {kid} is invalid ({type(exc).__name__})") from None
        bits = getattr(key, "key_size", None)
        if kty == "RSA" and (not isinstance(bits, int) or bits < _MIN_RSA_BITS):
            # PyJWT only warns about short keys: a 512-bit issuer key is factorable.
            raise JwksError(f"JWKS key {kid}: an RSA key of {bits} bits ({_MIN_RSA_BITS} at least)")
        out[kid] = _Key(key, algorithms)
    return out


class OidcVerifier:
    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._keys: dict[str, _Key] = {}
        self._last_unknown_fetch = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.config.jwks_url is not None:
            context = ssl.create_default_context(
                cafile=None if self.config.jwks_ca_file is None else str(self.config.jwks_ca_file)
            )
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10),
                connector=aiohttp.TCPConnector(ssl=context),
            )
        await self.reload()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self) -> None:
        if self.config.jwks_file is not None:
            data = await asyncio.to_thread(self.config.jwks_file.read_bytes)
        else:
            assert self._session is not None and self.config.jwks_url is not None
            async with self._session.get(self.config.jwks_url, allow_redirects=False) as response:
                response.raise_for_status()
                try:
                    data = await read_at_most(response, _MAX_JWKS)
                except BodyTooLarge:
                    raise ValueError(f"the OIDC JWKS is larger than {_MAX_JWKS} bytes") from None
        self._keys = parse_jwks(data)

    async def refresh(self) -> None:
        """Periodic re-read; a failure keeps the previous keys (logged)."""
        try:
            await self.reload()
        # Whatever the issuer serves: a refresh that raised killed the periodic refresh task
        # (signing-key rotation with it) and made token checks answer 500.
        except Exception as exc:
            log.warning("could not refresh the OIDC JWKS: %s", type(exc).__name__)

    def is_ours(self, unverified_claims: dict[str, Any]) -> bool:
        return unverified_claims.get("iss") == self.config.issuer

    async def verify(self, token: str) -> tuple[str, float]:
        """The token's (lower-cased) email and expiry, or Unauthorized."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token") from exc
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(kid, str) or not isinstance(alg, str) or alg not in ASYMMETRIC:
            raise Unauthorized("the token's header is not acceptable")
        key = self._keys.get(kid)
        if key is None:
            async with self._lock:
                # Rate limited: tokens naming random kids must not hammer the issuer.
                now = time.monotonic()
                if kid not in self._keys and now - self._last_unknown_fetch > _MIN_REFETCH_SECONDS:
                    self._last_unknown_fetch = now
                    await self.refresh()
            key = self._keys.get(kid)
        if key is None or alg not in key.algorithms:
            raise Unauthorized("the token is signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the token has expired", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("the token is not valid") from exc
        if self.config.require_verified_email and claims.get("email_verified") is not True:
            # Only the JSON value true: "false", 0 or no claim at all do not vouch for the
            # address, and the address is what maps the token to a local account.
            raise Unauthorized("the token's email is not verified")
        email = claims.get(self.config.email_claim)
        if not isinstance(email, str) or not email:
            raise Unauthorized("the token carries no email")
        return normal_email(email), float(claims["exp"])
