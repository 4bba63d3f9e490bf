"""Two refusals of the agent's token checks that the JWT library alone would not make: a token
declaring a critical header extension (even one PyJWT understands, ``b64``) is refused, and the
JWKS URL's redirects are not followed (a redirect is a failed fetch; the keys stay)."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.auth import AuthError, JwksError, JwksFetcher, KeySet, TokenVerifier, parse_jwks
from agent.identity import AgentIdentity
from tests.agent.conftest import RecordingBackend, RunningAgent, StartAgent
from tests.agent.test_auth import verifier
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_with_header(issuer: TokenIssuer, extra_header: dict[str, Any]) -> str:
    """A correctly signed EdDSA token (kid ``ed-1``) whose protected header carries
    ``extra_header`` (assembled by hand: PyJWT would rewrite a ``b64`` header)."""
    _, key = issuer.keys["ed-1"]
    header = {"alg": "EdDSA", "typ": "JWT", "kid": "ed-1", **extra_header}
    head = _b64url(json.dumps(header).encode())
    body = _b64url(json.dumps(issuer.claims()).encode())
    signature = key.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64url(signature)}"


# A critical extension PyJWT itself supports and would accept (b64=true: the usual encoding):
# only the agent's own rule refuses it.
CRIT_B64 = {"crit": ["b64"], "b64": True}


def test_a_critical_header_extension_is_refused_by_theverifier() -> None:
    issuer = TokenIssuer()
    v = verifier(issuer)
    assert v.verify(signed_with_header(issuer, {})).subject == "user-1"  # the forging is sound
    for extra in (CRIT_B64, {"crit": ["x"]}, {"crit": ["exp"]}):
        with pytest.raises(AuthError) as refused:
            v.verify(signed_with_header(issuer, extra))
        assert refused.value.status == 401 and refused.value.reason == "malformed", extra
    with pytest.raises(AuthError, match="critical token header extensions"):
        v.verify(signed_with_header(issuer, CRIT_B64))


@pytest.fixture
def agent(start_agent: StartAgent, backend: RecordingBackend) -> Iterator[RunningAgent]:
    yield start_agent({"backend_url": backend.url})


def test_a_token_with_a_critical_header_gets_401_and_nothing_is_forwarded(
    agent: RunningAgent, backend: RecordingBackend
) -> None:
    for extra in (CRIT_B64, {"crit": ["x"]}):
        token = signed_with_header(agent.issuer, extra)
        reply = agent.post_json(
            "/v1/chat/completions",
            {"model": "cube-tiny", "messages": [{"role": "user", "content": "hi"}]},
            token=token,
        )
        assert reply.status == 401, (extra, reply.body)
        assert reply.json()["error"]["code"] == "malformed"
        assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert backend.requests == []


def test_the_jwks_fetch_does_not_follow_a_redirect() -> None:
    """The JWKS URL answers 302 to another document: the fetch fails and the keys it had are
    kept (a redirect could lead anywhere the issuer's URL does not)."""
    first, elsewhere = TokenIssuer(), TokenIssuer()
    elsewhere.keys = {"ed-2": elsewhere.keys["ed-1"]}
    server_identity = AgentIdentity.generate()
    served = {"elsewhere": 0}

    async def jwks(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere.json")

    async def other(request: web.Request) -> web.Response:
        served["elsewhere"] += 1
        return web.json_response(elsewhere.jwks())

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        app.router.add_get("/elsewhere.json", other)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_identity.ssl_context())
        await site.start()
        port = runner.addresses[0][1]
        try:
            keys = KeySet(parse_jwks(json.dumps(first.jwks()).encode()))
            fetcher = JwksFetcher(
                f"https://127.0.0.1:{port}/jwks.json",
                keys,
                ssl_context=ssl.create_default_context(cadata=server_identity.cert_pem.decode()),
            )
            async with aiohttp.ClientSession() as session:
                with pytest.raises(JwksError, match="302"):
                    await fetcher.fetch_once(session)
                assert await fetcher._try_fetch(session) is False
            assert served["elsewhere"] == 0
            assert fetcher.fetches == 0
            assert keys.get("ed-1") is not None and keys.get("ed-2") is None
            v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
            assert v.verify(first.token()).subject == "user-1"
        finally:
            await runner.cleanup()

    asyncio.run(main())
