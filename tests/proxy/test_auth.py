"""Login, access tokens, refresh rotation and reuse detection, logout, signing keys and JWKS,
the forwarded per-domain token (checked with the agent's own verifier), external OIDC."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.auth import AuthError as AgentAuthError
from agent.auth import KeySet, TokenVerifier, parse_jwks
from proxy.db.schema import refresh_tokens, signing_keys
from proxy.directory import AuthError, Caller
from proxy.identity import (
    ACCESS_AUDIENCE,
    Identity,
    OidcConfig,
    StartupError,
    TooManyAttempts,
    Unauthorized,
)
from proxy.identity.credentials import secret_hash
from tests.agent.tokens import TokenIssuer
from tests.proxy.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    dump_database,
    identity_config,
    run,
    use_identity,
)

ISSUER = "https://proxy.cube.test"


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# -- login and access tokens ---------------------------------------------------------------------


def test_login_issues_a_short_lived_eddsa_access_token(database: str) -> None:
    async def body(identity: Identity) -> None:
        before = int(time.time())
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        header = jwt.get_unverified_header(pair.access_token)
        assert header["alg"] == "EdDSA"
        assert header["kid"] in {k["kid"] for k in identity.issuer().jwks()["keys"]}
        claims = _claims(pair.access_token)
        assert claims["iss"] == ISSUER and claims["aud"] == ACCESS_AUDIENCE
        assert claims["token_use"] == "access"
        assert before + 900 <= claims["exp"] <= int(time.time()) + 900
        assert pair.expires_in == 900
        assert pair.refresh_token.startswith("cube_rt_") and len(pair.refresh_token) > 40
        principal = await identity.authenticate_principal(pair.access_token)
        assert principal.user.email == ADMIN_EMAIL and principal.token_kind == "access"
        assert principal.session_id == claims["sid"]

    use_identity(database, body)


def test_forged_and_foreign_tokens_are_refused(database: str) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        claims = _claims(pair.access_token)
        kid = jwt.get_unverified_header(pair.access_token)["kid"]
        now = int(time.time())
        forged = jwt.encode(claims, Ed25519PrivateKey.generate(), "EdDSA", headers={"kid": kid})
        expired = identity.keys.sign({**claims, "iat": now - 999, "exp": now - 60})
        wrong_aud = identity.keys.sign({**claims, "aud": "acme"})  # a forwarded-token shape
        not_access = identity.keys.sign({**claims, "token_use": "forward"})
        no_session = identity.keys.sign({**claims, "sid": uuid.uuid4().hex})
        unsigned = jwt.encode(claims, None, "none")  # type: ignore[arg-type]
        hmac_ = jwt.encode(claims, "k" * 32, "HS256", headers={"kid": kid})
        unknown_kid = jwt.encode(
            claims, Ed25519PrivateKey.generate(), "EdDSA", headers={"kid": "nope"}
        )
        for token in (forged, wrong_aud, not_access, no_session, unsigned, hmac_, unknown_kid):
            with pytest.raises(Unauthorized):
                await identity.authenticate_principal(token)
        with pytest.raises(Unauthorized) as caught:
            await identity.authenticate_principal(expired)
        assert caught.value.code == "token_expired"
        for junk in ("", "abc", "a.b.c", pair.refresh_token, "x" * 10000):
            with pytest.raises(Unauthorized):
                await identity.authenticate_principal(junk)
        # The real one still works.
        await identity.authenticate_principal(pair.access_token)

    use_identity(database, body)


def test_repeated_failed_logins_are_throttled(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        for _ in range(3):
            with pytest.raises(Unauthorized):
                await identity.login(ADMIN_EMAIL, "wrong-password-123")
        with pytest.raises(TooManyAttempts) as caught:
            await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)  # even the right password
        assert caught.value.retry_after >= 1
        # Other accounts are not affected.
        with pytest.raises(Unauthorized):
            await identity.login("someone@cube.test", "wrong-password-123")

    use_identity(str(tmp_path / "p.db"), body, login_max_failures=3)


def test_login_attempts_are_counted_once_for_all_workers_and_replicas(database: str) -> None:
    """Two Identity layers over one database (two workers, or two replicas): together they
    allow ``login_max_failures`` guesses per account, not that many each."""

    async def main() -> None:
        first = await Identity.open(identity_config(database, login_max_failures=3))
        second = await Identity.open(identity_config(database, login_max_failures=3))
        try:
            for identity in (first, second, first):
                with pytest.raises(Unauthorized):
                    await identity.login(ADMIN_EMAIL, "wrong-password-123")
            with pytest.raises(TooManyAttempts):
                await second.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        finally:
            await second.close()
            await first.close()

    run(main())


def test_concurrent_guesses_cannot_pass_the_count(database: str) -> None:
    """Attempts are counted before the password is checked: eight guesses at once, with room
    for three, get three answers and five refusals (counting failures afterwards would let all
    eight through the check)."""

    async def body(identity: Identity) -> None:
        async def guess() -> str:
            try:
                await identity.login(ADMIN_EMAIL, "wrong-password-123")
            except Unauthorized:
                return "unauthorized"
            except TooManyAttempts:
                return "throttled"
            return "accepted"

        results = await asyncio.gather(*(guess() for _ in range(8)))
        assert sorted(results) == ["throttled"] * 5 + ["unauthorized"] * 3

    use_identity(database, body, login_max_failures=3)


def test_a_successful_login_clears_the_count_and_old_counts_are_pruned(database: str) -> None:
    async def body(identity: Identity) -> None:
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await identity.login(ADMIN_EMAIL, "wrong-password-123")
        await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        for _ in range(3):  # the whole allowance again
            with pytest.raises(Unauthorized):
                await identity.login(ADMIN_EMAIL, "wrong-password-123")
        with pytest.raises(TooManyAttempts):
            await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        # An address that is no account is counted too, but not stored in clear.
        with pytest.raises(Unauthorized):
            await identity.login("nobody@cube.test", "wrong-password-123")
        assert "nobody@cube.test" not in await dump_database(identity.db)
        await asyncio.sleep(0.6)  # both windows pass
        assert await identity.prune_login_attempts() == 2
        await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)

    use_identity(database, body, login_max_failures=3, login_failure_window=0.5)


# -- refresh tokens ------------------------------------------------------------------------------


def test_refresh_rotates_and_stores_only_hashes(database: str) -> None:
    async def body(identity: Identity) -> None:
        first = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        second = await identity.refresh(first.refresh_token)
        third = await identity.refresh(second.refresh_token)
        assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
        assert first.session_id == second.session_id == third.session_id
        await identity.authenticate_principal(third.access_token)
        async with identity.db.read() as conn:
            hashes = set((await conn.execute(sa.select(refresh_tokens.c.token_hash))).scalars())
        assert {secret_hash(p.refresh_token) for p in (first, second, third)} <= hashes
        everything = await dump_database(identity.db)
        for pair in (first, second, third):
            assert pair.refresh_token not in everything
            assert pair.refresh_token[len("cube_rt_") :] not in everything

    use_identity(database, body)


def test_reusing_a_rotated_refresh_token_revokes_the_family(database: str) -> None:
    async def body(identity: Identity) -> None:
        first = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        second = await identity.refresh(first.refresh_token)
        other_session = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        with pytest.raises(Unauthorized) as caught:
            await identity.refresh(first.refresh_token)  # a thief replays the old one
        assert caught.value.code == "refresh_token_reused"
        # The whole session is gone: the legitimate newer refresh and access tokens too.
        with pytest.raises(Unauthorized):
            await identity.refresh(second.refresh_token)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(second.access_token)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(first.access_token)
        # Another session of the same user is untouched.
        await identity.authenticate_principal(other_session.access_token)
        await identity.refresh(other_session.refresh_token)

    use_identity(database, body)


def test_concurrent_refreshes_of_one_token_succeed_once(database: str) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        results = await asyncio.gather(
            *(identity.refresh(pair.refresh_token) for _ in range(5)), return_exceptions=True
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        assert len(ok) == 1
        assert all(isinstance(r, Unauthorized) for r in results if r not in ok)

    use_identity(database, body)


def test_refresh_tokens_expire(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert pair.refresh_expires_in <= 1
        await asyncio.sleep(1.2)
        with pytest.raises(Unauthorized, match="expired"):
            await identity.refresh(pair.refresh_token)

    use_identity(str(tmp_path / "p.db"), body, refresh_token_ttl=1)


def test_a_session_cannot_be_refreshed_past_its_end(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert pair.refresh_expires_in <= 2
        pair = await identity.refresh(pair.refresh_token)
        assert pair.refresh_expires_in <= 2  # capped by the session's end, not renewed
        await asyncio.sleep(2.2)
        with pytest.raises(Unauthorized):
            await identity.refresh(pair.refresh_token)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)

    use_identity(str(tmp_path / "p.db"), body, session_ttl=2)


def test_bad_refresh_tokens(database: str) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        for token in (None, 42, "", "cube_rt_unknown", pair.access_token, pair.refresh_token + "x"):
            with pytest.raises(Unauthorized):
                await identity.refresh(token)
        await identity.refresh(pair.refresh_token)  # untouched by those attempts

    use_identity(database, body)


def test_logout_ends_the_session(database: str) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        other = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert await identity.logout(session_id=pair.session_id)
        with pytest.raises(Unauthorized) as caught:
            await identity.authenticate_principal(pair.access_token)
        assert caught.value.code == "session_revoked"
        with pytest.raises(Unauthorized):
            await identity.refresh(pair.refresh_token)
        assert await identity.logout(refresh_token=other.refresh_token)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(other.access_token)
        assert not await identity.logout(refresh_token="cube_rt_nothing")

    use_identity(database, body)


def test_logout_is_seen_at_once_despite_the_auth_cache(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        await identity.authenticate_principal(pair.access_token)  # now cached
        await identity.logout(session_id=pair.session_id)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)

    use_identity(str(tmp_path / "p.db"), body, auth_cache_seconds=60)


def test_a_logout_during_a_lookup_is_not_undone_by_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup read the session as live; a logout committed (and cleared the cache) before
    it returned: that answer must not be cached over the logout (it was, for the cache's
    lifetime, on the admin API's path)."""

    async def body(identity: Identity) -> None:
        pair = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        read_session = identity._access_principal

        async def racing(token: str) -> Any:
            principal = await read_session(token)  # the database says: live
            await identity.logout(session_id=principal.session_id)  # commits meanwhile
            return principal

        monkeypatch.setattr(identity, "_access_principal", racing)
        await identity.authenticate_principal(pair.access_token)  # the in-flight answer
        monkeypatch.setattr(identity, "_access_principal", read_session)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(pair.access_token)

    use_identity(str(tmp_path / "p.db"), body, auth_cache_seconds=60)


