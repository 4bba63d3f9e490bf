"""The proxy's aiohttp application: operations, the admin API, the JWKS, and the gateway.

Order matters: the operations middleware is outermost (request ids, JSON errors, access log);
fixed routes (``/health``, ``/ready``, ``/metrics``, the admin API, ``/.well-known/jwks.json``)
are added before the gateway's ``/{domain}/...`` routes, which would otherwise match a fixed
path whose second segment is ``v1``, ``api`` or ``attestation``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import gateway
from proxy.config import ProxyConfig
from proxy.directory import AuditRecord, BackendSpec, Caller, Directory, DomainLimits, TokenSigner
from proxy.gateway import GatewaySettings
from proxy.gateway.forward import RESERVED_ALIASES
from proxy.gateway.ops import metrics_token
from proxy.gateway.ratelimit import RemoteBuckets

if TYPE_CHECKING:
    from proxy.identity import Identity, IdentityConfig, PasswordHashing

__all__ = [
    "JWKS_PATH",
    "RESERVED_ALIASES",
    "AppDirectory",
    "build_app",
    "create_app",
    "identity_config",
]

JWKS_PATH = "/.well-known/jwks.json"


def create_app(
    directory: Directory,
    *,
    settings: GatewaySettings | None = None,
    admin_setup: Callable[[web.Application], None] | None = None,
) -> web.Application:
    """The whole proxy over ``directory``. ``admin_setup`` adds the admin API's routes (and
    whatever it owns) to the application; without it only the gateway is served."""
    settings = (settings or GatewaySettings()).validate()
    app = web.Application(client_max_size=settings.max_body_bytes)
    gateway.setup_ops(app, access_log=settings.access_log)
    if admin_setup is not None:
        admin_setup(app)
    if not _has_route(app, JWKS_PATH):

        async def jwks(request: web.Request) -> web.Response:
            del request
            return web.json_response(
                directory.issuer().jwks(), headers={"Cache-Control": "public, max-age=60"}
            )

        app.router.add_get(JWKS_PATH, jwks, allow_head=False)
    gateway.setup(app, directory, settings)
    return app


def _has_route(app: web.Application, path: str) -> bool:
    return any(
        resource.canonical == path for resource in app.router.resources() if resource is not None
    )


class AppDirectory:
    """The application's :class:`proxy.identity.Identity` as the gateway's directory.

    The identity layer opens its database in a ``cleanup_ctx`` (at start-up, not when the
    application is built), so the gateway is given this stand-in, which finds it at
    ``app[IDENTITY]`` on first use.
    """

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._identity: Identity | None = None

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            from proxy.identity import IDENTITY

            self._identity = self._app[IDENTITY]
        return self._identity

    async def authenticate(self, bearer: str, *, domain_alias: str | None) -> Caller:
        return await self.identity.authenticate(bearer, domain_alias=domain_alias)

    async def domain_by_alias(self, alias: str) -> tuple[str, str] | None:
        return await self.identity.domain_by_alias(alias)

    async def backends(self, domain_id: str) -> list[BackendSpec]:
        return await self.identity.backends(domain_id)

    async def backend_domains(self) -> list[str]:
        return await self.identity.backend_domains()

    async def policy(self, domain_id: str) -> bytes | None:
        return await self.identity.policy(domain_id)

    async def limits(self, domain_id: str) -> DomainLimits:
        return await self.identity.limits(domain_id)

    async def record_usage(
        self,
        *,
        domain_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        requests: int = 1,
    ) -> None:
        await self.identity.record_usage(
            domain_id=domain_id,
            user_id=user_id,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            requests=requests,
        )

    async def record_audit(self, row: AuditRecord) -> None:
        await self.identity.record_audit(row)

    async def record_audits(self, rows: list[AuditRecord]) -> None:
        await self.identity.record_audits(rows)

    def issuer(self) -> TokenSigner:
        return self.identity.issuer()


def identity_config(
    config: ProxyConfig,
    environ: Mapping[str, str] | None = None,
    *,
    shared_cache_file: str | None = None,
) -> IdentityConfig:
    """The identity layer's settings from the proxy's (secrets from the environment)."""
    from pathlib import Path

    from proxy.identity import IdentityConfig, OidcConfig

    oidc = None
    if config.oidc_issuer and config.oidc_audience:
        oidc = OidcConfig(
            issuer=config.oidc_issuer,
            audience=config.oidc_audience,
            jwks_file=Path(config.oidc_jwks_file) if config.oidc_jwks_file else None,
            jwks_url=config.oidc_jwks_url,
        )
    return IdentityConfig(
        database=config.database,
        issuer_url=config.effective_issuer,
        access_token_ttl=config.access_token_ttl,
        refresh_token_ttl=config.refresh_token_ttl,
        session_ttl=config.session_ttl,
        forward_token_ttl=config.forward_token_ttl,
        pat_max_ttl=config.pat_max_ttl,
        key_rotation_seconds=config.key_rotation_seconds,
        auth_cache_seconds=config.identity_cache_seconds,
        admin_email=config.admin_email,
        oidc=oidc,
        shared_cache_file=shared_cache_file,
    ).with_env(environ)


def build_app(
    config: ProxyConfig,
    *,
    environ: Mapping[str, str] | None = None,
    hashing: PasswordHashing | None = None,
    shared_cache_file: str | None = None,
    shared_limits_file: str | None = None,
    shared_trust_dir: str | None = None,
) -> web.Application:
    """The production application: the identity layer over ``config.database`` (opened and
    migrated at start-up), its admin API, and the gateway. ``shared_cache_file``,
    ``shared_limits_file`` and ``shared_trust_dir`` are set for a worker of
    ``cube-proxy --workers N``."""
    from dataclasses import replace

    from proxy import admin_api
    from proxy.identity import identity_ctx

    settings = replace(
        config.gateway_settings(),
        shared_limits_file=shared_limits_file,
        shared_trust_dir=shared_trust_dir,
    ).validate()
    app = web.Application(client_max_size=settings.max_body_bytes)
    gateway.setup_ops(
        app,
        access_log=settings.access_log,
        metrics_token=metrics_token(os.environ if environ is None else environ),
    )
    # The identity layer's cleanup_ctx runs before the gateway's (which uses it) and closes
    # after it.
    identity = identity_config(config, environ, shared_cache_file=shared_cache_file)
    app.cleanup_ctx.append(identity_ctx(identity, hashing=hashing))
    admin_api.setup(app)

    def replica_buckets() -> RemoteBuckets | None:
        from proxy.db.ratelimits import DatabaseBuckets
        from proxy.identity import IDENTITY

        db = app[IDENTITY].db
        if config.rate_limits == "local" or db.dialect != "postgresql":
            return None  # (validate() refused "database" without PostgreSQL)
        return DatabaseBuckets(db)

    gateway.setup(app, AppDirectory(app), settings, replica_buckets=replica_buckets)
    return app
