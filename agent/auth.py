"""Bearer JWT authentication: every route but ``/health``, ``/ready``, ``/metrics`` and
``/attestation`` requires a token signed by the tenant's issuer.

The configuration pins the issuer, the audience (the domain this VM serves) and the issuer's
public keys (a JWKS file, or an ``https://`` URL refreshed by a task the application's
``cleanup_ctx`` owns). A token is accepted only if:

- its header names a known ``kid`` and an asymmetric algorithm (EdDSA, ES256, ES384, RS256,
  PS256) that matches that key's type (so ``alg: none`` and HS256-signed-with-the-public-key,
  the HS/RS confusion, are refused before any signature check);
- its signature verifies, and ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` are present and valid
  (``nbf`` honoured; 30 s leeway);
- its ``scope`` (space-separated) holds ``inference``; ``model:<name>`` and ``endpoint:<name>``
  entries restrict models and endpoints (enforced by the handlers through
  :class:`agent.principal.Principal`).

Failures are 401 (403 for a missing scope) with an OpenAI-shaped JSON error and a
``WWW-Authenticate`` header; nothing is forwarded; ``cube_agent_auth_failures{reason}`` counts
them. The token never reaches logs, metrics or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from agent.config import AgentConfig
from agent.metrics import METRICS
from agent.ops import REQUEST_ID, json_error
from agent.principal import PRINCIPAL, Principal
from cube._http import BodyTooLarge, read_at_most
from cube._tasks import cancel_and_wait

__all__ = [
    "ALGORITHMS",
    "JWKS_FETCHER",
    "LEEWAY_SECONDS",
    "MAX_JWKS_KEYS",
    "PUBLIC_PATHS",
    "REQUIRED_SCOPE",
    "VERIFIER",
    "AuthError",
    "JwksError",
    "JwksFetcher",
    "KeySet",
    "TokenVerifier",
    "VerificationKey",
    "auth_middleware",
    "parse_jwks",
    "parse_scope",
    "setup",
]

log = logging.getLogger("cube.agent.auth")

#: Asymmetric algorithms only; HMAC and ``none`` are never accepted.
ALGORITHMS = frozenset({"EdDSA", "ES256", "ES384", "RS256", "PS256"})
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
REQUIRED_SCOPE = "inference"
#: Routes served without a token (clients verify /attestation themselves).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/attestation"})
_MAX_TOKEN = 16 * 1024
_MAX_JWKS = 1024 * 1024
#: More keys than any issuer rotates through; parsing thousands of EC keys takes a while.
MAX_JWKS_KEYS = 100
_MIN_RSA_BITS = 2048
_REALM = "cube-agent"


class JwksError(Exception):
    """A JWKS document that cannot be used (the agent refuses to start with it)."""


class AuthError(Exception):
    """A refused request. ``reason`` labels the metric; ``message`` is safe to show."""

    def __init__(self, reason: str, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    key: Any  # a cryptography public key
    algorithms: frozenset[str]


def _key_algorithms(jwk: Mapping[str, object]) -> frozenset[str]:
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if kty == "OKP" and crv == "Ed25519":
        return frozenset({"EdDSA"})
    if kty == "EC" and crv == "P-256":
        return frozenset({"ES256"})
    if kty == "EC" and crv == "P-384":
        return frozenset({"ES384"})
    if kty == "RSA":
        return frozenset({"RS256", "PS256"})
    raise JwksError(f"key type {kty!r}{f' ({crv})' if crv else ''} is not accepted")


def parse_jwks(data: bytes) -> dict[str, VerificationKey]:
    """Public signing keys by ``kid`` from a JWKS document. Strict: symmetric or private keys,
    unknown algorithms, duplicate or missing ``kid`` are errors."""
    if len(data) > _MAX_JWKS:
        raise JwksError("JWKS document is too large")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise JwksError(f"JWKS is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('JWKS must be an object with a "keys" list')
    if len(doc["keys"]) > MAX_JWKS_KEYS:
        raise JwksError(f"JWKS holds more than {MAX_JWKS_KEYS} keys")
    out: dict[str, VerificationKey] = {}
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise JwksError(f"JWKS key {index} is not an object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwksError(f"JWKS key {index} has no kid")
        if kid in out:
            raise JwksError(f"JWKS has two keys with kid {kid!r}")
        if any(private in jwk for private in ("d", "p", "q", "k")):
            raise JwksError(f"JWKS key {kid!r} holds private or symmetric key material")
        if jwk.get("use", "sig") != "sig":
            raise JwksError(f"JWKS key {kid!r} is not a signing key (use={jwk.get('use')!r})")
        algorithms = _key_algorithms(jwk)
        alg = jwk.get("alg")
        if alg is not None:
            # (a list or an object is not hashable: checked first, it is a JwksError, not a
            # TypeError that would escape every caller)
            if not isinstance(alg, str) or alg not in algorithms:
                raise JwksError(f"JWKS key {kid!r}: algorithm {alg!r} does not fit its key type")
            algorithms = frozenset({alg})
        try:
            key = jwt.PyJWK(jwk, algorithm=sorted(algorithms)[0]).key
        except (jwt.PyJWTError, ValueError, TypeError, ArithmeticError, LookupError) as exc:
            raise JwksError(f"JWKS key {kid!r} is not a valid key: {exc}") from exc
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
            raise JwksError(f"JWKS key {kid!r}: RSA keys need at least {_MIN_RSA_BITS} bits")
        if not isinstance(
            key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        ):
            raise JwksError(f"JWKS key {kid!r} is not a public key")
        out[kid] = VerificationKey(kid, key, algorithms)
    if not out:
        raise JwksError("JWKS holds no keys")
    return out


class KeySet:
    """The issuer's current keys (replaced whole on refresh)."""

    def __init__(self, keys: Mapping[str, VerificationKey] | None = None) -> None:
        self._keys: dict[str, VerificationKey] = dict(keys or {})
        #: Bumped whenever the keys change, so verified-token caches know to forget.
        self.generation = 0
        self.loaded = keys is not None
        self.loaded_at: float | None = time.monotonic() if keys is not None else None
        #: Called with a ``kid`` the set does not know (the URL fetcher refreshes on it).
        self.on_unknown_kid: Callable[[str], None] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> KeySet:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise JwksError(f"cannot read JWKS file {path}: {exc.strerror}") from exc
        return cls(parse_jwks(data))

    def replace(self, keys: Mapping[str, VerificationKey]) -> None:
        self._keys = dict(keys)
        self.generation += 1
        self.loaded = True
        self.loaded_at = time.monotonic()

    def get(self, kid: str) -> VerificationKey | None:
        key = self._keys.get(kid)
        if key is None and self.on_unknown_kid is not None:
            self.on_unknown_kid(kid)
        return key

    def __len__(self) -> int:
        return len(self._keys)


