"""The proxy's forwarding gateway: attestation-gated, tenant-routed, streaming.

Modules, one concern each:

- :mod:`proxy.gateway.settings`  tunables
- :mod:`proxy.gateway.service`   the :class:`Gateway` state and its lifecycle, health checks
- :mod:`proxy.gateway.edge`      the listening side: a lean HTTP/1.1 fast path for forwarding,
                                  aiohttp for everything else
- :mod:`proxy.gateway.forward`   routes and the forwarding exchange
- :mod:`proxy.gateway.listing`   model listings merged over a domain's agents
- :mod:`proxy.gateway.upstream`  pooled pinned-TLS connections to agents
- :mod:`proxy.gateway.sharedtrust` attestation outcomes shared by the workers
- :mod:`proxy.gateway.attest`    the attestation gate (evidence, policy, certificate pin)
- :mod:`proxy.gateway.agents`    agents per domain, their state, load balancing
- :mod:`proxy.gateway.tls`       pinned TLS to agents
- :mod:`proxy.gateway.cache`     short-lived caches in front of the directory
- :mod:`proxy.gateway.ratelimit` requests and tokens per minute
- :mod:`proxy.gateway.metering`  usage from backend answers; the audit/usage writer
- :mod:`proxy.gateway.ops`       /health, /ready, /metrics, JSON logs, request ids
- :mod:`proxy.gateway.metrics`   Prometheus metrics
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.directory import Directory
from proxy.gateway import forward, ops
from proxy.gateway.edge import EdgeSite
from proxy.gateway.forward import PROXY_MS_HEADER
from proxy.gateway.metrics import METRICS, GatewayMetrics
from proxy.gateway.ratelimit import RemoteBuckets
from proxy.gateway.service import GATEWAY, Gateway
from proxy.gateway.settings import GatewaySettings

__all__ = [
    "GATEWAY",
    "METRICS",
    "PROXY_MS_HEADER",
    "EdgeSite",
    "Gateway",
    "GatewayMetrics",
    "GatewaySettings",
    "setup",
    "setup_ops",
]


def setup_ops(
    app: web.Application, *, access_log: bool = True, metrics_token: bytes | None = None
) -> None:
    """``/health``, ``/ready``, ``/metrics`` (behind ``metrics_token`` when given) and the
    outermost middleware (request ids, JSON errors, the access log). Call first, before other
    modules add middlewares or routes."""
    ops.setup(app, access_log_enabled=access_log, metrics_token=metrics_token)


def setup(
    app: web.Application,
    directory: Directory,
    settings: GatewaySettings | None = None,
    *,
    replica_buckets: Callable[[], RemoteBuckets | None] | None = None,
) -> Gateway:
    """Install the gateway: its state (owned by the app's ``cleanup_ctx``), the readiness check
    of the directory, and the forwarding routes. Call after :func:`setup_ops` and after every
    module adding fixed routes (the admin API): the ``/{domain}/...`` routes come last.
    ``replica_buckets`` (called at start) gives rate-limit buckets shared by proxy replicas."""
    if ops.READY_CHECKS not in app:
        setup_ops(app, access_log=(settings or GatewaySettings()).access_log)
    metrics = GatewayMetrics()
    gateway = Gateway(directory, settings, metrics=metrics, replica_buckets=replica_buckets)
    app[GATEWAY] = gateway
    app[METRICS] = metrics
    app.cleanup_ctx.append(gateway.cleanup_ctx)

    async def directory_ready(app: web.Application) -> tuple[bool, str]:
        del app
        await directory.domain_by_alias("-ready-probe-")
        return True, "the directory answers"

    app[ops.READY_CHECKS]["directory"] = directory_ready
    forward.setup(app)
    return gateway
