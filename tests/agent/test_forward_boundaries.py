"""The forwarding boundary (agent.forward, agent.config) beyond test_forward.py: every hop-by-hop
header is stripped before the backend, only the listed backend response headers reach the client
(a backend's cookies, server banner or other headers are the agent's business, not the caller's),
and the backend URL is exactly ``http://`` on loopback with nothing that could name another
host."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from agent import forward
from agent.config import ConfigError
from agent.forward import upstream_headers
from tests.agent.test_config import valid

HOP_BY_HOP = {
    "Connection": "keep-alive",
    "Keep-Alive": "timeout=5",
    "Proxy-Connection": "keep-alive",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Transfer-Encoding": "chunked",
    "Upgrade": "h2c",
}


def test_every_hop_by_hop_header_is_stripped() -> None:
    request = make_mocked_request(
        "POST",
        "/v1/chat/completions",
        headers={**HOP_BY_HOP, "X-Kept": "1", "Expect": "100-continue", "Host": "agent.example"},
    )
    out = upstream_headers(request, has_body=True)
    for name in HOP_BY_HOP:
        assert name not in out, name
    assert "Expect" not in out and "Host" not in out
    assert out["X-Kept"] == "1"


def test_only_the_listed_backend_response_headers_reach_the_client() -> None:
    backend = CIMultiDict(
        {
            "Content-Type": "application/json",
            "X-Request-Id": "req-1",
            "Retry-After": "3",
            "Set-Cookie": "backend-session=1",
            "Server": "uvicorn",
            "X-Backend-Internal": "secret",
            "Access-Control-Allow-Origin": "*",
            "Connection": "keep-alive",
            "Content-Length": "10",
        }
    )
    upstream: Any = SimpleNamespace(headers=CIMultiDictProxy(backend))
    out = forward._response_headers(upstream)
    assert dict(out) == {
        "Content-Type": "application/json",
        "X-Request-Id": "req-1",
        "Retry-After": "3",
    }


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8000",  # http:// only
        "ftp://127.0.0.1:8000",
        "http://user@127.0.0.1:8000",  # no user info
        "http://user:pw@localhost:8000",
        "http://127.0.0.1:8000/?x=1",
        "http://127.0.0.1:8000/#f",
        "http://0.0.0.0:8000",
        "http://[::ffff:10.0.0.5]:8000",
        "http://127.0.0.1:99999",
        "http://",
    ],
)
def test_backend_url_must_be_plain_http_on_loopback(url: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        valid(backend_url=url).validate()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://127.0.0.2:8000", "http://[::1]:8000", "http://localhost"],
)
def test_loopback_backend_urls_are_accepted(url: str) -> None:
    assert valid(backend_url=url).validate().backend_url == url
