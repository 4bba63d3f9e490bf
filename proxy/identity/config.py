"""Settings of the identity layer (the proxy's CLI fills them from flags, env and its file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ADMIN_EMAIL_ENV", "ADMIN_PASSWORD_ENV", "IdentityConfig", "OidcConfig"]

ADMIN_EMAIL_ENV = "CUBE_PROXY_ADMIN_EMAIL"
ADMIN_PASSWORD_ENV = "CUBE_PROXY_ADMIN_PASSWORD"  # noqa: S105 - the variable's name, not a secret
KEY_SECRET_ENV = "CUBE_PROXY_KEY_SECRET"  # noqa: S105


@dataclass(frozen=True)
class OidcConfig:
    """An external OpenID Connect issuer whose ID/access tokens the proxy also accepts.

    A token is mapped to an existing, enabled user by its email claim (users are never created
    from a token). Only asymmetric algorithms are accepted.
    """

    issuer: str
    audience: str
    jwks_file: Path | None = None
    jwks_url: str | None = None
    email_claim: str = "email"
    #: Accept a token only if its ``email_verified`` claim is the JSON value ``true``.
    require_verified_email: bool = True
    jwks_refresh_seconds: float = 300.0
    #: A CA bundle to verify the JWKS URL's certificate with (default: the system's).
    jwks_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("OIDC needs exactly one of jwks_file or jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            raise ValueError("the OIDC JWKS URL must be https://")


@dataclass(frozen=True)
class IdentityConfig:
    #: A SQLite file path or sqlite:///path, or postgresql://user:pass@host:port/db.
    database: str
    #: The proxy's public base URL: ``iss`` of every token it signs.
    issuer_url: str
    access_token_ttl: int = 900  # 15 minutes
    refresh_token_ttl: int = 7 * 86400  # a refresh token unused this long expires
    session_ttl: int = 30 * 86400  # absolute session end (refresh cannot extend past it)
    forward_token_ttl: int = 120  # the JWT forwarded to agents
    pat_max_ttl: int | None = 365 * 86400  # None = PATs may be created without expiry
    #: Signing keys are replaced after this long; the old key stays in the JWKS until every
    #: token it signed has expired.
    key_rotation_seconds: float = 30 * 86400
    #: Encrypts signing keys at rest (AES-256-GCM under a key derived from it). None = keys
    #: stored as PEM in the database, protected only by the database's own access control.
    key_secret: str | None = field(default=None, repr=False)
    #: How long an authenticated bearer is remembered (per process). Revocations made through
    #: this process take effect at once; those made through another replica within this time.
    auth_cache_seconds: float = 5.0
    #: How often each replica re-reads signing keys (to see another replica's rotation).
    key_refresh_seconds: float = 60.0
    admin_email: str | None = None
    admin_password: str | None = field(default=None, repr=False)
    #: argon2id parameters (tests lower them; production keeps the defaults).
    argon2_memory_kib: int = 64 * 1024
    argon2_time_cost: int = 3
    argon2_parallelism: int = 4
    #: Failed logins per email within the window before further attempts get 429.
    login_max_failures: int = 10
    login_failure_window: float = 300.0
    oidc: OidcConfig | None = None
    #: Set by ``cube-proxy --workers N``: the file whose contents change whenever a worker
    #: changes identity data, so every worker forgets what it cached (see ``_cache.py``).
    shared_cache_file: str | None = None

    def __post_init__(self) -> None:
        if not self.issuer_url.startswith(("https://", "http://")):
            raise ValueError("issuer_url must be an http(s) URL")
        for name in ("access_token_ttl", "refresh_token_ttl", "session_ttl", "forward_token_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def with_env(self, env: Mapping[str, str] | None = None) -> IdentityConfig:
        """This config with the admin bootstrap and key secret taken from the environment
        where not set explicitly."""
        env = os.environ if env is None else env
        from dataclasses import replace

        return replace(
            self,
            admin_email=self.admin_email or env.get(ADMIN_EMAIL_ENV) or None,
            admin_password=self.admin_password or env.get(ADMIN_PASSWORD_ENV) or None,
            key_secret=self.key_secret or env.get(KEY_SECRET_ENV) or None,
        )

    @property
    def max_signed_token_ttl(self) -> int:
        """The longest lifetime of a token signed by the proxy's keys."""
        return max(self.access_token_ttl, self.forward_token_ttl)
