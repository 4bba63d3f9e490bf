"""Domains, members and roles, backends, policies, limits, usage and audit (the Directory)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from attestation.policy import Policy
from proxy.directory import (
    RESERVED_ALIASES,
    ROLE_ACTIONS,
    AuditRecord,
    AuthError,
    BackendSpec,
    DomainLimits,
)
from proxy.gateway import forward
from proxy.identity import Conflict, Forbidden, Identity, Invalid, NotFound
from proxy.identity.models import Principal
from proxy.identity.records import read_audit, usage_summary
from tests.proxy.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, use_identity

PASSWORD = "member-password-1234"
POLICY = {"format": "cube-policy/1", "allow_simulated": True, "max_evidence_age_seconds": 60}


async def _user(identity: Identity, email: str) -> tuple[str, str]:
    """(user id, access token) of a new user."""
    user = await identity.create_user(email=email, password=PASSWORD)
    pair = await identity.login(email, PASSWORD)
    return user.id, pair.access_token


async def _admin(identity: Identity) -> Principal:
    pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    return await identity.authenticate_principal(pair.access_token)


def test_domain_crud(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        domain = await identity.create_domain(alias="acme", name="Acme Inc", owner_id=owner_id)
        assert domain.alias == "acme" and domain.name == "Acme Inc" and not domain.has_policy
        assert domain.limits == DomainLimits()
        assert await identity.get_domain("acme") == domain
        assert await identity.get_domain(domain.id) == domain
        assert await identity.domain_by_alias("acme") == (domain.id, "acme")
        assert await identity.domain_by_alias("nope") is None
        renamed = await identity.update_domain(domain.id, name="Acme")
        assert renamed.name == "Acme" and renamed.alias == "acme"
        with pytest.raises(Conflict):
            await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        members = await identity.list_members(domain.id)
        assert [(m.user_id, m.role) for m in members] == [(owner_id, "owner")]
        await identity.delete_domain(domain.id)
        with pytest.raises(NotFound):
            await identity.get_domain("acme")
        assert await identity.domain_by_alias("acme") is None
        # The alias is not given to anyone else: agents configured for it (their tokens'
        # audience) may still be running, and would take the new domain's tokens.
        with pytest.raises(Conflict, match="exists or existed"):
            await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        assert await identity.domain_by_alias("acme") is None

    use_identity(database, body)


@pytest.mark.parametrize(
    "alias",
    ["", "Acme", "-acme", "acme-", "a" * 64, "a_b", "a.b", "v1", "admin", "api", "0" * 32, None, 7],
)
def test_bad_aliases(tmp_path: Any, alias: object) -> None:
    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None
        with pytest.raises(Invalid):
            await identity.create_domain(alias=alias, name="", owner_id=admin.id)

    use_identity(str(tmp_path / "p.db"), body)


def test_roles_grant_their_actions(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, owner_token = await _user(identity, "owner@example.com")
        domain = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        owner = await identity.domain_access(
            await identity.authenticate_principal(owner_token), "acme"
        )
        tokens = {"owner": owner_token}
        for role in ("admin", "member"):
            user_id, token = await _user(identity, f"{role}@example.com")
            await identity.set_member(owner, user_id=user_id, role=role, platform_admin=False)
            tokens[role] = token
        for role, token in tokens.items():
            caller = await identity.authenticate(token, domain_alias="acme")
            assert caller.actions == ROLE_ACTIONS[role]
            assert caller.domain_id == domain.id and caller.token_kind == "access"
            assert caller.models is None and caller.token_id is None
        assert ROLE_ACTIONS["member"] == {"inference"}
        assert {"manage_domain", "manage_members", "manage_backends", "read_audit"} <= (
            ROLE_ACTIONS["admin"]
        )

    use_identity(database, body)


def test_owner_rules(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, owner_token = await _user(identity, "owner@example.com")
        await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        owner = await identity.domain_access(
            await identity.authenticate_principal(owner_token), "acme"
        )
        admin_id, admin_token = await _user(identity, "admin@example.com")
        other_id, _ = await _user(identity, "other@example.com")
        await identity.set_member(owner, user_id=admin_id, role="admin", platform_admin=False)
        admin = await identity.domain_access(
            await identity.authenticate_principal(admin_token), "acme"
        )
        # A domain admin manages members but cannot make or unmake owners.
        await identity.set_member(admin, user_id=other_id, role="member", platform_admin=False)
        with pytest.raises(Forbidden):
            await identity.set_member(admin, user_id=other_id, role="owner", platform_admin=False)
        with pytest.raises(Forbidden):
            await identity.set_member(admin, user_id=owner_id, role="member", platform_admin=False)
        with pytest.raises(Forbidden):
            await identity.remove_member(admin, user_id=owner_id, platform_admin=False)
        # The last owner stays.
        with pytest.raises(Conflict, match="owner"):
            await identity.set_member(owner, user_id=owner_id, role="admin", platform_admin=False)
        with pytest.raises(Conflict, match="owner"):
            await identity.remove_member(owner, user_id=owner_id, platform_admin=True)
        await identity.set_member(owner, user_id=other_id, role="owner", platform_admin=False)
        await identity.set_member(owner, user_id=owner_id, role="member", platform_admin=False)
        roles = {m.user_id: m.role for m in await identity.list_members(owner.domain.id)}
        assert roles == {owner_id: "member", admin_id: "admin", other_id: "owner"}
        await identity.remove_member(admin, user_id=owner_id, platform_admin=False)
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(owner_token, domain_alias="acme")
        assert caught.value.status == 403
        with pytest.raises(Invalid):
            await identity.set_member(admin, user_id=other_id, role="king", platform_admin=False)

    use_identity(database, body)


def test_non_members_and_unknown_domains_look_the_same(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        _, stranger = await _user(identity, "stranger@example.com")
        messages = set()
        for alias in ("acme", "does-not-exist"):
            with pytest.raises(AuthError) as caught:
                await identity.authenticate(stranger, domain_alias=alias)
            assert caught.value.status == 403
            messages.add(caught.value.message)
        assert len(messages) == 1
        principal = await identity.authenticate_principal(stranger)
        for ref in ("acme", "does-not-exist"):
            with pytest.raises(NotFound, match="no such domain"):
                await identity.domain_access(principal, ref)
        # An access token needs the domain named: only PATs are bound to one.
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(stranger, domain_alias=None)
        assert caught.value.status == 403
        with pytest.raises(AuthError) as caught:
            await identity.authenticate("garbage", domain_alias="acme")
        assert caught.value.status == 401

    use_identity(database, body)


def test_platform_admins_manage_but_do_not_read_audit_or_infer(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        admin = await _admin(identity)
        access = await identity.domain_access(admin, "acme")
        assert access.role is None
        assert access.actions == {"manage_domain", "manage_members", "manage_backends"}
        with pytest.raises(Forbidden):
            access.require("read_audit")
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        with pytest.raises(AuthError):
            await identity.authenticate(pair.access_token, domain_alias="acme")
        listed = [d.alias for d, _ in await identity.list_domains(admin)]
        assert listed == ["acme"]

    use_identity(database, body)


def test_backends(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        acme = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        other = await identity.create_domain(alias="other", name="", owner_id=owner_id)
        spec = await identity.add_backend(
            acme.id, url="https://10.0.0.5:8443/", kind="vllm", models=["llama", "llama"]
        )
        assert spec == BackendSpec(
            id=spec.id,
            domain_id=acme.id,
            url="https://10.0.0.5:8443",
            kind="vllm",
            models=("llama",),
            enabled=True,
        )
        second = await identity.add_backend(
            acme.id, url="https://agent.example", kind="ollama", models=["qwen"], enabled=False
        )
        assert second.url == "https://agent.example:443"
        assert await identity.backends(acme.id) == [spec, second]
        assert await identity.backends(other.id) == []
        with pytest.raises(Conflict):
            await identity.add_backend(acme.id, url="https://10.0.0.5:8443", kind="vllm", models=[])
        # Nor in another domain: an agent serves one (another tenant registering it could
        # spend its evidence rate and knock it out of this domain's service).
        with pytest.raises(Conflict, match="already a backend"):
            await identity.add_backend(
                other.id, url="https://10.0.0.5:8443/", kind="vllm", models=[]
            )
        theirs = await identity.add_backend(
            other.id, url="https://10.0.0.6:8443", kind="vllm", models=[]
        )
        with pytest.raises(Conflict):
            await identity.update_backend(other.id, theirs.id, {"url": "https://10.0.0.5:8443"})
        changed = await identity.update_backend(
            acme.id, second.id, {"enabled": True, "models": ["qwen", "phi"]}
        )
        assert changed.enabled and changed.models == ("qwen", "phi")
        assert (await identity.backends(acme.id))[1] == changed
        # Another domain's backend is not reachable through this domain.
        with pytest.raises(NotFound):
            await identity.get_backend(other.id, spec.id)
        with pytest.raises(NotFound):
            await identity.update_backend(other.id, spec.id, {"enabled": False})
        with pytest.raises(NotFound):
            await identity.remove_backend(other.id, spec.id)
        await identity.remove_backend(acme.id, spec.id)
        assert [b.id for b in await identity.backends(acme.id)] == [second.id]

    use_identity(database, body)


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "http://10.0.0.5:8443", "kind": "vllm", "models": []},
        {"url": "https://user:pw@10.0.0.5", "kind": "vllm", "models": []},
        {"url": "https://10.0.0.5/v1", "kind": "vllm", "models": []},
        {"url": "https://10.0.0.5?x=1", "kind": "vllm", "models": []},
        {"url": "https://:8443", "kind": "vllm", "models": []},
        {"url": "https://10.0.0.5:99999", "kind": "vllm", "models": []},
        {"url": "https://10.0.0.5", "kind": "tgi", "models": []},
        {"url": "https://10.0.0.5", "kind": "vllm", "models": "llama"},
        {"url": "https://10.0.0.5", "kind": "vllm", "models": ["has space"]},
        {"url": "https://10.0.0.5", "kind": "vllm", "models": [], "enabled": "yes"},
    ],
)
def test_bad_backends(tmp_path: Any, fields: dict[str, Any]) -> None:
    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None
        domain = await identity.create_domain(alias="acme", name="", owner_id=admin.id)
        with pytest.raises(Invalid):
            await identity.add_backend(domain.id, **fields)
        assert await identity.backends(domain.id) == []

    use_identity(str(tmp_path / "p.db"), body)


def test_policies_are_validated_before_they_are_stored(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        domain = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        assert await identity.policy(domain.id) is None
        stored = await identity.set_policy(domain.id, POLICY)
        assert stored == POLICY
        raw = await identity.policy(domain.id)
        assert raw is not None
        assert Policy.from_json(json.loads(raw)).max_evidence_age_seconds == 60
        assert (await identity.get_domain(domain.id)).has_policy
        for bad in (
            {"format": "cube-policy/2"},
            {"format": "cube-policy/1", "unknown_key": 1},
            {"format": "cube-policy/1", "model_digests": None},
            {"format": "cube-policy/1", "platforms": ["sgx"]},
            {"format": "cube-policy/1", "model_digests": ["md5:abc"]},
            ["not", "an", "object"],
        ):
            with pytest.raises(Invalid) as caught:
                await identity.set_policy(domain.id, bad)
            assert caught.value.code == "invalid_policy"
        assert await identity.policy(domain.id) == raw  # unchanged by the refusals
        await identity.set_policy(domain.id, None)
        assert await identity.policy(domain.id) is None

    use_identity(database, body)


def test_limits(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        domain = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        assert await identity.limits(domain.id) == DomainLimits()
        limits = await identity.set_limits(
            domain.id, {"requests_per_minute": 100, "token_tokens_per_minute": 5000}, replace=False
        )
        assert limits == DomainLimits(100, None, None, 5000)
        limits = await identity.set_limits(domain.id, {"tokens_per_minute": 9}, replace=False)
        assert limits == DomainLimits(100, 9, None, 5000)
        limits = await identity.set_limits(domain.id, {"tokens_per_minute": 7}, replace=True)
        assert limits == DomainLimits(None, 7, None, None)
        assert await identity.limits(domain.id) == limits
        bads: list[dict[str, object]] = [
            {"requests_per_minute": 0},
            {"requests_per_minute": "5"},
            {"rpm": 5},
            {"requests_per_minute": True},
        ]
        for bad in bads:
            with pytest.raises(Invalid):
                await identity.set_limits(domain.id, bad, replace=False)
        assert await identity.limits(domain.id) == limits

    use_identity(database, body)


def _record(domain_id: str, **overrides: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "domain_id": domain_id,
        "user_id": "u1",
        "route": "/v1/chat/completions",
        "status": 200,
        "when": datetime.now(UTC),
        "model": "llama",
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "latency_ms": 12.5,
        "evidence_digest": "sha256:" + "ab" * 32,
        "backend_id": "b1",
        "token_id": "t1",
    }
    values.update(overrides)
    return AuditRecord(**values)


def test_audit_rows_are_committed_and_kept_per_domain(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        acme = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        other = await identity.create_domain(alias="other", name="", owner_id=owner_id)
        # Many at once: group commit puts them in few transactions, every one is stored.
        await asyncio.gather(
            *(identity.record_audit(_record(acme.id, status=200 + i % 3)) for i in range(300)),
            identity.record_audit(
                _record(
                    other.id,
                    event="attestation_failed",
                    status=503,
                    detail="measurement not in policy",
                    extra={"agent": "https://10.0.0.9:8443"},
                )
            ),
        )
        rows = await read_audit(identity.db, acme.id, limit=1000)
        assert len(rows) == 300 and {r["domain_id"] for r in rows} == {acme.id}
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
        first = rows[0]
        assert first["model"] == "llama" and first["prompt_tokens"] == 11
        assert first["evidence_digest"] == "sha256:" + "ab" * 32
        page = await read_audit(identity.db, acme.id, limit=10, before_id=rows[9]["id"])
        assert [r["id"] for r in page] == [r["id"] for r in rows[10:20]]
        failed = await read_audit(identity.db, other.id, event="attestation_failed")
        assert len(failed) == 1 and failed[0]["detail"] == "measurement not in policy"
        assert failed[0]["extra"] == {"agent": "https://10.0.0.9:8443"}

    use_identity(database, body)


def test_usage_is_summed_per_user_and_model(database: str) -> None:
    async def body(identity: Identity) -> None:
        owner_id, _ = await _user(identity, "owner@example.com")
        acme = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        other = await identity.create_domain(alias="other", name="", owner_id=owner_id)
        await asyncio.gather(
            *(
                identity.record_usage(
                    domain_id=acme.id, user_id=u, model=m, prompt_tokens=10, completion_tokens=3
                )
                for u, m in [("u1", "a"), ("u1", "a"), ("u1", "b"), ("u2", "a")]
            ),
            identity.record_usage(
                domain_id=other.id, user_id="u1", model="a", prompt_tokens=1, completion_tokens=1
            ),
        )
        summary = await usage_summary(identity.db, acme.id)
        assert summary == [
            {
                "user_id": "u1",
                "model": "a",
                "requests": 2,
                "prompt_tokens": 20,
                "completion_tokens": 6,
            },
            {
                "user_id": "u1",
                "model": "b",
                "requests": 1,
                "prompt_tokens": 10,
                "completion_tokens": 3,
            },
            {
                "user_id": "u2",
                "model": "a",
                "requests": 1,
                "prompt_tokens": 10,
                "completion_tokens": 3,
            },
        ]
        assert await usage_summary(identity.db, acme.id, since=2**40) == []

    use_identity(database, body)


def test_directory_answers_are_fresh_after_local_changes(tmp_path: Any) -> None:
    """With the auth cache on, changes made through this process are seen at once."""

    async def body(identity: Identity) -> None:
        owner_id, owner_token = await _user(identity, "owner@example.com")
        member_id, member_token = await _user(identity, "member@example.com")
        domain = await identity.create_domain(alias="acme", name="", owner_id=owner_id)
        owner = await identity.domain_access(
            await identity.authenticate_principal(owner_token), "acme"
        )
        await identity.set_member(owner, user_id=member_id, role="member", platform_admin=False)
        assert (await identity.authenticate(member_token, domain_alias="acme")).actions == {
            "inference"
        }
        assert await identity.backends(domain.id) == []
        await identity.add_backend(domain.id, url="https://a.example", kind="vllm", models=["m"])
        assert len(await identity.backends(domain.id)) == 1
        await identity.set_limits(domain.id, {"requests_per_minute": 5}, replace=False)
        assert (await identity.limits(domain.id)).requests_per_minute == 5
        await identity.set_member(owner, user_id=member_id, role="admin", platform_admin=False)
        assert (
            "read_audit" in (await identity.authenticate(member_token, domain_alias="acme")).actions
        )
        await identity.remove_member(owner, user_id=member_id, platform_admin=False)
        with pytest.raises(AuthError):
            await identity.authenticate(member_token, domain_alias="acme")

    use_identity(str(tmp_path / "p.db"), body, auth_cache_seconds=60)


@pytest.mark.parametrize("alias", sorted(RESERVED_ALIASES))
def test_every_route_segment_the_gateway_reserves_is_refused_as_an_alias(
    tmp_path: Any, alias: str
) -> None:
    """The gateway never reads these first path segments as a domain (forward.py), so the
    directory must never create a domain by that alias."""

    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None
        with pytest.raises(Invalid):
            await identity.create_domain(alias=alias, name="", owner_id=admin.id)

    use_identity(str(tmp_path / "p.db"), body)
    assert forward.RESERVED_ALIASES is RESERVED_ALIASES
