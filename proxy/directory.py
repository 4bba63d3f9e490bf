"""The contract between the proxy's identity/storage layer and its gateway.

The gateway (``proxy.gateway``) asks a :class:`Directory` who is calling, which backends and
policy a domain has, and records usage and audit rows; it asks the directory's
:class:`TokenSigner` for the short-lived JWT it forwards to an agent in place of the caller's
own credentials. ``proxy.identity.directory.DbDirectory`` is the database-backed
implementation; tests may use an in-memory fake with the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from cube._model_names import ollama_canonical

__all__ = [
    "ACTIONS",
    "RESERVED_ALIASES",
    "ROLES",
    "ROLE_ACTIONS",
    "AuditRecord",
    "AuthError",
    "BackendKind",
    "BackendSpec",
    "Caller",
    "Directory",
    "DomainLimits",
    "TokenKind",
    "TokenSigner",
]

#: First path segments the proxy's own routes use: never a domain alias. The identity layer
#: refuses them when a domain is created (aliases cannot be renamed), and the gateway never
#: reads them as one.
RESERVED_ALIASES: frozenset[str] = frozenset(
    {
        "v1",
        "api",
        "admin",
        "auth",
        "health",
        "ready",
        "metrics",
        ".well-known",
        "well-known",
        "attestation",
        "static",
        "docs",
        "openapi",
    }
)

#: Every action a caller may hold in a domain.
ACTIONS: frozenset[str] = frozenset(
    {"inference", "read_audit", "manage_domain", "manage_members", "manage_backends"}
)
#: Domain roles, weakest first.
ROLES: tuple[str, ...] = ("member", "admin", "owner")
#: What each role allows. An owner can also delete the domain and grant "owner" (checked by the
#: admin API against the role itself, not an action).
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "member": frozenset({"inference"}),
    "admin": frozenset(
        {"inference", "read_audit", "manage_members", "manage_backends", "manage_domain"}
    ),
    "owner": frozenset(
        {"inference", "read_audit", "manage_members", "manage_backends", "manage_domain"}
    ),
}

TokenKind = Literal["access", "pat", "oidc"]
BackendKind = Literal["vllm", "openai", "ollama"]


class AuthError(Exception):
    """Authentication (401) or authorization (403) failed.

    ``message`` is safe to show to the client: it never contains the presented credential.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if status not in (401, 403):
            raise ValueError("AuthError status must be 401 or 403")
        self.status = status
        self.message = message
        self.code = code or ("unauthorized" if status == 401 else "forbidden")


@dataclass(frozen=True)
class Caller:
    """Who is calling, after the request's bearer token was authenticated."""

    user_id: str
    domain_id: str  # the domain this request acts in
    domain_alias: str
    actions: frozenset[str]  # e.g. {"inference", "read_audit", "manage_domain", ...}
    token_kind: TokenKind
    token_id: str | None  # PAT id (for per-token rate limits), never the secret
    models: frozenset[str] | None  # PAT scope; None = any model

    def may(self, action: str) -> bool:
        return action in self.actions

    def may_use_model(self, model: str, *, ollama_names: bool = False) -> bool:
        """Whether the scope allows ``model``; with ``ollama_names`` (an Ollama route), in
        any spelling Ollama reads as the same model (``llama3.2`` is ``llama3.2:latest``)."""
        if self.models is None or model in self.models:
            return True
        if not ollama_names:
            return False
        wanted = ollama_canonical(model)
        return any(ollama_canonical(allowed) == wanted for allowed in self.models)


@dataclass(frozen=True)
class BackendSpec:
    """One agent serving a domain."""

    id: str
    domain_id: str
    url: str  # https://host:port of an agent (never plain HTTP)
    kind: BackendKind
    models: tuple[str, ...]
    enabled: bool


@dataclass(frozen=True)
class DomainLimits:
    """Rate limits of a domain; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    #: Per token (PAT) or, for session tokens, per user.
    token_requests_per_minute: int | None = None
    token_tokens_per_minute: int | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One audited event. Never carries prompt or response text, nor any credential."""

    domain_id: str
    user_id: str | None
    route: str  # e.g. "/v1/chat/completions", "attestation"
    status: int  # HTTP status returned to the client
    when: datetime  # tz-aware UTC
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    evidence_digest: str | None = None  # "sha256:<hex>" of the verified evidence that served it
    backend_id: str | None = None
    token_id: str | None = None  # PAT id, never the secret
    #: "request" for a forwarded request; e.g. "attestation_failed", "admin" for other events.
    event: str = "request"
    #: A short, credential-free reason (e.g. why verification failed); never request text.
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # small JSON-able, credential-free facts


@runtime_checkable
class TokenSigner(Protocol):
    """Signs the per-domain JWT the proxy forwards to agents and publishes its public keys.

    The token satisfies the agent's contract (tests/agent/tokens.py): ``iss`` = the proxy's
    issuer URL, ``aud`` = the domain alias, ``sub`` = the user id, ``iat``/``nbf``/``exp``,
    ``jti``, a ``kid`` header naming a key in :meth:`jwks`, an asymmetric algorithm, and
    ``scope`` = ``"inference"`` plus ``model:<name>`` entries when the caller is restricted
    to some models (and optional ``endpoint:<name>`` entries). Signing is fast (EdDSA) and
    synchronous: safe to call on the event loop.
    """

    @property
    def issuer_url(self) -> str: ...

    def sign_forward(
        self,
        caller: Caller,
        *,
        models: tuple[str, ...] | None = None,
        endpoints: tuple[str, ...] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        """A JWT for ``caller`` acting in its domain.

        ``models``: restrict to these models (intersected with the caller's own model scope;
        None = the caller's scope, which may be unrestricted). Raises AuthError(403) if the
        caller may not do inference or the resulting model list is empty.
        ``ttl_seconds``: None = the signer's configured lifetime (short: minutes).
        """
        ...

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document (every key whose tokens may still be valid)."""
        ...


class Directory(Protocol):
    """What the gateway needs to know about identities, domains and their backends."""

    async def authenticate(self, bearer: str, *, domain_alias: str | None) -> Caller:
        """Authenticate a bearer credential (access JWT, PAT or external OIDC token).

        ``domain_alias``: the domain named by the route (``/{domain}/v1/...``), or None for a
        plain ``/v1/...`` route (allowed for PATs only, which are bound to one domain).
        Raises AuthError(401) for a bad/expired/revoked credential, AuthError(403) when the
        caller is not a member of the domain or the PAT is bound to another domain.
        """
        ...

    async def domain_by_alias(self, alias: str) -> tuple[str, str] | None:
        """(domain_id, alias), or None if there is no such domain."""
        ...

    async def backends(self, domain_id: str) -> list[BackendSpec]: ...

    async def backend_domains(self) -> list[str]:
        """The ids of the domains with at least one enabled backend."""
        ...

    async def policy(self, domain_id: str) -> bytes | None:
        """The domain's ``cube-policy/1`` JSON document, or None if none was set."""
        ...

    async def limits(self, domain_id: str) -> DomainLimits: ...

    async def record_usage(
        self,
        *,
        domain_id: str,
        user_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        requests: int = 1,
    ) -> None: ...

    async def record_audit(self, row: AuditRecord) -> None: ...

    def issuer(self) -> TokenSigner: ...
