"""The admin API's right checks on the routes that change a domain: a member whose role (or
whose PAT) lacks the action is refused with 403 and nothing changes; and a platform
administrator's domain-bound PAT carries none of the platform powers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.proxy.conftest import AdminServer

PASSWORD = "user-password-12345"
POLICY = {"format": "cube-policy/1", "allow_simulated": True}
BACKEND = {"url": "https://10.1.2.3:8443", "kind": "vllm", "models": ["llama"]}


def _create_user(server: AdminServer, admin: str, email: str) -> tuple[str, str]:
    reply = server.request(
        "POST", "/admin/users", {"email": email, "password": PASSWORD, "name": email}, token=admin
    )
    assert reply.status == 201, reply.body
    return reply.json()["id"], server.token(email, PASSWORD)


def _pat(server: AdminServer, token: str, domain: str, actions: list[str]) -> str:
    reply = server.request(
        "POST", "/admin/tokens", {"domain": domain, "actions": actions}, token=token
    )
    assert reply.status == 201, reply.body
    return str(reply.json()["token"])


@dataclass
class Acme:
    owner: str
    member: str  # a session token of a plain member
    member_pat: str  # that member's PAT (inference only)
    audit_pat: str  # an owner's PAT with read_audit only
    member_id: str
    other_id: str  # a user who is not a member
    backend_id: str


@pytest.fixture
def acme(admin_server: AdminServer) -> Acme:
    s = admin_server
    admin = s.token()
    _, owner = _create_user(s, admin, "owner@example.com")
    member_id, member = _create_user(s, admin, "member@example.com")
    other_id, _ = _create_user(s, admin, "other@example.com")
    created = s.request(
        "POST",
        "/admin/domains",
        {"alias": "acme", "name": "Acme", "owner_email": "owner@example.com"},
        token=admin,
    )
    assert created.status == 201, created.body
    added = s.request(
        "POST", "/admin/domains/acme/members", {"email": "member@example.com"}, token=owner
    )
    assert added.status == 201 and added.json()["role"] == "member"
    assert s.request("PUT", "/admin/domains/acme/policy", POLICY, token=owner).status == 200
    backend = s.request("POST", "/admin/domains/acme/backends", BACKEND, token=owner)
    assert backend.status == 201, backend.body
    return Acme(
        owner=owner,
        member=member,
        member_pat=_pat(s, member, "acme", ["inference"]),
        audit_pat=_pat(s, owner, "acme", ["read_audit"]),
        member_id=member_id,
        other_id=other_id,
        backend_id=backend.json()["id"],
    )


def _attempts(acme: Acme) -> list[tuple[str, str, Any]]:
    backend = f"/admin/domains/acme/backends/{acme.backend_id}"
    return [
        ("PATCH", "/admin/domains/acme", {"name": "Taken over"}),  # manage_domain
        ("DELETE", "/admin/domains/acme/policy", None),  # manage_domain
        ("POST", "/admin/domains/acme/backends", {**BACKEND, "url": "https://10.9.9.9:8443"}),
        ("PATCH", backend, {"enabled": False}),  # manage_backends
        ("DELETE", backend, None),  # manage_backends
        ("POST", "/admin/domains/acme/members", {"user_id": acme.other_id}),  # manage_members
        ("PUT", f"/admin/domains/acme/members/{acme.member_id}", {"role": "admin"}),
    ]


@pytest.mark.parametrize("credential", ["member session", "member PAT", "owner's audit-only PAT"])
def test_a_caller_without_the_right_cannot_change_the_domain(
    admin_server: AdminServer, acme: Acme, credential: str
) -> None:
    s = admin_server
    token = {
        "member session": acme.member,
        "member PAT": acme.member_pat,
        "owner's audit-only PAT": acme.audit_pat,
    }[credential]
    assert s.request("GET", "/admin/domains/acme", token=token).status == 200  # it sees it
    for method, path, body in _attempts(acme):
        reply = s.request(method, path, body, token=token)
        assert reply.status == 403, (credential, method, path, reply.status, reply.body)
        assert reply.json()["error"]["type"] == "permission_error"
    # Nothing changed.
    owner = acme.owner
    assert s.request("GET", "/admin/domains/acme", token=owner).json()["name"] == "Acme"
    assert s.request("GET", "/admin/domains/acme/policy", token=owner).json() == POLICY
    backends = s.request("GET", "/admin/domains/acme/backends", token=owner).json()["backends"]
    assert [(b["id"], b["url"], b["enabled"]) for b in backends] == [
        (acme.backend_id, BACKEND["url"], True)
    ]
    members = s.request("GET", "/admin/domains/acme/members", token=owner).json()["members"]
    assert {m["user_id"]: m["role"] for m in members}[acme.member_id] == "member"
    assert acme.other_id not in {m["user_id"] for m in members}


def test_the_owner_may_do_all_of_it(admin_server: AdminServer, acme: Acme) -> None:
    """The same requests succeed with the right (so the 403s above are about the right)."""
    s = admin_server
    for method, path, body in _attempts(acme):
        reply = s.request(method, path, body, token=acme.owner)
        assert reply.status in (200, 201, 204), (method, path, reply.status, reply.body)


def test_a_platform_admins_domain_pat_has_no_platform_powers(admin_server: AdminServer) -> None:
    s = admin_server
    admin = s.token()
    created = s.request("POST", "/admin/domains", {"alias": "ops", "name": "Ops"}, token=admin)
    assert created.status == 201, created.body  # the platform admin owns it
    every = ["inference", "read_audit", "manage_members", "manage_backends", "manage_domain"]
    pat = _pat(s, admin, "ops", every)
    assert s.request("GET", "/admin/me", token=pat).json()["token_kind"] == "pat"
    new_user = {"email": "mallory@example.com", "password": PASSWORD}
    for method, path, body in (
        ("POST", "/admin/users", new_user),
        ("GET", "/admin/users", None),
        ("POST", "/admin/domains", {"alias": "grabbed", "name": "Grabbed"}),
    ):
        reply = s.request(method, path, body, token=pat)
        assert reply.status == 403, (method, path, reply.status, reply.body)
        assert reply.json()["error"]["type"] == "permission_error"
    users = s.request("GET", "/admin/users", token=admin).json()["users"]
    assert "mallory@example.com" not in {u["email"] for u in users}
    assert s.request("GET", "/admin/domains/grabbed", token=admin).status == 404
    # The same requests with the admin's login succeed.
    assert s.request("POST", "/admin/users", new_user, token=admin).status == 201
    grabbed = {"alias": "grabbed", "name": "Grabbed"}
    assert s.request("POST", "/admin/domains", grabbed, token=admin).status == 201