# -- signing keys --------------------------------------------------------------------------------


def test_rotation_keeps_old_keys_until_their_tokens_expire(database: str) -> None:
    async def body(identity: Identity) -> None:
        old = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        old_kid = jwt.get_unverified_header(old.access_token)["kid"]
        new_kid = await identity.keys.rotate()
        assert new_kid != old_kid
        new = await identity.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert jwt.get_unverified_header(new.access_token)["kid"] == new_kid
        assert {k["kid"] for k in identity.issuer().jwks()["keys"]} == {old_kid, new_kid}
        await identity.authenticate_principal(old.access_token)  # still valid
        meta = {k["kid"]: k for k in identity.keys.kids()}
        assert meta[new_kid]["active"] and not meta[old_kid]["active"]
        # The old key leaves the JWKS once no token it signed can still be valid.
        retire_after = meta[old_kid]["expires_at"] - meta[old_kid]["retired_at"]
        assert retire_after >= 900  # the access-token lifetime
        async with identity.db.write() as conn:
            await conn.execute(
                sa.update(signing_keys)
                .where(signing_keys.c.kid == old_kid)
                .values(expires_at=time.time() - 1)
            )
        await identity.keys.refresh()
        assert {k["kid"] for k in identity.issuer().jwks()["keys"]} == {new_kid}
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(old.access_token)
        await identity.authenticate_principal(new.access_token)

    use_identity(database, body)


