"""The gateway's Prometheus metrics (its own registry: one per application).

Labels never carry a domain, a user, a token or any request content: ``/metrics`` is an
operator's view, not a tenant's.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["KNOWN_ROUTES", "METRICS", "GatewayMetrics", "metric_route", "observe_request"]

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
            "cube_proxy_in_flight", "Requests being forwarded right now", registry=r
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
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.agents = Gauge(
            "cube_proxy_agents", "Agents known to the gateway by state", ["state"], registry=r
        )


METRICS = web.AppKey("gateway_metrics", GatewayMetrics)


def observe_request(metrics: GatewayMetrics, route: str, status: int, added_ms: float) -> None:
    """Count one answered request and the time the proxy added (label children cached)."""
    key = (route, status)
    children = metrics._request_children.get(key)
    if children is None:
        label = metric_route(route)
        children = (
            metrics.requests.labels(route=label, status=str(status)),
            metrics.added_ms.labels(route=label),
        )
        metrics._request_children[key] = children
    children[0].inc()
    children[1].observe(added_ms)
