"""``cube-proxy``: the verifying proxy's command line.

Every option of :class:`proxy.config.ProxyConfig` is a flag (``--database``), an environment
variable (``CUBE_PROXY_DATABASE``) and a key of the ``--config`` file (``cube-proxy-config/1``
JSON, also from ``CUBE_PROXY_CONFIG``); flags win over the environment, which wins over the
file. ``--print-config`` prints the effective configuration (the database password redacted)
and exits.

The first start on an empty database creates the administrator named by ``--admin-email`` /
``CUBE_PROXY_ADMIN_EMAIL`` with the password in ``CUBE_PROXY_ADMIN_PASSWORD`` (environment
only; there is never a default password).

Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT), 2 for an invalid configuration, 1 when
the proxy cannot start (database, keys, port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from aiohttp import web

from proxy.config import CONFIG_ENV, OPTIONS, ConfigError, ProxyConfig, effective_config

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("cube.proxy")

EXIT_CONFIG = 2
EXIT_START = 1
SHUTDOWN_TIMEOUT = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cube-proxy",
        description="Cube's verifying proxy: users, domains, attestation-gated forwarding to "
        "agents. Every option also reads CUBE_PROXY_<NAME> from the environment (flags > "
        "environment > --config file > defaults).",
    )
    parser.add_argument("--config", metavar="FILE", help=f"cube-proxy-config/1 JSON ({CONFIG_ENV})")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.type.__name__.upper(),
            default=None,
            help=f"(env {option.env})",
        )
    return parser


class StartError(Exception):
    """The proxy cannot start (message safe to print)."""


def _server_tls(config: ProxyConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartError(f"cannot load the TLS certificate or key: {exc}") from None
    return ctx


async def serve(
    config: ProxyConfig,
    *,
    stop: asyncio.Event | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    from proxy.app import build_app
    from proxy.identity import StartupError

    stop = stop or asyncio.Event()
    app = build_app(config, environ=environ)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # A client that goes away cancels its request, so the agent stops generating.
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    try:
        await runner.setup()
    except StartupError as exc:
        raise StartError(str(exc)) from None
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=_server_tls(config))
        try:
            await site.start()
        except OSError as exc:
            raise StartError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        log.info(
            "cube-proxy serving",
            extra={
                "fields": {
                    "url": f"{config.scheme}://{config.host}:{config.port}",
                    "issuer": config.effective_issuer,
                    "database": config.to_json()["database"],
                }
            },
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _run(coro: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``coro`` on uvloop (a C event loop: a large share of the proxy's per-request cost
    is the loop's) when asked or, for "auto", when it is installed; else on asyncio's."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                coro.close()
                raise StartError("event_loop uvloop was asked for but is not installed") from None
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    try:
        config = effective_config(flags, env, args.config)
    except ConfigError as exc:
        print(f"cube-proxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.to_json(), indent=2, sort_keys=True))
        return 0

    from proxy.gateway.ops import configure_logging

    configure_logging(config.log_level)
    try:
        _run(serve(config, environ=env), config.event_loop)
    except StartError as exc:
        print(f"cube-proxy: {exc}", file=sys.stderr)
        return EXIT_START
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