def test_keys_rotate_when_due(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        first = identity.keys.active.kid
        await asyncio.sleep(1.1)
        await identity.keys.refresh()
        assert identity.keys.active.kid != first

    use_identity(str(tmp_path / "p.db"), body, key_rotation_seconds=1)


def test_a_replica_learns_another_replicas_new_key(database: str) -> None:
    async def body(first: Identity) -> None:
        from proxy.identity import Identity as Id
        from tests.proxy.conftest import identity_config

        second = await Id.open(identity_config(database))
        try:
            assert first.keys.active.kid == second.keys.active.kid  # one key set, shared
            await first.keys.rotate()
            pair = await first.login(ADMIN_EMAIL, ADMIN_PASSWORD)
            principal = await second.authenticate_principal(pair.access_token)
            assert principal.user.email == ADMIN_EMAIL
            assert first.keys.active.kid in {k["kid"] for k in second.issuer().jwks()["keys"]}
        finally:
            await second.close()

    use_identity(database, body)


def test_private_keys_can_be_encrypted_at_rest(tmp_path: Path) -> None:
    database = str(tmp_path / "p.db")
    secret = "a-key-encryption-secret"

    async def first(identity: Identity) -> str:
        async with identity.db.read() as conn:
            stored = list((await conn.execute(sa.select(signing_keys.c.private_key))).scalars())
        assert stored and all(s.startswith("enc:v1:") for s in stored)
        assert not any("PRIVATE KEY" in s for s in stored)
        return identity.keys.active.kid

    kid = use_identity(database, first, key_secret=secret)
    with pytest.raises(StartupError, match="CUBE_PROXY_KEY_SECRET"):
        use_identity(database, _noop)
    with pytest.raises(StartupError, match="decrypt"):
        use_identity(database, _noop, key_secret="the-wrong-secret")

    async def again(identity: Identity) -> None:
        assert identity.keys.active.kid == kid

    use_identity(database, again, key_secret=secret)


def test_unencrypted_keys_are_pem_in_the_database(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        async with identity.db.read() as conn:
            stored = list((await conn.execute(sa.select(signing_keys.c.private_key))).scalars())
        assert all("BEGIN PRIVATE KEY" in s for s in stored)
        assert all("d" not in k for k in identity.issuer().jwks()["keys"])  # public only

    use_identity(str(tmp_path / "p.db"), body)


async def _noop(identity: Identity) -> None:
    del identity


# -- the forwarded token -------------------------------------------------------------------------


def _agent_verifier(identity: Identity, audience: str) -> TokenVerifier:
    keys = KeySet(parse_jwks(json.dumps(identity.issuer().jwks()).encode()))
    return TokenVerifier(issuer=ISSUER, audience=audience, keys=keys)


def _caller(**overrides: Any) -> Caller:
    values: dict[str, Any] = {
        "user_id": "u1",
        "domain_id": "d" * 32,
        "domain_alias": "acme",
        "actions": frozenset({"inference"}),
        "token_kind": "pat",
        "token_id": "t1",
        "models": None,
    }
    values.update(overrides)
    return Caller(**values)


def test_forwarded_tokens_satisfy_the_agents_contract(tmp_path: Path) -> None:
    async def body(identity: Identity) -> None:
        signer = identity.issuer()
        assert signer.issuer_url == ISSUER
        verifier = _agent_verifier(identity, "acme")

        any_model = verifier.verify(signer.sign_forward(_caller()))
        assert any_model.subject == "u1" and any_model.models is None

        scoped = signer.sign_forward(_caller(models=frozenset({"m1", "m2"})))
        assert verifier.verify(scoped).models == frozenset({"m1", "m2"})
        one = signer.sign_forward(_caller(models=frozenset({"m1", "m2"})), models=("m2",))
        assert verifier.verify(one).models == frozenset({"m2"})
        # Ollama's spellings of one model are one (the gateway checked the route's rules).
        tagged = signer.sign_forward(
            _caller(models=frozenset({"llama3.2"})), models=("llama3.2:latest",)
        )
        assert verifier.verify(tagged).models == frozenset({"llama3.2:latest"})
        with pytest.raises(AuthError):
            signer.sign_forward(_caller(models=frozenset({"llama3.2"})), models=("llama3.2:1b",))
        endpoints = signer.sign_forward(_caller(), models=("m9",), endpoints=("chat",))
        assert verifier.verify(endpoints).endpoints == frozenset({"chat"})

        claims = _claims(scoped)
        assert claims["aud"] == "acme" and claims["iss"] == ISSUER
        assert claims["scope"].split()[0] == "inference"
        assert claims["exp"] - claims["iat"] == 120
        assert claims["exp"] - claims["iat"] == 120

        # Another domain's agent refuses it; the proxy refuses it as an access token.
        with pytest.raises(AgentAuthError):
            _agent_verifier(identity, "other").verify(scoped)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(scoped)
        # A PAT scoped to m1 cannot be stretched to m3; no inference right, no token.
        with pytest.raises(AuthError) as caught:
            signer.sign_forward(_caller(models=frozenset({"m1"})), models=("m3",))
        assert caught.value.status == 403
        with pytest.raises(AuthError):
            signer.sign_forward(_caller(actions=frozenset({"read_audit"})))
        with pytest.raises(AuthError):
            signer.sign_forward(_caller(), models=())

    use_identity(str(tmp_path / "p.db"), body)


def test_the_access_audience_can_never_be_a_domain_alias() -> None:
    from proxy.identity.errors import Invalid
    from proxy.identity.models import check_alias

    with pytest.raises(Invalid):
        check_alias(ACCESS_AUDIENCE)


# -- external OIDC issuer ------------------------------------------------------------------------


def test_oidc_tokens_map_to_users_by_email(tmp_path: Path) -> None:
    external = TokenIssuer(issuer="https://idp.example", audience="cube-proxy")
    jwks = external.write_jwks(tmp_path / "idp-jwks.json")
    oidc = OidcConfig(issuer="https://idp.example", audience="cube-proxy", jwks_file=jwks)

    def verified(**claims: Any) -> str:
        return external.token(**{"email_verified": True, **claims})

    async def body(identity: Identity) -> None:
        user = await identity.create_user(email="ivy@example.com", password=None)
        domain = await identity.create_domain(alias="acme", name="", owner_id=user.id)
        for kid in ("ed-1", "es-1", "rs-1"):
            token = verified(kid=kid, sub="idp-123", email="IVY@example.com")
            principal = await identity.authenticate_principal(token)
            assert principal.user.id == user.id and principal.token_kind == "oidc"
        caller = await identity.authenticate(verified(email="ivy@example.com"), domain_alias="acme")
        assert caller.domain_id == domain.id and caller.token_kind == "oidc"
        assert "manage_members" in caller.actions  # the owner's actions

        refused = [
            verified(email="nobody@example.com"),  # no such user
            verified(email="ivy@example.com", aud="someone-else"),
            # Only the JSON value true vouches for the address:
            verified(email="ivy@example.com", email_verified=False),
            verified(email="ivy@example.com", email_verified="true"),
            verified(email="ivy@example.com", email_verified=1),
            external.token(email="ivy@example.com"),  # no email_verified claim
            verified(email="ivy@example.com", exp=int(time.time()) - 3600),
            verified(sub="no-email"),
            jwt.encode(
                {"iss": "https://idp.example", "aud": "cube-proxy", "email": "ivy@example.com"},
                "k" * 32,
                "HS256",
                headers={"kid": "ed-1"},
            ),
            TokenIssuer(issuer="https://idp.example", audience="cube-proxy").token(
                email="ivy@example.com"
            ),  # same kid, another key
            TokenIssuer(issuer="https://evil.example", audience="cube-proxy").token(
                email="ivy@example.com"
            ),
        ]
        for token in refused:
            with pytest.raises(Unauthorized):
                await identity.authenticate_principal(token)
        with pytest.raises(AuthError):
            await identity.authenticate(verified(email="ivy@example.com"), domain_alias=None)
        await identity.update_user(user.id, disabled=True)
        with pytest.raises(Unauthorized):
            await identity.authenticate_principal(verified(email="ivy@example.com"))

    use_identity(str(tmp_path / "p.db"), body, oidc=oidc)


def test_oidc_config_requires_one_jwks_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        OidcConfig(issuer="https://i", audience="a")
    with pytest.raises(ValueError, match="https"):
        OidcConfig(issuer="https://i", audience="a", jwks_url="http://idp/jwks")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "x", "k": "AAAA"}]}))
    with pytest.raises(StartupError, match="OIDC"):
        use_identity(
            str(tmp_path / "p.db"),
            _noop,
            oidc=OidcConfig(issuer="https://i", audience="a", jwks_file=bad),
        )


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "EC", "kid": "k", "crv": "P-999", "x": "AAAA", "y": "AAAA"},  # InvalidKeyError
        {"kty": "RSA", "kid": "k", "e": "AQAB"},  # no modulus
        {"kty": ["RSA"], "kid": "k"},  # an unhashable kty (a TypeError)
        {"kty": "RSA", "kid": "k", "alg": {"x": 1}},
    ],
)
def test_an_oidc_jwks_entry_pyjwt_cannot_build_is_a_jwks_error(jwk: dict[str, Any]) -> None:
    """Refused as the JWKS it is (the previous keys stay), never another exception: one that
    escaped killed the periodic refresh task and made token checks answer 500."""
    from proxy.identity.oidc import JwksError
    from proxy.identity.oidc import parse_jwks as parse_oidc_jwks

    with pytest.raises(JwksError):
        parse_oidc_jwks(json.dumps({"keys": [jwk]}).encode())


