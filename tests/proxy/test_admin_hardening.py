"""The admin API against hostile or careless input and concurrent changes, on SQLite and on a real
PostgreSQL: a PAT never carries an owner's own powers; the current-password check is throttled
like a login; bodies, paths and values no store could keep are 400s, never 500s; the last owner
and the last administrator survive concurrent changes; concurrent membership changes wait for
each other instead of failing."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import pytest

from proxy.identity import Identity, Invalid
from tests.proxy.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, AdminServer, use_identity

PASSWORD = "member-password-1234"


def _user(server: AdminServer, admin: str, email: str, **extra: Any) -> str:
    reply = server.request(
        "POST", "/admin/users", {"email": email, "password": PASSWORD, **extra}, token=admin
    )
    assert reply.status == 201, reply.body
    return str(reply.json()["id"])


def _domain(server: AdminServer, admin: str, alias: str, owner: str) -> None:
    reply = server.request(
        "POST", "/admin/domains", {"alias": alias, "owner_id": owner}, token=admin
    )
    assert reply.status == 201, reply.body


def _roles(server: AdminServer, admin: str, alias: str) -> dict[str, str]:
    reply = server.request("GET", f"/admin/domains/{alias}/members", token=admin)
    assert reply.status == 200, reply.body
    return {m["user_id"]: m["role"] for m in reply.json()["members"]}


def _pat(server: AdminServer, token: str, domain: str, actions: list[str]) -> str:
    reply = server.request(
        "POST", "/admin/tokens", {"domain": domain, "actions": actions}, token=token
    )
    assert reply.status == 201, reply.body
    return str(reply.json()["token"])


def test_a_pat_never_carries_the_owners_own_powers(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    owner = _user(server, admin, "owner@x.com")
    other = _user(server, admin, "other@x.com")
    _domain(server, admin, "acme", owner)
    login = server.token("owner@x.com", PASSWORD)
    pat = _pat(server, login, "acme", ["inference", "manage_members"])
    full = _pat(
        server,
        login,
        "acme",
        ["inference", "read_audit", "manage_members", "manage_backends", "manage_domain"],
    )

    # A PAT with manage_members alone adds members, but grants no role with rights beyond its
    # own: an admin it made could point the domain's policy and backends at an agent of its
    # own. Nor can it change or remove a member whose role exceeds its rights.
    refused = server.request(
        "POST", "/admin/domains/acme/members", {"user_id": other, "role": "admin"}, token=pat
    )
    assert refused.status == 403, refused.body
    added = server.request(
        "POST", "/admin/domains/acme/members", {"user_id": other, "role": "member"}, token=pat
    )
    assert added.status == 201, added.body
    again = server.request(
        "POST", "/admin/domains/acme/members", {"user_id": other, "role": "member"}, token=pat
    )
    assert again.status == 409, again.body  # an add is no silent role change
    assert (
        server.request(
            "PUT", f"/admin/domains/acme/members/{other}", {"role": "admin"}, token=pat
        ).status
        == 403
    )
    # A PAT holding every right an admin has may make one.
    promoted = server.request(
        "PUT", f"/admin/domains/acme/members/{other}", {"role": "admin"}, token=full
    )
    assert promoted.status == 200, promoted.body
    for method, path, body in [
        ("PUT", f"/admin/domains/acme/members/{other}", {"role": "member"}),
        ("DELETE", f"/admin/domains/acme/members/{other}", None),
    ]:
        reply = server.request(method, path, body, token=pat)
        assert reply.status == 403, (method, path, reply.body)
    # No PAT makes anyone owner, demotes or removes the owner, or deletes the domain.
    for token in (pat, full):
        for method, path, body in [
            ("PUT", f"/admin/domains/acme/members/{other}", {"role": "owner"}),
            ("POST", "/admin/domains/acme/members", {"user_id": other, "role": "owner"}),
            ("PUT", f"/admin/domains/acme/members/{owner}", {"role": "member"}),
            ("DELETE", f"/admin/domains/acme/members/{owner}", None),
            ("DELETE", "/admin/domains/acme", None),
        ]:
            reply = server.request(method, path, body, token=token)
            assert reply.status == 403, (method, path, reply.body)
    assert _roles(server, admin, "acme") == {owner: "owner", other: "admin"}
    # Renaming needs a name: an empty PATCH wiped it.
    assert server.request("PATCH", "/admin/domains/acme", {}, token=login).status == 400
    # The same owner, logged in, can.
    promoted = server.request(
        "PUT", f"/admin/domains/acme/members/{other}", {"role": "owner"}, token=login
    )
    assert promoted.status == 200, promoted.body


def test_the_current_password_check_is_throttled_like_a_login(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    user = _user(server, admin, "guess@x.com")
    session = server.token("guess@x.com", PASSWORD)
    statuses = [
        server.request(
            "PATCH",
            f"/admin/users/{user}",
            {"password": "new-password-5678", "current_password": f"wrong-{i}"},
            token=session,
        ).status
        for i in range(12)
    ]
    assert statuses[:10] == [403] * 10 and statuses[10:] == [429, 429], statuses
    # The right password is refused too until the window passes: guessing gains nothing.
    right = server.request(
        "PATCH",
        f"/admin/users/{user}",
        {"password": "new-password-5678", "current_password": PASSWORD},
        token=session,
    )
    assert right.status == 429 and "Retry-After" in right.headers
    login = server.request("POST", "/auth/login", {"email": "guess@x.com", "password": PASSWORD})
    assert login.status == 429  # one count for the account, whichever way it is guessed


def test_input_no_store_could_keep_is_a_400(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    _domain(server, admin, "acme", _user(server, admin, "owner@x.com"))
    login = "/auth/login"
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", login, {"raw": b"[" * 100_000}),  # nested past the parser's recursion
        ("POST", login, {"raw": b'{"a":' * 40 + b"1" + b"}" * 40}),  # deeper than any body
        ("POST", login, {"raw": b'{"email":"\\ud800@x.com","password":"p"}'}),  # lone surrogate
        ("POST", login, {"raw": b'{"email":"a\\u0000b@x.com","password":"p"}'}),  # NUL
        ("POST", login, {"raw": b"\xff\xfe{}"}),  # not UTF-8
        ("POST", "/admin/users", {"body": {"email": "a@x.com", "password": "pa\ud800ss-word-1"}}),
        ("POST", "/admin/users", {"body": {"email": "a@x.com", "name": "x\x00y"}}),
        ("GET", "/admin/domains/ac%00me", {}),
        ("GET", "/admin/users/ab%00", {}),
        ("GET", "/admin/domains/acme/audit?event=a%00", {}),
        ("PUT", "/admin/domains/acme/limits", {"body": {"requests_per_minute": 2**31}}),
        ("POST", "/admin/users", {"body": {"email": "b\u200b@x.com"}}),  # format character
    ]
    for method, path, kwargs in cases:
        raw = kwargs.get("raw")
        reply = server.request(
            method,
            path,
            kwargs.get("body"),
            token=None if path == login else admin,
            raw=raw,
            headers={"Content-Type": "application/json; charset=x-unknown"} if raw else None,
        )
        assert reply.status == 400, (method, path, kwargs, reply.status, reply.body)
        assert reply.json()["error"]["type"]
    # An unknown charset alone is no reason to refuse: the body is UTF-8 JSON.
    reply = server.request(
        "POST",
        login,
        raw=b'{"email":"owner@x.com","password":"%s"}' % PASSWORD.encode(),
        headers={"Content-Type": "application/json; charset=x-unknown"},
    )
    assert reply.status == 200, reply.body
    # A compressed body is refused as such (it was "not valid JSON"), whichever header says so.
    import gzip

    squeezed = gzip.compress(b'{"email":"owner@x.com","password":"%s"}' % PASSWORD.encode())
    for encoding in ("gzip", "br", "identity, gzip"):
        reply = server.request("POST", login, raw=squeezed, headers={"Content-Encoding": encoding})
        assert reply.status == 415, (encoding, reply.body)
        assert reply.json()["error"]["code"] == "unsupported_content_encoding"


def test_a_pat_lifetime_stays_a_representable_time(database: str) -> None:
    async def body(identity: Identity) -> None:
        admin = await identity.find_user(ADMIN_EMAIL)
        assert admin is not None
        await identity.create_domain(alias="acme", name="", owner_id=admin.id)
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        principal = await identity.authenticate_principal(pair.access_token)
        with pytest.raises(Invalid, match="at most"):
            await identity.create_pat(principal, "acme", expires_in=10**400)
        pat, _ = await identity.create_pat(principal, "acme", expires_in=50 * 365 * 86400)
        assert pat.expires_at is not None

    use_identity(database, body, pat_max_ttl=None)  # no configured maximum


def test_one_address_is_one_account_however_it_is_spelled(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    _user(server, admin, "jos\u00e9@x.com")  # composed
    twin = server.request(
        "POST", "/admin/users", {"email": "JOSE\u0301@x.com", "password": PASSWORD}, token=admin
    )  # decomposed, upper case
    assert twin.status == 409, twin.body
    assert server.login("jose\u0301@X.com", PASSWORD)["access_token"]


def test_backend_urls_name_a_real_port(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    owner = _user(server, admin, "owner@x.com")
    _domain(server, admin, "acme", owner)
    for url in ("https://agent.example:0", "https://agent.example:99999"):
        reply = server.request(
            "POST",
            "/admin/domains/acme/backends",
            {"url": url, "kind": "vllm", "models": ["m"]},
            token=admin,
        )
        assert reply.status == 400, (url, reply.body)


def test_one_agent_url_in_another_spelling_is_still_one_domains(
    admin_server: AdminServer,
) -> None:
    """Another tenant writing the same agent's address another way (hex, IPv4-mapped IPv6,
    a short form, upper case, a trailing dot) gets the 409 the first spelling gets."""
    server = admin_server
    admin = server.token()
    owner = _user(server, admin, "owner@x.com")
    _domain(server, admin, "acme", owner)
    _domain(server, admin, "bank", owner)

    def add(domain: str, url: str) -> Any:
        return server.request(
            "POST",
            f"/admin/domains/{domain}/backends",
            {"url": url, "kind": "vllm", "models": ["m"]},
            token=admin,
        )

    for first, others in (
        (
            "https://127.0.0.1:8443",
            ("https://0x7f000001:8443", "https://[::ffff:127.0.0.1]:8443", "https://127.1:8443"),
        ),
        ("https://agent.example:8443", ("https://AGENT.example.:8443",)),
    ):
        taken = add("acme", first)
        assert taken.status == 201, taken.body
        for other in others:
            reply = add("bank", other)
            assert reply.status == 409, (other, reply.status, reply.body)
    # A name ending in a number that is no IPv4 address is refused, not looked up.
    assert add("bank", "https://1.2.3.999:8443").status == 400


def test_an_admin_body_over_a_mib_is_refused_unread(admin_server: AdminServer) -> None:
    """The admin API's bodies are small: one over 1 MiB is a 413 before it is parsed (the
    inference limit, 64 MiB, applied, and the parse held the event loop), declared or chunked."""
    import http.client

    server = admin_server
    big = b'{"email": "a@x.com", "password": "' + b"p" * (2 * 1024 * 1024) + b'"}'
    declared = server.request("POST", "/auth/login", raw=big)
    assert declared.status == 413, declared.body[:200]
    assert declared.json()["error"]["code"] == "body_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/auth/login")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for start in range(0, len(big), 65536):
            piece = big[start : start + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        chunked = conn.getresponse()
        assert chunked.status == 413
        assert json.loads(chunked.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()


def test_a_pat_sees_only_its_own_domains_tokens(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    owner = _user(server, admin, "owner@x.com")
    _domain(server, admin, "acme", owner)
    _domain(server, admin, "beta", owner)
    login = server.token("owner@x.com", PASSWORD)
    acme = _pat(server, login, "acme", ["inference"])
    beta = server.request("POST", "/admin/tokens", {"domain": "beta"}, token=login).json()["id"]
    assert server.request("GET", f"/admin/tokens/{beta}", token=login).status == 200
    assert server.request("GET", f"/admin/tokens/{beta}", token=acme).status == 404


def test_users_page_from_offset_zero(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    for i in range(3):
        _user(server, admin, f"u{i}@x.com")
    first = server.request("GET", "/admin/users?limit=2&offset=0", token=admin)
    second = server.request("GET", "/admin/users?limit=2&offset=2", token=admin)
    assert first.status == 200 and second.status == 200
    emails = [u["email"] for u in first.json()["users"] + second.json()["users"]]
    assert sorted(emails) == sorted([ADMIN_EMAIL, "u0@x.com", "u1@x.com", "u2@x.com"])


def test_a_domains_last_owner_cannot_be_deleted(admin_server: AdminServer) -> None:
    server = admin_server
    admin = server.token()
    owner = _user(server, admin, "owner@x.com")
    second = _user(server, admin, "second@x.com")
    _domain(server, admin, "acme", owner)
    refused = server.request("DELETE", f"/admin/users/{owner}", token=admin)
    assert refused.status == 409 and "last owner" in refused.json()["error"]["message"]
    assert _roles(server, admin, "acme") == {owner: "owner"}
    server.request(
        "POST", "/admin/domains/acme/members", {"user_id": second, "role": "owner"}, token=admin
    )
    assert server.request("DELETE", f"/admin/users/{owner}", token=admin).status == 204
    assert _roles(server, admin, "acme") == {second: "owner"}


def _together(*calls: Any) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(*call) for call in calls]
        return [f.result().status for f in futures]


def test_concurrent_changes_keep_an_owner_and_an_admin_without_failing(
    admin_server: AdminServer,
) -> None:
    server = admin_server
    admin = server.token()
    x = _user(server, admin, "x@x.com")
    y = _user(server, admin, "y@x.com")
    _domain(server, admin, "dd", x)
    server.request(
        "POST", "/admin/domains/dd/members", {"user_id": y, "role": "owner"}, token=admin
    )
    x_token, y_token = server.token("x@x.com", PASSWORD), server.token("y@x.com", PASSWORD)
    for _ in range(4):
        for who in (x, y):
            reply = server.request(
                "PUT", f"/admin/domains/dd/members/{who}", {"role": "owner"}, token=admin
            )
            assert reply.status == 200
        # Both owners step down at once: one does, the other is told the domain needs an owner.
        statuses = _together(
            (_as(server, x_token), "PUT", f"/admin/domains/dd/members/{x}", {"role": "admin"}),
            (_as(server, y_token), "PUT", f"/admin/domains/dd/members/{y}", {"role": "admin"}),
        )
        assert sorted(statuses) == [200, 409], statuses
        assert list(_roles(server, admin, "dd").values()).count("owner") == 1
    # One new member added four times at once: added once, the others told it is one.
    for i in range(3):
        user = _user(server, admin, f"n{i}@x.com")
        add = (_as(server, admin), "POST", "/admin/domains/dd/members", {"user_id": user})
        assert sorted(_together(add, add, add, add)) == [201, 409, 409, 409]
        assert _roles(server, admin, "dd")[user] == "member"
    # The only two administrators delete each other at once: one at most goes.
    other = _user(server, admin, "other-admin@x.com", is_admin=True)
    other_token = server.token("other-admin@x.com", PASSWORD)
    me = server.request("GET", "/admin/me", token=admin).json()["user"]["id"]
    statuses = _together(
        (_as(server, admin), "DELETE", f"/admin/users/{other}", None),
        (_as(server, other_token), "DELETE", f"/admin/users/{me}", None),
    )
    assert 500 not in statuses and statuses.count(204) <= 1, statuses
    admins = [u for u in server.call(server.identity.list_users()) if u.is_admin]
    assert len(admins) == 1


def _as(server: AdminServer, token: str) -> Any:
    def call(method: str, path: str, body: Any) -> Any:
        return server.request(method, path, body, token=token)

    return call


def test_a_database_outage_is_a_503_at_the_admin_api(admin_server: AdminServer) -> None:
    server = admin_server
    token = server.token()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    server.identity.authenticate_principal = down
    reply = server.request("GET", "/admin/me", token=token)
    assert reply.status == 503, reply.body
    assert reply.json()["error"]["code"] == "database_unavailable"
    assert reply.headers["Retry-After"] == "1"
