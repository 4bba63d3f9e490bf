"""Prometheus metrics of one agent (a registry per application, so tests do not share state).

Labels never carry prompt text, tokens or user identifiers: endpoints, statuses, models and
reasons only.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["METRICS", "AgentMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cube_agent_requests",
            "Inference requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cube_agent_request_seconds",
            "Time from request to the end of the response.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "cube_agent_first_byte_seconds",
            "Time from request to the first response byte from the backend.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "cube_agent_tokens",
            "Tokens reported by the backend's usage fields.",
            ["model", "kind"],  # kind: prompt | completion
            registry=self.registry,
        )
        self.evidence = Counter(
            "cube_agent_evidence",
            "Evidence generations by outcome.",
            ["outcome"],  # ok | busy | error | rate_limited | bad_nonce
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "cube_agent_auth_failures",
            "Refused requests by reason.",
            ["reason"],
            registry=self.registry,
        )


METRICS = web.AppKey("metrics", AgentMetrics)
