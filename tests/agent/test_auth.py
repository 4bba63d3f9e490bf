"""Bearer JWT authentication, against the real agent over TLS and a recording backend.

Every refusal is a 401 (403 for scopes) with a JSON error and ``WWW-Authenticate``; the backend
records nothing for refused requests; the reason is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from agent.auth import (
    LEEWAY_SECONDS,
    AuthError,
    JwksError,
    JwksFetcher,
    KeySet,
    TokenVerifier,
    parse_jwks,
    parse_scope,
)
from agent.identity import AgentIdentity
from tests.agent.conftest import RecordingBackend, RunningAgent, StartAgent
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand (for tokens no library would sign)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hs256_with_public_key(issuer: TokenIssuer, kid: str) -> str:
    """The HS/RS confusion: HMAC-SHA256 keyed with the issuer's PUBLIC key (PEM), which a naive
    verifier would accept if it let the token choose the algorithm."""
    _, key = issuer.keys[kid]
    secret = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(issuer.claims()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


@pytest.fixture
def agent(start_agent: StartAgent, backend: RecordingBackend) -> Iterator[RunningAgent]:
    yield start_agent({"backend_url": backend.url})


def chat(agent: RunningAgent, token: str | None, model: str = "cube-tiny") -> Any:
    return agent.post_json(
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        token=token,
    )


def failures(agent: RunningAgent, reason: str) -> float:
    from agent.metrics import METRICS

    value = agent.app[METRICS].registry.get_sample_value(
        "cube_agent_auth_failures_total", {"reason": reason}
    )
    return value or 0.0


def test_valid_tokens_of_every_key_type_are_forwarded(
    agent: RunningAgent, backend: RecordingBackend
) -> None:
    for kid in ("ed-1", "es-1", "rs-1"):
        reply = chat(agent, agent.token(kid=kid))
        assert reply.status == 200, reply.body
        assert reply.json()["choices"][0]["message"]["content"] == "RESPONSE-TEXT-7f3a"
    assert len(backend.requests) == 3
    # The credential never reaches the backend.
    assert all("Authorization" not in r.headers for r in backend.requests)


def _cases(issuer: TokenIssuer) -> dict[str, tuple[str | None, str]]:
    now = int(time.time())
    other = TokenIssuer()  # same kids, different keys
    claims = issuer.claims()
    ed_key, es_key = issuer.keys["ed-1"][1], issuer.keys["es-1"][1]
    head, _, sig = issuer.token().split(".")
    tampered = f"{head}.{b64url(json.dumps(issuer.claims(sub='admin')).encode())}.{sig}"
    bad = "bad_algorithm"
    return {
        "expired": (issuer.token(exp=now - 120, iat=now - 600, nbf=now - 600), "expired"),
        "not yet valid (nbf)": (issuer.token(nbf=now + 600), "not_yet_valid"),
        "issued in the future (iat)": (issuer.token(iat=now + 600), "not_yet_valid"),
        "wrong audience": (issuer.token(aud="domain-b"), "bad_audience"),
        "wrong issuer": (issuer.token(iss="https://evil.test"), "bad_issuer"),
        "alg none": (forge({"alg": "none", "typ": "JWT", "kid": "ed-1"}, claims), bad),
        "alg None spelled otherwise": (forge({"alg": "None", "kid": "ed-1"}, claims), bad),
        "HS256 keyed with the RSA public key": (hs256_with_public_key(issuer, "rs-1"), bad),
        "HS256 keyed with the EC public key": (hs256_with_public_key(issuer, "es-1"), bad),
        "ES256 header on the Ed25519 key": (
            jwt.encode(claims, es_key, algorithm="ES256", headers={"kid": "ed-1"}),
            bad,
        ),
        "signed by another key with a known kid": (other.token(kid="rs-1"), "bad_signature"),
        "unknown kid": (
            jwt.encode(claims, ed_key, algorithm="EdDSA", headers={"kid": "ed-9"}),
            "unknown_kid",
        ),
        "no kid": (
            jwt.encode(claims, ed_key, algorithm="EdDSA"),
            "unknown_kid",
        ),
        "missing sub": (issuer.token(sub=None), "missing_claim"),
        "missing exp": (issuer.token(exp=None), "missing_claim"),
        "missing iat": (issuer.token(iat=None), "missing_claim"),
        "missing aud": (issuer.token(aud=None), "missing_claim"),
        "missing iss": (issuer.token(iss=None), "missing_claim"),
        "empty sub": (issuer.token(sub=""), "missing_claim"),
        "garbage": ("garbage", "malformed"),
        "three garbage parts": ("a.b.c", "malformed"),
        "critical header": (issuer.token(headers={"crit": ["exp"]}), "malformed"),
        "huge": ("a" * 17000 + ".b.c", "malformed"),
        "tampered payload": (tampered, "bad_signature"),
    }


CASES = list(_cases(TokenIssuer()))


@pytest.mark.parametrize("case", CASES)
def test_bad_tokens_are_refused_and_nothing_is_forwarded(
    agent: RunningAgent, backend: RecordingBackend, case: str
) -> None:
    token, reason = _cases(agent.issuer)[case]
    before = failures(agent, reason)
    reply = chat(agent, token)
    assert reply.status == 401, (case, reply.body)
    error = reply.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == reason
    assert reply.headers["WWW-Authenticate"].startswith('Bearer realm="cube-agent"')
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert backend.requests == []
    assert failures(agent, reason) == before + 1
    assert token is None or token not in reply.body.decode()


def test_leeway_accepts_a_token_that_just_expired(agent: RunningAgent) -> None:
    now = int(time.time())
    assert chat(agent, agent.token(exp=now - 10, iat=now - 300, nbf=now - 300)).status == 200
    assert chat(agent, agent.token(nbf=now + 10)).status == 200


def test_audience_lists_are_accepted_when_they_name_this_domain(agent: RunningAgent) -> None:
    assert chat(agent, agent.token(aud=["other", AUDIENCE])).status == 200


def test_missing_token_is_a_plain_challenge(agent: RunningAgent, backend: RecordingBackend) -> None:
    reply = chat(agent, None)
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="cube-agent"'
    assert reply.json()["error"]["code"] == "missing"
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", agent.token()):
        reply = agent.post_json("/v1/chat/completions", {}, headers={"Authorization": header})
        assert reply.status == 401, header
        assert reply.json()["error"]["code"] == "malformed"
    assert backend.requests == []


def test_token_without_the_inference_scope_is_forbidden(
    agent: RunningAgent, backend: RecordingBackend
) -> None:
    for scope in (None, "", "models:read", "model:cube-tiny"):
        reply = chat(agent, agent.token(scope=scope))
        assert reply.status == 403, scope
        assert reply.json()["error"]["type"] == "permission_error"
        assert reply.json()["error"]["code"] == "insufficient_scope"
        assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]
    assert backend.requests == []
    assert failures(agent, "insufficient_scope") == 4


def test_model_outside_the_tokens_scope_is_forbidden(
    agent: RunningAgent, backend: RecordingBackend
) -> None:
    reply = chat(agent, agent.token(scope="inference model:other-model"))
    assert reply.status == 403, reply.body
    assert "error" in reply.json()
    assert backend.requests == []
    assert chat(agent, agent.token(scope="inference model:cube-tiny")).status == 200
    assert len(backend.requests) == 1


def test_endpoint_outside_the_tokens_scope_is_forbidden(
    agent: RunningAgent, backend: RecordingBackend
) -> None:
    reply = chat(agent, agent.token(scope="inference endpoint:embeddings"))
    assert reply.status == 403, reply.body
    assert backend.requests == []


def test_public_routes_need_no_token(agent: RunningAgent) -> None:
    assert agent.get("/health").status == 200
    assert agent.get("/metrics").status == 200
    assert agent.get("/ready").status in (200, 503)
    assert agent.get("/attestation?nonce=" + "00" * 32).status == 200
    # ...but anything else does, even routes that do not exist (no route discovery).
    assert agent.get("/nope").status == 401
    assert agent.get("/health/").status == 401


# -- units -----------------------------------------------------------------------------------


def verifier(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        keys=KeySet(parse_jwks(json.dumps(issuer.jwks()).encode())),
    )


def test_principal_carries_subject_scopes_and_token_id() -> None:
    issuer = TokenIssuer()
    v = verifier(issuer)
    p = v.verify(
        issuer.token(sub="alice", jti="t-1", scope="inference model:a model:b endpoint:chat")
    )
    assert p.subject == "alice" and p.token_id == "t-1"
    assert p.models == frozenset({"a", "b"}) and p.endpoints == frozenset({"chat"})
    assert p.allows_model("a") and not p.allows_model("c")
    anyone = v.verify(issuer.token())
    assert anyone.models is None and anyone.endpoints is None


def test_scope_must_be_a_string() -> None:
    with pytest.raises(AuthError):
        parse_scope(["inference"])
    assert parse_scope(None)[0] == frozenset()


def test_keys_not_loaded_is_503() -> None:
    issuer = TokenIssuer()
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=KeySet())
    with pytest.raises(AuthError) as err:
        v.verify(issuer.token())
    assert err.value.status == 503


def _jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        out = json.loads(RSAAlgorithm.to_jwk(key))
    else:
        out = json.loads(ECAlgorithm.to_jwk(key))
    out.update({"kid": kid, **extra})
    return out


def _ec(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(curve or ec.SECP256R1()).public_key()


def _rsa(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}], "private or symmetric"),
        ([_jwk(ec.generate_private_key(ec.SECP256R1()), "p")], "private"),
        ([_jwk(_ec(), "a")] * 2, "two keys"),
        ([_jwk(_ec(), "a", alg="RS256")], "does not fit"),
        ([_jwk(_ec(), "a", alg="HS256")], "does not fit"),
        ([_jwk(_ec(ec.SECP521R1()), "a")], "not accepted"),
        ([_jwk(_rsa(2048), "a")], "private"),
        ([_jwk(_rsa(1024).public_key(), "a")], "2048"),
        ([_jwk(_ec(), "a", use="enc")], "signing"),
        ([{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}], "no kid"),
        ([{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "bad"}], "not a valid key"),
        ([], "no keys"),
    ],
)  # fmt: skip
def test_jwks_is_strict(keys: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(JwksError, match=message):
        parse_jwks(json.dumps({"keys": keys}).encode())


def test_jwks_alg_narrows_an_rsa_key_to_one_algorithm() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = parse_jwks(json.dumps({"keys": [_jwk(key.public_key(), "r", alg="PS256")]}).encode())
    assert keys["r"].algorithms == frozenset({"PS256"})
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=KeySet(keys))
    claims = TokenIssuer().claims()
    assert v.verify(jwt.encode(claims, key, algorithm="PS256", headers={"kid": "r"})).subject
    with pytest.raises(AuthError, match="algorithm"):
        v.verify(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "r"}))


def test_es384_and_eddsa_keys() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    from jwt.algorithms import OKPAlgorithm

    ed_jwk = json.loads(OKPAlgorithm.to_jwk(ed.public_key()))
    ed_jwk["kid"] = "e"
    keys = parse_jwks(json.dumps({"keys": [_jwk(p384.public_key(), "p"), ed_jwk]}).encode())
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=KeySet(keys))
    claims = TokenIssuer().claims()
    assert v.verify(jwt.encode(claims, p384, algorithm="ES384", headers={"kid": "p"})).subject
    assert v.verify(jwt.encode(claims, ed, algorithm="EdDSA", headers={"kid": "e"})).subject


def test_jwks_url_is_fetched_over_https_and_refreshed_for_a_new_kid() -> None:
    """The issuer serves its JWKS over TLS; the agent's fetcher pins that server's certificate
    (here) or the system roots (production), and refreshes when a token names a new kid."""
    first, rotated = TokenIssuer(), TokenIssuer()
    rotated.keys = {"ed-2": rotated.keys["ed-1"]}
    server_identity = AgentIdentity.generate()
    current = {"doc": first.jwks()}

    async def jwks(request: web.Request) -> web.Response:
        del request
        return web.json_response(current["doc"])

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_identity.ssl_context())
        await site.start()
        port = runner.addresses[0][1]
        try:
            import ssl

            client_ctx = ssl.create_default_context(cadata=server_identity.cert_pem.decode())
            keys = KeySet()
            fetcher = JwksFetcher(
                f"https://127.0.0.1:{port}/.well-known/jwks.json",
                keys,
                ssl_context=client_ctx,
                min_interval=0.0,
                refresh=3600,
            )
            v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
            ctx = fetcher.cleanup_ctx(app)
            await ctx.__anext__()
            try:
                assert fetcher.fetches == 1
                assert v.verify(first.token()).subject == "user-1"
                # The issuer rotates to a new key: the first token naming it triggers a refresh.
                current["doc"] = rotated.jwks()
                with pytest.raises(AuthError, match="kid"):
                    v.verify(rotated.token(kid="ed-2"))
                for _ in range(100):
                    if fetcher.fetches == 2:
                        break
                    await asyncio.sleep(0.02)
                assert fetcher.fetches == 2
                assert v.verify(rotated.token(kid="ed-2")).subject == "user-1"
                with pytest.raises(AuthError, match="kid"):
                    v.verify(first.token())  # the old key is gone
            finally:
                with pytest.raises(StopAsyncIteration):
                    await ctx.__anext__()
            # A server whose certificate is not trusted is never believed.
            untrusting = JwksFetcher(f"https://127.0.0.1:{port}/.well-known/jwks.json", KeySet())
            import aiohttp

            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    await untrusting.fetch_once(session)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_a_jwks_arriving_in_pieces_is_read_whole_and_an_oversized_one_refused() -> None:
    """An issuer that writes its JWKS in several pieces (chunked, or just slow) is read whole:
    one ``content.read(n)`` returns only what has arrived."""
    import ssl

    import aiohttp

    issuer = TokenIssuer()
    doc = json.dumps(issuer.jwks()).encode()
    server_identity = AgentIdentity.generate()

    async def in_pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(doc), 200):
            await response.write(doc[start : start + 200])
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    async def oversized(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"keys": [' + b" " * (2 * 1024 * 1024))
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", in_pieces)
        app.router.add_get("/big.json", oversized)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_identity.ssl_context())
        await site.start()
        port = runner.addresses[0][1]
        client_ctx = ssl.create_default_context(cadata=server_identity.cert_pem.decode())
        try:
            async with aiohttp.ClientSession() as session:
                keys = KeySet()
                url = f"https://127.0.0.1:{port}/jwks.json"
                await JwksFetcher(url, keys, ssl_context=client_ctx).fetch_once(session)
                v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
                assert v.verify(issuer.token()).subject == "user-1"
                big = f"https://127.0.0.1:{port}/big.json"
                with pytest.raises(JwksError, match="larger than"):
                    await JwksFetcher(big, KeySet(), ssl_context=client_ctx).fetch_once(session)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_jwks_url_must_be_https() -> None:
    with pytest.raises(JwksError):
        JwksFetcher("http://issuer.test/jwks", KeySet())


def test_a_jwks_url_with_credentials_is_refused_by_the_configuration() -> None:
    """They would be logged with every failed fetch; a JWKS is public anyway."""
    from agent.config import AgentConfig, ConfigError

    with pytest.raises(ConfigError, match="credentials") as refused:
        AgentConfig(
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            jwks_url="https://reader:s3cret@issuer.test/jwks",
            model_dir="/models/cube-tiny",
            model_digest="sha256:" + "0" * 64,
        ).validate()
    assert "s3cret" not in str(refused.value)


def test_verified_token_cache_honours_expiry_and_key_rotation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer = TokenIssuer()
    keys = KeySet(parse_jwks(json.dumps(issuer.jwks()).encode()))
    cached = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    now = time.time()
    token = issuer.token(exp=int(now) + 60)
    assert cached.verify(token, now=now).subject == "user-1"
    assert cached.verify(token, now=now + 1).subject == "user-1"  # served from the cache

    # The cache never outlives the token (plus leeway): past it, the token is verified again.
    def full_verification(_token: str) -> Any:
        raise AuthError("expired", "verified again")

    with monkeypatch.context() as m:
        m.setattr(cached, "_verify_uncached", full_verification)
        assert cached.verify(token, now=now + 30).subject == "user-1"
        with pytest.raises(AuthError, match="verified again"):
            cached.verify(token, now=now + 60 + LEEWAY_SECONDS + 1)
    # ...nor the keys that verified it: after rotation the old kid is unknown.
    fresh = TokenIssuer()
    keys.replace(parse_jwks(json.dumps(fresh.jwks()).encode()))
    with pytest.raises(AuthError) as rotated:
        cached.verify(token, now=now + 1)
    assert rotated.value.reason in {"unknown_kid", "bad_signature"}
    # A different token is verified on its own, not confused with a cached one.
    other = fresh.token(scope="inference model:only-this")
    assert cached.verify(other).models == frozenset({"only-this"})
