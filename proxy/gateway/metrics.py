"""The gateway's Prometheus metrics (its own registry: one per application).

Labels never carry a domain, a user, a token or any request content: ``/metrics`` is an
operator's view, not a tenant's.

With ``cube-proxy --workers N`` each worker process writes its values to files in a directory
the supervisor creates (``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's multiprocess mode,
chosen when the library is imported), and ``/metrics``, whichever worker answers, reports every
worker together (:func:`exposition`): counters and histograms summed, ``cube_proxy_in_flight``
summed over live workers, ``cube_proxy_agents`` the largest count any worker sees (each worker
tracks the agents it has used or discovered).
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "KNOWN_ROUTES",
    "METRICS",
    "MULTIPROCESS_ENV",
    "GatewayMetrics",
    "exposition",
    "metric_route",
    "observe_request",
]

#: Set by the supervisor for its workers (read by prometheus_client when imported).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Routes that get their own label; any other path is "other" (paths are client-chosen: a
#: label per path would let anyone grow the metrics without bound).
KNOWN_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/version",
        "attestation",
    }
)


def metric_route(route: str) -> str:
    return route if route in KNOWN_ROUTES else "other"


_MS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 25, 50, 100, 250, 1000)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cube_proxy_requests",
            "Requests answered by the gateway",
            ["route", "status"],
            registry=r,
        )
        self.added_ms = Histogram(
            "cube_proxy_added_milliseconds",
            "Time the proxy itself added to a request (X-Cube-Proxy-Ms)",
            ["route"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cube_proxy_in_flight",
            "Requests being forwarded right now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.verifications = Counter(
            "cube_proxy_attestations",
            "Agent evidence verifications by outcome",
            ["outcome"],
            registry=r,
        )
        self.certificate_changes = Counter(
            "cube_proxy_certificate_mismatches",
            "Connections refused because the agent's certificate was not the pinned one",
            registry=r,
        )
        self.agent_errors = Counter(
            "cube_proxy_agent_errors",
            "Failures reaching an agent",
            ["kind"],
            registry=r,
        )
        self.failovers = Counter(
            "cube_proxy_failovers", "Requests moved to another agent", registry=r
        )
        self.rate_limited = Counter(
            "cube_proxy_rate_limited", "Requests refused by a rate limit", ["limit"], registry=r
        )
        self.auth_failures = Counter(
            "cube_proxy_auth_failures", "Refused credentials", ["status"], registry=r
        )
        self.tokens = Counter(
            "cube_proxy_tokens", "Tokens reported by backends", ["kind"], registry=r
        )
        self.prompt_tokens = self.tokens.labels(kind="prompt")
        self.completion_tokens = self.tokens.labels(kind="completion")
        self.audit_dropped = Counter(
            "cube_proxy_audit_dropped",
            "Audit rows dropped (queue full or write failed)",
            registry=r,
        )
        self.usage_dropped = Counter(
            "cube_proxy_usage_dropped",
            "Usage rows (per domain, user and model) that could not be written",
            registry=r,
        )
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.agents = Gauge(
            "cube_proxy_agents",
            "Agents known to the gateway by state",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )


METRICS = web.AppKey("gateway_metrics", GatewayMetrics)


def exposition(metrics: GatewayMetrics) -> bytes:
    """The text ``/metrics`` serves: this process's registry, or, in a worker of several, every
    worker's values together (read from their files at each scrape)."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return generate_latest(metrics.registry)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def observe_request(metrics: GatewayMetrics, route: str, status: int, added_ms: float) -> None:
    """Count one answered request and the time the proxy added (label children cached)."""
    # Keyed by the label, not the route: routes come from request paths (any number of them).
    label = metric_route(route)
    key = (label, status)
    children = metrics._request_children.get(key)
    if children is None:
        children = (
            metrics.requests.labels(route=label, status=str(status)),
            metrics.added_ms.labels(route=label),
        )
        metrics._request_children[key] = children
    children[0].inc()
    children[1].observe(added_ms)