def parse_scope(
    scope: object,
) -> tuple[frozenset[str], frozenset[str] | None, frozenset[str] | None]:
    """(all scope entries, models or None for any, endpoints or None for any)."""
    if scope is None:
        entries: list[str] = []
    elif isinstance(scope, str):
        entries = scope.split()
    else:
        raise AuthError("invalid_token", "the token's scope must be a space-separated string")
    models = frozenset(e[len("model:") :] for e in entries if e.startswith("model:"))
    endpoints = frozenset(e[len("endpoint:") :] for e in entries if e.startswith("endpoint:"))
    return frozenset(entries), (models or None), (endpoints or None)


_VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _VerifiedToken:
    principal: Principal
    not_before: float
    expires: float


class TokenVerifier:
    """Verifies bearer tokens against the pinned issuer, audience and keys."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: KeySet,
        leeway: int = LEEWAY_SECONDS,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        # Verified tokens, keyed by SHA-256 of the token: a signature check costs ~1 ms, and a
        # client sends the same token with every request. Entries keep their own validity
        # window and are dropped when the key set changes.
        self._verified: OrderedDict[bytes, _VerifiedToken] = OrderedDict()
        self._verified_generation = keys.generation

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        """The principal of a valid token, or :class:`AuthError`."""
        now = time.time() if now is None else now
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        if self._verified_generation != self.keys.generation:
            self._verified.clear()
            self._verified_generation = self.keys.generation
        cached = self._verified.get(digest)
        if cached is not None and cached.not_before <= now < cached.expires:
            self._verified.move_to_end(digest)
            return cached.principal
        principal, claims = self._verify_uncached(token)
        try:
            # PyJWT accepts an integer of any size: float() of 10**400 overflows.
            expires = float(claims["exp"]) + self.leeway
            nbf = claims.get("nbf", claims.get("iat"))
            not_before = float(nbf) - self.leeway if isinstance(nbf, int | float) else now
        except (OverflowError, ValueError, TypeError):
            raise AuthError("invalid_token", "the token's time claims are out of range") from None
        if not math.isfinite(expires) or not math.isfinite(not_before):
            raise AuthError("invalid_token", "the token's time claims are out of range")
        self._verified[digest] = _VerifiedToken(principal, not_before, expires)
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify_uncached(self, token: str) -> tuple[Principal, dict[str, Any]]:
        if not token or len(token) > _MAX_TOKEN or token.count(".") != 2:
            raise AuthError("malformed", "the bearer token is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed", "the bearer token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError(
                "bad_algorithm",
                f"token algorithm not accepted (accepted: {', '.join(sorted(ALGORITHMS))})",
            )
        if "crit" in header:
            raise AuthError("malformed", "critical token header extensions are not supported")
        if not self.keys.loaded:
            raise AuthError(
                "keys_unavailable", "token verification keys are not available yet", status=503
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("unknown_kid", "the token names no key (kid)")
        key = self.keys.get(kid)
        if key is None:
            raise AuthError("unknown_kid", "the token's key (kid) is not one of the issuer's")
        if alg not in key.algorithms:
            raise AuthError("bad_algorithm", "the token's algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                },
            )
        except ExpiredSignatureError:
            raise AuthError("expired", "the token has expired") from None
        except ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet") from None
        except InvalidAudienceError:
            raise AuthError("bad_audience", "the token is for another audience") from None
        except InvalidIssuerError:
            raise AuthError("bad_issuer", "the token is from another issuer") from None
        except MissingRequiredClaimError as exc:
            raise AuthError("missing_claim", f"the token lacks the {exc.claim!r} claim") from None
        except InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except DecodeError:
            raise AuthError("malformed", "the bearer token is not a valid JWT") from None
        except (InvalidTokenError, jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("invalid_token", "the token is not valid") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("missing_claim", "the token's 'sub' claim is empty")
        entries, models, endpoints = parse_scope(claims.get("scope"))
        if REQUIRED_SCOPE not in entries:
            raise AuthError(
                "insufficient_scope",
                f"the token lacks the {REQUIRED_SCOPE!r} scope",
                status=403,
            )
        jti = claims.get("jti")
        principal = Principal(
            subject=subject,
            models=models,
            endpoints=endpoints,
            token_id=jti if isinstance(jti, str) else None,
        )
        return principal, claims


class JwksFetcher:
    """Keeps a :class:`KeySet` fresh from an ``https://`` JWKS URL.

    Fetched at start, then every ``refresh`` seconds, and early (at most every
    ``min_interval`` seconds) when a token names an unknown ``kid`` (key rotation). A failed
    fetch keeps the previous keys and is retried sooner.
    """

    def __init__(
        self,
        url: str,
        keys: KeySet,
        *,
        ssl_context: ssl.SSLContext | None = None,
        refresh: float = 300.0,
        min_interval: float = 30.0,
        retry: float = 10.0,
        timeout: float = 10.0,
    ) -> None:
        if not url.startswith("https://"):
            raise JwksError("the JWKS URL must be https://")
        self.url = url
        self.keys = keys
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self.refresh = refresh
        self.min_interval = min_interval
        self.retry = retry
        self.timeout = timeout
        self.fetches = 0
        self._last_attempt = -float("inf")
        self._wake = asyncio.Event()
        keys.on_unknown_kid = self._unknown_kid

    def _unknown_kid(self, kid: str) -> None:
        del kid
        if time.monotonic() - self._last_attempt >= self.min_interval:
            self._wake.set()

    async def fetch_once(self, session: aiohttp.ClientSession) -> None:
        self._last_attempt = time.monotonic()
        async with session.get(
            self.url,
            ssl=self._ssl,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Accept": "application/json"},
        ) as response:
            if response.status != 200:
                raise JwksError(f"JWKS URL answered HTTP {response.status}")
            try:
                data = await read_at_most(response, _MAX_JWKS)
            except BodyTooLarge:
                raise JwksError(f"JWKS is larger than {_MAX_JWKS} bytes") from None
        # A worker thread: a large key set takes long enough to parse to stall the event loop.
        keys = await asyncio.to_thread(parse_jwks, data)
        self.keys.replace(keys)
        self.fetches += 1
        log.info("JWKS refreshed", extra={"fields": {"url": self.url, "keys": sorted(keys)}})

    async def _try_fetch(self, session: aiohttp.ClientSession) -> bool:
        try:
            await self.fetch_once(session)
        except (JwksError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "JWKS fetch failed",
                extra={"fields": {"url": self.url, "error": str(exc) or type(exc).__name__}},
            )
            return False
        except Exception as exc:
            # Whatever goes wrong, the previous keys stay and the refresher keeps running (a
            # dead refresher would refuse every token signed after the issuer's next rotation).
            # The type only: a message could quote the document.
            log.warning(
                "JWKS fetch failed",
                extra={"fields": {"url": self.url, "error": type(exc).__name__}},
            )
            return False
        return True

    async def run(self, session: aiohttp.ClientSession) -> None:
        ok = self.keys.loaded
        while True:
            delay = self.refresh if ok else self.retry
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as the event fires, and the task would outlive the application.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            ok = await self._try_fetch(session)

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        del app
        async with aiohttp.ClientSession() as session:
            await self._try_fetch(session)
            task = asyncio.create_task(self.run(session), name="jwks-refresh")
            try:
                yield
            finally:
                await cancel_and_wait(task)


VERIFIER = web.AppKey("token_verifier", TokenVerifier)
JWKS_FETCHER = web.AppKey("jwks_fetcher", JwksFetcher)


def _www_authenticate(error: AuthError | None) -> str:
    if error is None:
        return f'Bearer realm="{_REALM}"'
    code = "insufficient_scope" if error.status == 403 else "invalid_token"
    value = f'Bearer realm="{_REALM}", error="{code}", error_description="{error.message}"'
    if error.status == 403:
        value += f', scope="{REQUIRED_SCOPE}"'
    return value


def _refuse(request: web.Request, error: AuthError, *, challenge: bool = True) -> web.Response:
    request.app[METRICS].auth_failures.labels(reason=error.reason).inc()
    log.info(
        "request refused",
        extra={
            "fields": {
                "reason": error.reason,
                "status": error.status,
                "request_id": request.get(REQUEST_ID),
            }
        },
    )
    headers = {"WWW-Authenticate": _www_authenticate(error if challenge else None)}
    if error.status == 503:
        headers = {"Retry-After": "5"}
    type_ = {401: "authentication_error", 403: "permission_error"}.get(error.status, "server_error")
    return json_error(error.status, error.message, type_=type_, code=error.reason, headers=headers)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        response: web.StreamResponse = await handler(request)
        return response
    header = request.headers.get("Authorization")
    if header is None:
        return _refuse(request, AuthError("missing", "a bearer token is required"), challenge=False)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _refuse(request, AuthError("malformed", "use 'Authorization: Bearer <JWT>'"))
    try:
        principal = request.app[VERIFIER].verify(token.strip())
    except AuthError as exc:
        return _refuse(request, exc)
    request[PRINCIPAL] = principal
    response = await handler(request)
    return response


def setup(app: web.Application, config: AgentConfig, *, keys: KeySet | None = None) -> None:
    """Install the verifier and middleware. Keys: ``keys``, else ``config.jwks_file``, else the
    inline ``config.jwks``, else a :class:`JwksFetcher` for ``config.jwks_url`` owned by the
    app's ``cleanup_ctx``."""
    if keys is None:
        if config.jwks_file is not None:
            keys = KeySet.from_file(config.jwks_file)
        elif config.jwks is not None:
            keys = KeySet(parse_jwks(config.jwks.encode()))
        elif config.jwks_url is not None:
            keys = KeySet()
            fetcher = JwksFetcher(config.jwks_url, keys)
            app[JWKS_FETCHER] = fetcher
            app.cleanup_ctx.append(fetcher.cleanup_ctx)
        else:
            raise JwksError("no JWKS file, inline JWKS or URL configured")
    app[VERIFIER] = TokenVerifier(issuer=config.jwt_issuer, audience=config.jwt_audience, keys=keys)
    app.middlewares.append(auth_middleware)
