"""Who is calling: the verified identity and scopes of one request (set by :mod:`agent.auth`)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

__all__ = ["ENDPOINTS", "PRINCIPAL", "Principal"]

#: Endpoint names scopes refer to ("endpoint:<name>").
ENDPOINTS = ("models", "chat", "completions", "embeddings", "ollama")


@dataclass(frozen=True)
class Principal:
    """A caller whose token verified. ``None`` for models/endpoints means "any"."""

    subject: str
    models: frozenset[str] | None
    endpoints: frozenset[str] | None
    token_id: str | None = None

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows_endpoint(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints


PRINCIPAL = web.RequestKey("principal", Principal)
