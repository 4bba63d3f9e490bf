"""Personal access tokens: shown once, stored as SHA-256 only, domain-bound, scoped to actions
and models, expiring, revocable."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import pytest
import sqlalchemy as sa

from proxy.db.schema import pats
from proxy.directory import AuthError
from proxy.identity import Forbidden, Identity, Invalid, NotFound, Unauthorized
from proxy.identity.models import Principal
from tests.proxy.conftest import dump_database, use_identity

PASSWORD = "member-password-1234"


async def _setup(identity: Identity) -> dict[str, Any]:
    """acme (owner, admin, member) and other (owner of acme is a member there too)."""
    out: dict[str, Any] = {}
    for name in ("owner", "admin", "member", "stranger"):
        user = await identity.create_user(email=f"{name}@example.com", password=PASSWORD)
        pair = await identity.login(f"{name}@example.com", PASSWORD)
        out[name] = await identity.authenticate_principal(pair.access_token)
        out[name + "_id"] = user.id
    out["acme"] = await identity.create_domain(alias="acme", name="", owner_id=out["owner_id"])
    out["other"] = await identity.create_domain(alias="other", name="", owner_id=out["owner_id"])
    access = await identity.domain_access(out["owner"], "acme")
    for role in ("admin", "member"):
        await identity.set_member(
            access, user_id=out[role + "_id"], role=role, platform_admin=False
        )
    return out


def test_a_pat_is_shown_once_and_only_its_hash_is_stored(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, secret = await identity.create_pat(env["member"], "acme", name="ci")
        assert secret.startswith("cube_pat_") and len(secret) >= 9 + 43
        assert pat.actions == {"inference"} and pat.models is None
        assert pat.domain_id == env["acme"].id and pat.name == "ci"
        listed = await identity.list_pats(user_id=env["member_id"])
        assert [p.id for p in listed] == [pat.id]
        assert secret not in repr(listed) and "token_hash" not in repr(listed[0].to_json())
        async with identity.db.read() as conn:
            stored = (
                await conn.execute(sa.select(pats.c.token_hash).where(pats.c.id == pat.id))
            ).scalar()
        assert stored == hashlib.sha256(secret.encode()).hexdigest()
        everything = await dump_database(identity.db)
        assert secret not in everything
        assert secret.removeprefix("cube_pat_") not in everything

    use_identity(database, body)


def test_a_pat_is_bound_to_its_domain(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        _, secret = await identity.create_pat(env["owner"], "acme")
        caller = await identity.authenticate(secret, domain_alias="acme")
        assert caller.domain_id == env["acme"].id and caller.token_kind == "pat"
        assert caller.token_id is not None and caller.token_id != secret
        # Plain /v1/... (no domain in the URL): the PAT's own domain.
        assert (await identity.authenticate(secret, domain_alias=None)).domain_alias == "acme"
        # Its owner is also in "other", but the token is not.
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(secret, domain_alias="other")
        assert caught.value.status == 403
        principal = await identity.authenticate_principal(secret)
        with pytest.raises(NotFound):
            await identity.domain_access(principal, "other")
        assert [d.alias for d, _ in await identity.list_domains(principal)] == ["acme"]

    use_identity(database, body)


def test_actions_are_limited_by_the_role_now_and_later(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        with pytest.raises(Forbidden, match="manage_backends"):
            await identity.create_pat(env["member"], "acme", actions=["manage_backends"])
        with pytest.raises(Invalid):
            await identity.create_pat(env["member"], "acme", actions=["fly"])
        with pytest.raises(Invalid):
            await identity.create_pat(env["member"], "acme", actions=[])
        _, secret = await identity.create_pat(
            env["admin"], "acme", actions=["inference", "manage_backends", "read_audit"]
        )
        caller = await identity.authenticate(secret, domain_alias="acme")
        assert caller.actions == {"inference", "manage_backends", "read_audit"}
        # Demoted to member: the token keeps only what the role still allows.
        owner = await identity.domain_access(env["owner"], "acme")
        await identity.set_member(
            owner, user_id=env["admin_id"], role="member", platform_admin=False
        )
        assert (await identity.authenticate(secret, domain_alias="acme")).actions == {"inference"}
        # Removed from the domain: the domain's tokens are revoked with the membership.
        await identity.remove_member(owner, user_id=env["admin_id"], platform_admin=False)
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(secret, domain_alias="acme")
        assert caught.value.status == 401

    use_identity(database, body)


def test_only_members_create_tokens_and_pats_cannot_mint_pats(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        with pytest.raises(NotFound):
            await identity.create_pat(env["stranger"], "acme")
        _, secret = await identity.create_pat(env["owner"], "acme", actions=["manage_members"])
        pat_principal = await identity.authenticate_principal(secret)
        with pytest.raises(Forbidden):
            await identity.create_pat(pat_principal, "acme")

    use_identity(database, body)


def test_model_scope(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, secret = await identity.create_pat(env["member"], "acme", models=["llama", "qwen"])
        assert pat.models == frozenset({"llama", "qwen"})
        caller = await identity.authenticate(secret, domain_alias="acme")
        assert caller.models == frozenset({"llama", "qwen"})
        assert caller.may_use_model("llama") and not caller.may_use_model("gpt")
        for bad in ([], "llama", ["a b"], [""]):
            with pytest.raises(Invalid):
                await identity.create_pat(env["member"], "acme", models=bad)

    use_identity(database, body)


def test_expiry(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, secret = await identity.create_pat(env["member"], "acme", expires_in=1)
        assert pat.expires_at is not None and pat.expires_at - pat.created_at == 1
        await identity.authenticate(secret, domain_alias="acme")
        await asyncio.sleep(1.1)
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(secret, domain_alias="acme")
        assert caught.value.status == 401 and caught.value.code == "token_expired"
        default, _ = await identity.create_pat(env["member"], "acme")
        assert default.expires_at is not None
        assert default.expires_at - default.created_at == 365 * 86400
        for bad in (0, -5, 10**9, "60", True):
            with pytest.raises(Invalid):
                await identity.create_pat(env["member"], "acme", expires_in=bad)

    use_identity(database, body)


def test_revocation_is_immediate_despite_the_cache(tmp_path: Any) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, secret = await identity.create_pat(env["member"], "acme")
        await identity.authenticate(secret, domain_alias="acme")  # cached now
        revoked = await identity.revoke_pat(env["member"], pat.id)
        assert revoked.revoked_at is not None
        with pytest.raises(AuthError) as caught:
            await identity.authenticate(secret, domain_alias="acme")
        assert caught.value.code == "token_revoked"
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(secret)

    use_identity(str(tmp_path / "p.db"), body, auth_cache_seconds=60)


def test_who_may_revoke(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, _ = await identity.create_pat(env["member"], "acme")
        # A stranger, and a member of another domain, are told it does not exist.
        with pytest.raises(NotFound):
            await identity.revoke_pat(env["stranger"], pat.id)
        with pytest.raises(NotFound):
            await identity.revoke_pat(env["stranger"], "0" * 32)
        # A domain admin (manage_members) may revoke a member's token.
        await identity.revoke_pat(env["admin"], pat.id)
        assert (await identity.get_pat(pat.id)).revoked_at is not None
        # A PAT may revoke itself, not its owner's other tokens.
        first, first_secret = await identity.create_pat(env["member"], "acme")
        second, _ = await identity.create_pat(env["member"], "acme")
        as_pat: Principal = await identity.authenticate_principal(first_secret)
        with pytest.raises(Forbidden):
            await identity.revoke_pat(as_pat, second.id)
        await identity.revoke_pat(as_pat, first.id)

    use_identity(database, body)


def test_disabled_users_tokens_stop_working(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        _, secret = await identity.create_pat(env["member"], "acme")
        await identity.update_user(env["member_id"], disabled=True)
        with pytest.raises(AuthError):
            await identity.authenticate(secret, domain_alias="acme")
        await identity.update_user(env["member_id"], disabled=False)
        await identity.authenticate(secret, domain_alias="acme")

    use_identity(database, body)


def test_last_use_is_recorded(database: str) -> None:
    async def body(identity: Identity) -> None:
        env = await _setup(identity)
        pat, secret = await identity.create_pat(env["member"], "acme")
        assert pat.last_used_at is None
        before = time.time()
        await identity.authenticate(secret, domain_alias="acme")
        for _ in range(100):
            used = (await identity.get_pat(pat.id)).last_used_at
            if used is not None:
                break
            await asyncio.sleep(0.02)
        assert used is not None and used >= before - 1

    use_identity(database, body)


def test_unknown_pats(database: str) -> None:
    async def body(identity: Identity) -> None:
        for token in ("cube_pat_", "cube_pat_" + "A" * 43, "cube_pat_\x00"):
            with pytest.raises(AuthError) as caught:
                await identity.authenticate(token, domain_alias=None)
            assert caught.value.status == 401

    use_identity(database, body)