def test_a_short_rsa_key_of_the_oidc_issuer_is_refused() -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric import rsa

    from proxy.identity.oidc import JwksError
    from proxy.identity.oidc import parse_jwks as parse_oidc_jwks

    def jwk(bits: int) -> dict[str, str]:
        numbers = rsa.generate_private_key(65537, bits).public_key().public_numbers()
        n = numbers.n.to_bytes((bits + 7) // 8, "big")
        encoded = base64.urlsafe_b64encode(n).rstrip(b"=").decode()
        return {"kty": "RSA", "kid": f"k{bits}", "n": encoded, "e": "AQAB", "alg": "RS256"}

    with pytest.raises(JwksError, match="1024 bits"):
        parse_oidc_jwks(json.dumps({"keys": [jwk(1024)]}).encode())
    assert set(parse_oidc_jwks(json.dumps({"keys": [jwk(2048)]}).encode())) == {"k2048"}


def test_run_helper_is_isolated() -> None:
    # Each test runs its own loop: nothing leaks between them.
    assert run(asyncio.sleep(0, result=7)) == 7


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the certificate is its own CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "idp.pem", tmp_path / "idp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_oidc_jwks_from_an_https_url_follows_key_rotation(tmp_path: Path) -> None:
    """The issuer's JWKS is fetched over verified TLS, and fetched again when a token names a
    kid it does not hold (the issuer rotated)."""
    import ssl

    from aiohttp import web

    from tests.proxy.conftest import free_port

    external = TokenIssuer(issuer="https://idp.example", audience="cube-proxy")
    rotated = TokenIssuer(issuer="https://idp.example", audience="cube-proxy")
    rotated.keys = {"ed-2": rotated.keys["ed-1"]}
    published = {"jwks": external.jwks()}
    fetches = []
    cert, key = _self_signed(tmp_path)
    port = free_port()

    async def body() -> None:
        async def jwks(request: web.Request) -> web.Response:
            fetches.append(request.path)
            return web.json_response(published["jwks"])

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        runner = web.AppRunner(app)
        await runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        try:
            oidc = OidcConfig(
                issuer="https://idp.example",
                audience="cube-proxy",
                jwks_url=f"https://127.0.0.1:{port}/jwks",
                jwks_ca_file=cert,
            )
            from proxy.identity import Identity as Id
            from tests.proxy.conftest import identity_config

            identity = await Id.open(identity_config(str(tmp_path / "p.db"), oidc=oidc))
            try:
                await identity.create_user(email="ivy@example.com")
                token = external.token(email="ivy@example.com", email_verified=True)
                assert (await identity.authenticate_principal(token)).token_kind == "oidc"
                assert len(fetches) == 1
                published["jwks"] = {"keys": [*external.jwks()["keys"], *rotated.jwks()["keys"]]}
                new = rotated.token(kid="ed-2", email="ivy@example.com", email_verified=True)
                assert (await identity.authenticate_principal(new)).user.email == "ivy@example.com"
                assert len(fetches) == 2
            finally:
                await identity.close()
            # Without the CA, the issuer's certificate is not trusted: the proxy will not start.
            untrusted = OidcConfig(
                issuer="https://idp.example",
                audience="cube-proxy",
                jwks_url=f"https://127.0.0.1:{port}/jwks",
            )
            with pytest.raises(StartupError, match="OIDC"):
                await Id.open(identity_config(str(tmp_path / "q.db"), oidc=untrusted))
        finally:
            await runner.cleanup()

    run(body())
