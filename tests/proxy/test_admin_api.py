"""The REST admin API over HTTP: every route, JSON errors, permissions, cross-domain isolation,
secrets shown once and never logged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.identity import IDENTITY
from tests.proxy.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, AdminServer, dump_database

PASSWORD = "user-password-12345"
POLICY = {"format": "cube-policy/1", "allow_simulated": True}


def _error(reply: Any) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def _create_user(server: AdminServer, admin: str, email: str) -> tuple[str, str]:
    reply = server.request(
        "POST", "/admin/users", {"email": email, "password": PASSWORD, "name": email}, token=admin
    )
    assert reply.status == 201, reply.body
    return reply.json()["id"], server.token(email, PASSWORD)


# -- auth routes ---------------------------------------------------------------------------------


def test_login_refresh_logout_and_jwks(admin_server: AdminServer) -> None:
    s = admin_server
    pair = s.login()
    assert pair["token_type"] == "Bearer" and pair["expires_in"] == 900
    jwks = s.request("GET", "/.well-known/jwks.json")
    assert jwks.status == 200 and jwks.json()["keys"][0]["alg"] == "EdDSA"
    assert all("d" not in k for k in jwks.json()["keys"])
    me = s.request("GET", "/admin/me", token=pair["access_token"])
    assert me.status == 200 and me.json()["user"]["email"] == ADMIN_EMAIL
    assert me.json()["token_kind"] == "access"

    refreshed = s.request("POST", "/auth/refresh", {"refresh_token": pair["refresh_token"]})
    assert refreshed.status == 200 and refreshed.headers["Cache-Control"] == "no-store"
    new = refreshed.json()
    reused = s.request("POST", "/auth/refresh", {"refresh_token": pair["refresh_token"]})
    assert reused.status == 401 and _error(reused)["code"] == "refresh_token_reused"
    assert s.request("GET", "/admin/me", token=new["access_token"]).status == 401

    again = s.login()
    out = s.request("POST", "/auth/logout", token=again["access_token"])
    assert out.status == 204
    assert s.request("GET", "/admin/me", token=again["access_token"]).status == 401
    third = s.login()
    out = s.request("POST", "/auth/logout", {"refresh_token": third["refresh_token"]})
    assert out.status == 204
    assert (
        s.request("POST", "/auth/refresh", {"refresh_token": third["refresh_token"]}).status == 401
    )
    assert s.request("POST", "/auth/logout", {}).status == 400


def test_login_failures(admin_server: AdminServer) -> None:
    s = admin_server
    wrong = s.request("POST", "/auth/login", {"email": ADMIN_EMAIL, "password": "nope-nope-nope"})
    assert wrong.status == 401 and _error(wrong)["code"] == "invalid_credentials"
    assert "WWW-Authenticate" in wrong.headers
    missing = s.request("POST", "/auth/login", {"email": ADMIN_EMAIL})
    assert missing.status == 400
    garbage = s.request("POST", "/auth/login", raw=b"{not json", headers={"Content-Type": "x"})
    assert garbage.status == 400 and "JSON" in _error(garbage)["message"]
    array = s.request("POST", "/auth/login", ["a"])
    assert array.status == 400
    for _ in range(9):
        s.request("POST", "/auth/login", {"email": ADMIN_EMAIL, "password": "nope-nope-nope"})
    throttled = s.request("POST", "/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert throttled.status == 429 and int(throttled.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer a.b.c"],
)
def test_admin_routes_need_a_valid_bearer(admin_server: AdminServer, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for path in ("/admin/me", "/admin/users", "/admin/domains", "/admin/tokens"):
        reply = admin_server.request("GET", path, headers=headers)
        assert reply.status == 401, path
        assert _error(reply)["type"] == "authentication_error"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")


# -- users ---------------------------------------------------------------------------------------


def test_user_routes(admin_server: AdminServer) -> None:
    s = admin_server
    admin = s.token()
    reply = s.request(
        "POST", "/admin/users", {"email": "Jo@Example.com", "password": PASSWORD}, token=admin
    )
    assert reply.status == 201
    jo = reply.json()
    assert jo["email"] == "jo@example.com" and "password" not in reply.body.decode()
    assert PASSWORD not in reply.body.decode()
    dup = s.request("POST", "/admin/users", {"email": "jo@example.com"}, token=admin)
    assert dup.status == 409
    unknown = s.request("POST", "/admin/users", {"email": "x@y.test", "role": "god"}, token=admin)
    assert unknown.status == 400 and "role" in _error(unknown)["message"]
    listed = s.request("GET", "/admin/users", token=admin).json()["users"]
    assert {u["email"] for u in listed} == {ADMIN_EMAIL, "jo@example.com"}
    assert "hash" not in str(listed) and "$argon2" not in str(listed)

    jo_token = s.token("jo@example.com", PASSWORD)
    # A user sees and renames themself, nobody else; cannot make themself admin.
    assert s.request("GET", f"/admin/users/{jo['id']}", token=jo_token).status == 200
    admin_id = s.request("GET", "/admin/me", token=admin).json()["user"]["id"]
    assert s.request("GET", f"/admin/users/{admin_id}", token=jo_token).status == 404
    assert s.request("GET", "/admin/users", token=jo_token).status == 403
    renamed = s.request("PATCH", f"/admin/users/{jo['id']}", {"name": "Jo"}, token=jo_token)
    assert renamed.status == 200 and renamed.json()["name"] == "Jo"
    escalate = s.request("PATCH", f"/admin/users/{jo['id']}", {"is_admin": True}, token=jo_token)
    assert escalate.status == 403
    # Changing one's own password needs the current one.
    no_current = s.request(
        "PATCH", f"/admin/users/{jo['id']}", {"password": "another-pass-123"}, token=jo_token
    )
    assert no_current.status == 400
    wrong_current = s.request(
        "PATCH",
        f"/admin/users/{jo['id']}",
        {"password": "another-pass-123", "current_password": "wrong-wrong-wrong"},
        token=jo_token,
    )
    assert wrong_current.status == 403
    changed = s.request(
        "PATCH",
        f"/admin/users/{jo['id']}",
        {"password": "another-pass-123", "current_password": PASSWORD},
        token=jo_token,
    )
    assert changed.status == 200
    assert s.request("GET", "/admin/me", token=jo_token).status == 401  # sessions ended
    jo_token = s.token("jo@example.com", "another-pass-123")

    disabled = s.request("PATCH", f"/admin/users/{jo['id']}", {"disabled": True}, token=admin)
    assert disabled.status == 200 and disabled.json()["disabled"] is True
    assert s.request("GET", "/admin/me", token=jo_token).status == 401
    assert s.request("DELETE", f"/admin/users/{jo['id']}", token=admin).status == 204
    assert s.request("GET", f"/admin/users/{jo['id']}", token=admin).status == 404
    last = s.request("DELETE", f"/admin/users/{admin_id}", token=admin)
    assert last.status == 409


# -- domains, members, backends, policy, limits, audit, tokens -----------------------------------


def test_domain_lifecycle_over_http(admin_server: AdminServer) -> None:
    s = admin_server
    admin = s.token()
    owner_id, owner = _create_user(s, admin, "owner@example.com")
    member_id, member = _create_user(s, admin, "member@example.com")

    created = s.request(
        "POST",
        "/admin/domains",
        {"alias": "acme", "name": "Acme", "owner_email": "owner@example.com"},
        token=admin,
    )
    assert created.status == 201
    domain = created.json()
    assert s.request("POST", "/admin/domains", {"alias": "acme"}, token=admin).status == 409
    assert s.request("POST", "/admin/domains", {"alias": "Bad!"}, token=admin).status == 400
    assert s.request("POST", "/admin/domains", {"alias": "mine"}, token=owner).status == 403

    got = s.request("GET", "/admin/domains/acme", token=owner).json()
    assert got["role"] == "owner" and got["id"] == domain["id"]
    assert s.request("GET", f"/admin/domains/{domain['id']}", token=owner).status == 200
    assert (
        s.request("PATCH", "/admin/domains/acme", {"name": "ACME"}, token=owner).json()["name"]
        == "ACME"
    )

    added = s.request(
        "POST", "/admin/domains/acme/members", {"email": "member@example.com"}, token=owner
    )
    assert added.status == 201 and added.json()["role"] == "member"
    members = s.request("GET", "/admin/domains/acme/members", token=owner).json()["members"]
    assert {(m["user_id"], m["role"]) for m in members} == {
        (owner_id, "owner"),
        (member_id, "member"),
    }
    # A plain member uses the domain but does not manage it.
    assert s.request("GET", "/admin/domains/acme", token=member).status == 200
    for method, path, body in (
        ("GET", "/admin/domains/acme/members", None),
        ("GET", "/admin/domains/acme/backends", None),
        ("PUT", "/admin/domains/acme/policy", POLICY),
        ("PATCH", "/admin/domains/acme/limits", {"requests_per_minute": 1}),
        ("GET", "/admin/domains/acme/audit", None),
        ("DELETE", "/admin/domains/acme", None),
    ):
        reply = s.request(method, path, body, token=member)
        assert reply.status == 403, (method, path)
        assert _error(reply)["type"] == "permission_error"
    promoted = s.request(
        "PUT", f"/admin/domains/acme/members/{member_id}", {"role": "admin"}, token=owner
    )
    assert promoted.status == 200 and promoted.json()["role"] == "admin"
    member_view = s.request("GET", f"/admin/domains/acme/members/{member_id}", token=member)
    assert member_view.json()["role"] == "admin"

    backend = s.request(
        "POST",
        "/admin/domains/acme/backends",
        {"url": "https://10.1.2.3:8443", "kind": "vllm", "models": ["llama"]},
        token=member,
    )
    assert backend.status == 201
    backend_id = backend.json()["id"]
    plain = s.request(
        "POST",
        "/admin/domains/acme/backends",
        {"url": "http://10.1.2.3:8000", "kind": "vllm", "models": ["llama"]},
        token=member,
    )
    assert plain.status == 400 and "https" in _error(plain)["message"]
    patched = s.request(
        "PATCH", f"/admin/domains/acme/backends/{backend_id}", {"enabled": False}, token=member
    )
    assert patched.json()["enabled"] is False
    assert s.request("GET", f"/admin/domains/acme/backends/{backend_id}", token=member).json()[
        "models"
    ] == ["llama"]
    assert (
        len(s.request("GET", "/admin/domains/acme/backends", token=owner).json()["backends"]) == 1
    )

    assert s.request("GET", "/admin/domains/acme/policy", token=owner).status == 404
    bad = s.request("PUT", "/admin/domains/acme/policy", {"format": "nope"}, token=owner)
    assert bad.status == 400 and _error(bad)["code"] == "invalid_policy"
    # Judged by the gateway's own loader on the bytes sent: a duplicate key (which a plain
    # parse merges, last one wins) is refused.
    duplicated = b'{"format": "cube-policy/1", "allow_simulated": false, "allow_simulated": true}'
    twice = s.request("PUT", "/admin/domains/acme/policy", raw=duplicated, token=owner)
    assert twice.status == 400 and _error(twice)["code"] == "invalid_policy"
    assert s.request("PUT", "/admin/domains/acme/policy", POLICY, token=owner).json() == POLICY
    assert s.request("GET", "/admin/domains/acme/policy", token=member).json() == POLICY
    limits = s.request(
        "PATCH", "/admin/domains/acme/limits", {"requests_per_minute": 60}, token=owner
    )
    assert limits.json()["requests_per_minute"] == 60
    replaced = s.request("PUT", "/admin/domains/acme/limits", {"tokens_per_minute": 9}, token=owner)
    assert replaced.json() == {
        "requests_per_minute": None,
        "tokens_per_minute": 9,
        "token_requests_per_minute": None,
        "token_tokens_per_minute": None,
    }
    assert (
        s.request("GET", "/admin/domains/acme/limits", token=member).json()["tokens_per_minute"]
        == 9
    )

    token = s.request(
        "POST",
        "/admin/tokens",
        {"domain": "acme", "name": "ci", "actions": ["inference"], "models": ["llama"]},
        token=owner,
    )
    assert token.status == 201 and token.json()["token"].startswith("cube_pat_")
    assert token.headers["Cache-Control"] == "no-store"
    token_id, secret = token.json()["id"], token.json()["token"]
    mine = s.request("GET", "/admin/tokens", token=owner).json()["tokens"]
    assert [t["id"] for t in mine] == [token_id] and secret not in str(mine)
    assert s.request("GET", f"/admin/tokens/{token_id}", token=owner).json()["name"] == "ci"
    domain_tokens = s.request("GET", "/admin/domains/acme/tokens", token=member).json()["tokens"]
    assert [t["id"] for t in domain_tokens] == [token_id]
    assert secret not in s.request("GET", f"/admin/tokens/{token_id}", token=member).body.decode()
    pat_me = s.request("GET", "/admin/me", token=secret).json()
    assert pat_me["token_kind"] == "pat" and pat_me["token_id"] == token_id
    # An inference-only PAT cannot manage anything.
    assert s.request("GET", "/admin/domains/acme/backends", token=secret).status == 403
    assert s.request("POST", "/admin/tokens", {"domain": "acme"}, token=secret).status == 403
    revoked = s.request("DELETE", f"/admin/tokens/{token_id}", token=owner)
    assert revoked.status == 200 and revoked.json()["revoked_at"] is not None
    assert s.request("GET", "/admin/me", token=secret).status == 401

    audit = s.request("GET", "/admin/domains/acme/audit?limit=100", token=owner).json()["audit"]
    events = [(row["event"], row["route"]) for row in audit]
    assert ("admin", "POST /admin/domains/acme/backends") in events
    assert ("admin", f"PUT /admin/domains/acme/members/{member_id}") in events
    assert ("admin", f"DELETE /admin/tokens/{token_id}") in events
    assert all(secret not in str(row) and PASSWORD not in str(row) for row in audit)
    only_two = s.request("GET", "/admin/domains/acme/audit?limit=2", token=owner).json()["audit"]
    assert len(only_two) == 2
    assert s.request("GET", "/admin/domains/acme/audit?limit=0", token=owner).status == 400
    assert s.request("GET", "/admin/domains/acme/usage", token=owner).json() == {"usage": []}

    removed = s.request("DELETE", f"/admin/domains/acme/members/{member_id}", token=owner)
    assert removed.status == 204
    assert s.request("GET", "/admin/domains/acme", token=member).status == 404
    assert (
        s.request("DELETE", f"/admin/domains/acme/backends/{backend_id}", token=owner).status == 204
    )
    assert s.request("DELETE", "/admin/domains/acme/policy", token=owner).status == 204
    assert s.request("DELETE", "/admin/domains/acme", token=owner).status == 204
    assert s.request("GET", "/admin/domains/acme", token=owner).status == 404


def test_audit_is_for_domain_admins_only(admin_server: AdminServer) -> None:
    s = admin_server
    admin = s.token()
    _, owner = _create_user(s, admin, "owner@example.com")
    member_id, member = _create_user(s, admin, "member@example.com")
    s.request(
        "POST", "/admin/domains", {"alias": "acme", "owner_email": "owner@example.com"}, token=admin
    )
    s.request("POST", "/admin/domains/acme/members", {"user_id": member_id}, token=owner)
    assert s.request("GET", "/admin/domains/acme/audit", token=owner).status == 200
    assert s.request("GET", "/admin/domains/acme/audit", token=member).status == 403
    # The platform admin operates the domain but does not read its audit without joining it.
    assert s.request("GET", "/admin/domains/acme/audit", token=admin).status == 403
    assert s.request("GET", "/admin/domains/acme/usage", token=admin).status == 403
    audit_pat = s.request(
        "POST", "/admin/tokens", {"domain": "acme", "actions": ["read_audit"]}, token=owner
    ).json()["token"]
    assert s.request("GET", "/admin/domains/acme/audit", token=audit_pat).status == 200


def test_keys_routes(admin_server: AdminServer) -> None:
    s = admin_server
    admin = s.token()
    _, user = _create_user(s, admin, "user@example.com")
    keys = s.request("GET", "/admin/keys", token=admin).json()["keys"]
    assert len(keys) == 1 and keys[0]["active"] and "private" not in str(keys).lower()
    assert s.request("GET", "/admin/keys", token=user).status == 403
    assert s.request("POST", "/admin/keys/rotate", token=user).status == 403
    rotated = s.request("POST", "/admin/keys/rotate", token=admin).json()
    assert rotated["active"] != keys[0]["kid"] and len(rotated["keys"]) == 2
    jwks = s.request("GET", "/.well-known/jwks.json").json()
    assert {k["kid"] for k in jwks["keys"]} == {k["kid"] for k in rotated["keys"]}
    assert s.request("GET", "/admin/me", token=admin).status == 200  # old key still verifies


# -- isolation -----------------------------------------------------------------------------------


@dataclass
class _World:
    admin: str
    alice: str  # owner of domain "alpha"
    alice_pat: str  # a PAT of alice's with every action on alpha
    beta: dict[str, Any]  # the other domain and its objects
    beta_ids: dict[str, str]


def _two_domains(s: AdminServer) -> _World:
    admin = s.token()
    _, alice = _create_user(s, admin, "alice@example.com")
    bob_id, bob = _create_user(s, admin, "bob@example.com")
    carol_id, _ = _create_user(s, admin, "carol@example.com")
    s.request(
        "POST",
        "/admin/domains",
        {"alias": "alpha", "owner_email": "alice@example.com"},
        token=admin,
    )
    beta = s.request(
        "POST",
        "/admin/domains",
        {"alias": "beta", "name": "Beta Secret Name", "owner_email": "bob@example.com"},
        token=admin,
    ).json()
    s.request(
        "POST", "/admin/domains/beta/members", {"user_id": carol_id, "role": "admin"}, token=bob
    )
    backend = s.request(
        "POST",
        "/admin/domains/beta/backends",
        {"url": "https://10.9.9.9:8443", "kind": "vllm", "models": ["beta-model"]},
        token=bob,
    ).json()
    s.request(
        "PUT", "/admin/domains/beta/policy", {**POLICY, "description": "beta policy"}, token=bob
    )
    s.request("PATCH", "/admin/domains/beta/limits", {"requests_per_minute": 77}, token=bob)
    pat = s.request(
        "POST", "/admin/tokens", {"domain": "beta", "name": "beta-ci"}, token=bob
    ).json()
    alice_pat = s.request(
        "POST",
        "/admin/tokens",
        {
            "domain": "alpha",
            "actions": [
                "inference",
                "read_audit",
                "manage_domain",
                "manage_members",
                "manage_backends",
            ],
        },
        token=alice,
    ).json()["token"]
    return _World(
        admin=admin,
        alice=alice,
        alice_pat=alice_pat,
        beta=beta,
        beta_ids={
            "domain": beta["id"],
            "user_id": carol_id,
            "owner_id": bob_id,
            "backend_id": backend["id"],
            "token_id": pat["id"],
            "bob": bob,
        },
    )


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _sample_body(method: str, template: str) -> Any:
    """A body that would be valid for the route, so only the domain check can refuse it."""
    if method in ("GET", "DELETE"):
        return None
    if "/members" in template:
        return (
            {"email": "carol@example.com", "role": "admin"}
            if method == "POST"
            else {"role": "member"}
        )
    if "/backends" in template:
        if method == "POST":
            return {"url": "https://10.0.0.1", "kind": "vllm", "models": ["m"]}
        return {"enabled": False}
    if template.endswith("/policy"):
        return POLICY
    if template.endswith("/limits"):
        return {"requests_per_minute": 1}
    return {"name": "pwned"}


def test_nothing_of_one_domain_is_visible_or_reachable_from_another(
    admin_server: AdminServer,
) -> None:
    """Alice, owner of alpha (with her login token and with an all-actions PAT), tries every
    domain-scoped admin route against beta and beta's objects, by alias and by id, and through
    her own domain's paths with beta's object ids. Every attempt is a 404 that names nothing
    of beta, and beta is unchanged afterwards."""
    s = admin_server
    world = _two_domains(s)
    ids = world.beta_ids
    before = _identity_dump(s, ids["domain"])
    assert before.count("\n") >= 5

    routes = sorted(
        {
            (method, resource.canonical)
            for resource in s.app.router.resources()
            for route in resource
            if (method := route.method) in _METHODS
        }
    )
    domain_routes = [(m, p) for m, p in routes if "{domain}" in p]
    assert len(domain_routes) >= 23  # every domain-scoped route (all are tried)
    secrets_of_beta = (
        "beta",
        ids["domain"],
        ids["backend_id"],
        ids["token_id"],
        "10.9.9.9",
        "Beta Secret Name",
        "beta-model",
        "carol@example.com",
    )

    attempts = 0
    for token in (world.alice, world.alice_pat):
        for method, template in domain_routes:
            for domain in ("beta", ids["domain"], "alpha"):
                path = (
                    template.replace("{domain}", domain)
                    .replace("{user_id}", ids["user_id"])
                    .replace("{backend_id}", ids["backend_id"])
                )
                if domain == "alpha" and not any(
                    k in template for k in ("{user_id}", "{backend_id}")
                ):
                    continue  # alpha's own routes are hers to use
                reply = s.request(method, path, _sample_body(method, template), token=token)
                attempts += 1
                assert reply.status == 404, (method, path, reply.status, reply.body)
                text = reply.body.decode()
                for secret in secrets_of_beta:
                    assert secret not in text, (method, path, secret)
        for method in ("GET", "DELETE"):
            reply = s.request(method, f"/admin/tokens/{ids['token_id']}", token=token)
            assert reply.status == 404
        for path in ("/admin/domains", "/admin/me", "/admin/tokens"):
            text = s.request("GET", path, token=token).body.decode()
            for secret in secrets_of_beta:
                assert secret not in text, (path, secret)
        created = s.request(
            "POST", "/admin/tokens", {"domain": "beta", "actions": ["inference"]}, token=token
        )
        assert created.status in (403, 404)
        attempts += 1
    assert attempts > 100
    assert _identity_dump(s, ids["domain"]) == before  # nothing of beta changed


def _identity_dump(server: AdminServer, domain_id: str) -> str:
    """Every stored row that belongs to the domain (its members, backends, tokens, audit)."""
    text = server.call(dump_database(server.app[IDENTITY].db))
    return "\n".join(line for line in text.splitlines() if domain_id in line)


# -- secrets -------------------------------------------------------------------------------------


def test_secrets_never_reach_the_logs(
    admin_server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    s = admin_server
    caplog.set_level(logging.DEBUG)
    admin_pair = s.login()
    admin = admin_pair["access_token"]
    user_password = "a-very-secret-password-42"
    s.request(
        "POST", "/admin/users", {"email": "u@example.com", "password": user_password}, token=admin
    )
    s.request(
        "POST", "/auth/login", {"email": "u@example.com", "password": "wrong-" + user_password}
    )
    user_pair = s.login("u@example.com", user_password)
    refreshed = s.request(
        "POST", "/auth/refresh", {"refresh_token": user_pair["refresh_token"]}
    ).json()
    s.request("POST", "/auth/refresh", {"refresh_token": user_pair["refresh_token"]})  # reuse
    s.request(
        "POST", "/admin/domains", {"alias": "acme", "owner_email": "u@example.com"}, token=admin
    )
    user = s.token("u@example.com", user_password)
    pat = s.request("POST", "/admin/tokens", {"domain": "acme"}, token=user).json()["token"]
    s.request("GET", "/admin/me", token=pat)
    s.request("GET", "/admin/me", token=pat + "x")
    s.request("POST", "/admin/keys/rotate", token=admin)
    s.request("POST", "/auth/logout", token=user)
    secrets_ = [
        ADMIN_PASSWORD,
        user_password,
        admin,
        admin_pair["refresh_token"],
        user_pair["access_token"],
        user_pair["refresh_token"],
        refreshed["refresh_token"],
        refreshed["access_token"],
        pat,
        pat.removeprefix("cube_pat_"),
    ]
    logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    assert caplog.records  # something was logged (the reuse warning, the rotation)
    for secret in secrets_:
        assert secret not in logged
    assert "BEGIN PRIVATE KEY" not in logged and "enc:v1:" not in logged
    # Nor in the database, except as hashes.
    everything = s.call(dump_database(s.app[IDENTITY].db))
    for secret in secrets_:
        assert secret not in everything


def test_unexpected_errors_are_json_500_without_details(
    admin_server: AdminServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = admin_server
    admin = s.token()
    identity = s.app[IDENTITY]

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database exploded: password=hunter2")

    monkeypatch.setattr(identity, "list_users", broken)
    reply = s.request("GET", "/admin/users", token=admin)
    assert reply.status == 500
    assert _error(reply) == {
        "message": "internal error",
        "type": "server_error",
        "code": "internal_error",
    }
    assert "hunter2" not in reply.body.decode() and "Traceback" not in reply.body.decode()
