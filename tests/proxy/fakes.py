"""An in-memory :class:`proxy.directory.Directory` and :class:`TokenSigner` for the gateway's
tests (P1's database-backed directory is tested on its own and end to end in test_e2e.py).

The fake keeps the contract's semantics: credentials are opaque bearer strings; a *PAT* is bound
to one domain (usable on plain ``/v1``), a *session* token names a user who may act in the
domains they are a member of (the route must name the domain). Unknown credentials are 401,
a domain the caller is not a member of (or that does not exist) is 403, exactly as the
directory's docstring says. Everything recorded (audit rows, usage) is kept for assertions.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

from proxy.directory import (
    ROLE_ACTIONS,
    AuditRecord,
    AuthError,
    BackendSpec,
    Caller,
    DomainLimits,
)

ISSUER_URL = "https://proxy.cube.test"


class FakeSigner:
    """Signs forwarded JWTs with an Ed25519 key, per the agent's token contract."""

    def __init__(self, issuer_url: str = ISSUER_URL) -> None:
        self._issuer_url = issuer_url
        self.kid = "fake-" + uuid.uuid4().hex[:8]
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.signed = 0

    @property
    def issuer_url(self) -> str:
        return self._issuer_url

    def sign_forward(
        self,
        caller: Caller,
        *,
        models: tuple[str, ...] | None = None,
        endpoints: tuple[str, ...] | None = None,
        ttl_seconds: int | None = None,
    ) -> str:
        ttl_seconds = 60 if ttl_seconds is None else ttl_seconds
        allowed: set[str] | None = None
        if caller.models is not None:
            allowed = set(caller.models)
        if models is not None:
            allowed = {m for m in models if caller.may_use_model(m, ollama_names=True)}
            if not allowed:
                raise AuthError(403, "no model allowed", code="model_forbidden")
        scope = ["inference"]
        scope += [f"model:{m}" for m in sorted(allowed or ())]
        scope += [f"endpoint:{e}" for e in endpoints or ()]
        now = int(time.time())
        claims = {
            "iss": self._issuer_url,
            "aud": caller.domain_alias,
            "sub": caller.user_id,
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(scope),
        }
        self.signed += 1
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(OKPAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "alg": "EdDSA", "use": "sig"})
        return {"keys": [jwk]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def decode(self, token: str, audience: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token,
            self.key.public_key(),
            algorithms=["EdDSA"],
            audience=audience,
            issuer=self._issuer_url,
        )
        return claims


@dataclass
class _Token:
    user_id: str
    kind: str  # "pat" | "access"
    domain_id: str | None = None  # PATs: the one domain
    token_id: str | None = None
    models: frozenset[str] | None = None
    actions: frozenset[str] | None = None  # PATs: a subset of the role's actions
    revoked: bool = False


@dataclass
class FakeDirectory:
    signer: FakeSigner = field(default_factory=FakeSigner)
    domains: dict[str, str] = field(default_factory=dict)  # alias -> id
    members: dict[tuple[str, str], str] = field(default_factory=dict)  # (domain, user) -> role
    tokens: dict[str, _Token] = field(default_factory=dict)
    backend_specs: dict[str, list[BackendSpec]] = field(default_factory=dict)
    policies: dict[str, bytes] = field(default_factory=dict)
    domain_limits: dict[str, DomainLimits] = field(default_factory=dict)
    audits: list[AuditRecord] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    # -- set-up helpers ----------------------------------------------------------------------

    def add_domain(self, alias: str, *, policy: bytes | None = None) -> str:
        domain_id = "dom-" + alias
        self.domains[alias] = domain_id
        if policy is not None:
            self.policies[domain_id] = policy
        return domain_id

    def add_member(self, alias: str, user_id: str, role: str = "member") -> None:
        self.members[(self.domains[alias], user_id)] = role

    def session_token(self, user_id: str) -> str:
        bearer = "sess-" + uuid.uuid4().hex
        self.tokens[bearer] = _Token(user_id=user_id, kind="access")
        return bearer

    def pat(
        self,
        alias: str,
        user_id: str,
        *,
        models: frozenset[str] | None = None,
        actions: frozenset[str] | None = None,
    ) -> str:
        bearer = "cube_pat_" + uuid.uuid4().hex
        self.tokens[bearer] = _Token(
            user_id=user_id,
            kind="pat",
            domain_id=self.domains[alias],
            token_id="pat-" + uuid.uuid4().hex[:12],
            models=models,
            actions=actions,
        )
        return bearer

    def add_backend(
        self,
        alias: str,
        url: str,
        *,
        backend_id: str | None = None,
        kind: str = "openai",
        models: tuple[str, ...] = (),
        enabled: bool = True,
    ) -> BackendSpec:
        domain_id = self.domains[alias]
        spec = BackendSpec(
            id=backend_id or "be-" + uuid.uuid4().hex[:8],
            domain_id=domain_id,
            url=url,
            kind=kind,  # type: ignore[arg-type]
            models=models,
            enabled=enabled,
        )
        self.backend_specs.setdefault(domain_id, []).append(spec)
        return spec

    def set_policy(self, alias: str, policy: bytes | dict[str, Any]) -> None:
        data = policy if isinstance(policy, bytes) else json.dumps(policy).encode()
        self.policies[self.domains[alias]] = data

    def set_limits(self, alias: str, limits: DomainLimits) -> None:
        self.domain_limits[self.domains[alias]] = limits

    # -- the Directory protocol ----------------------------------------------------------------

    async def authenticate(self, bearer: str, *, domain_alias: str | None) -> Caller:
        self._count("authenticate")
        token = self.tokens.get(bearer)
        if token is None or token.revoked:
            raise AuthError(401, "invalid or expired credential", code="invalid_token")
        if token.kind == "pat":
            assert token.domain_id is not None
            alias = next(a for a, d in self.domains.items() if d == token.domain_id)
            if domain_alias is not None and domain_alias != alias:
                raise AuthError(403, "this token is bound to another domain")
            domain_id = token.domain_id
        else:
            if domain_alias is None:
                raise AuthError(401, "name the domain in the path (/{domain}/v1/...)")
            domain_id = self.domains.get(domain_alias, "")
            alias = domain_alias
        role = self.members.get((domain_id, token.user_id))
        if role is None:
            raise AuthError(403, "not a member of this domain")
        actions = ROLE_ACTIONS[role]
        if token.actions is not None:
            actions = actions & token.actions
        return Caller(
            user_id=token.user_id,
            domain_id=domain_id,
            domain_alias=alias,
            actions=actions,
            token_kind="pat" if token.kind == "pat" else "access",
            token_id=token.token_id,
            models=token.models,
        )

    async def domain_by_alias(self, alias: str) -> tuple[str, str] | None:
        self._count("domain_by_alias")
        domain_id = self.domains.get(alias)
        return None if domain_id is None else (domain_id, alias)

    async def backends(self, domain_id: str) -> list[BackendSpec]:
        self._count("backends")
        return list(self.backend_specs.get(domain_id, []))

    async def backend_domains(self) -> list[str]:
        self._count("backend_domains")
        return sorted(d for d, specs in self.backend_specs.items() if any(s.enabled for s in specs))

    async def policy(self, domain_id: str) -> bytes | None:
        self._count("policy")
        return self.policies.get(domain_id)

    async def limits(self, domain_id: str) -> DomainLimits:
        self._count("limits")
        return self.domain_limits.get(domain_id, DomainLimits())

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
        self.usage.append(
            {
                "domain_id": domain_id,
                "user_id": user_id,
                "model": model,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "requests": requests,
            }
        )

    async def record_audit(self, row: AuditRecord) -> None:
        self.audits.append(row)

    def issuer(self) -> FakeSigner:
        return self.signer
