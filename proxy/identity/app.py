"""Wiring the identity layer into an aiohttp application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from proxy.identity.config import IdentityConfig
from proxy.identity.passwords import PasswordHashing
from proxy.identity.service import Identity

__all__ = ["IDENTITY", "identity_ctx"]

#: The application's :class:`Identity` (also its :class:`proxy.directory.Directory`).
IDENTITY = web.AppKey("cube_identity", Identity)


def identity_ctx(
    config: IdentityConfig, *, hashing: PasswordHashing | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry: opens (and migrates) the database, loads the signing keys,
    bootstraps the admin, and closes it all on shutdown. Raises
    :class:`proxy.identity.service.StartupError` when the proxy must not start."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        identity = await Identity.open(config, hashing=hashing)
        app[IDENTITY] = identity
        try:
            yield
        finally:
            await identity.close()

    return ctx
