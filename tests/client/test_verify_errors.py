"""How fetching evidence fails, for a user: a URL that cannot be attested is malformed input
(exit 3), an API key no header can carry is refused without being quoted back, and
``timeout`` bounds the whole fetch even against an endpoint that answers a byte a second."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from attestation.errors import MalformedError
from attestation.policy import Policy
from cube_client import ClientError, averify_endpoint, parse_endpoint, verify_endpoint

POLICY = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})


def test_a_plain_http_agent_url_is_malformed_input() -> None:
    with pytest.raises(MalformedError) as info:
        parse_endpoint("http://127.0.0.1:8443")
    assert info.value.exit_code == 3 and "https://" in info.value.message


def test_an_api_key_no_header_can_carry_is_refused_unquoted() -> None:
    secret = "cube_pat_SECRET-VALUE-1234"
    with pytest.raises(MalformedError) as info:
        verify_endpoint("http://127.0.0.1:9/acme", POLICY, api_key=secret + "\r")
    assert secret not in str(info.value) and "characters" in info.value.message


@pytest.fixture
def trickling() -> Iterator[int]:
    """An HTTP server that sends its head, then one body byte a second, forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    def trickle(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n")
            while not stop.is_set():
                conn.sendall(b"{")
                time.sleep(1)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    time.sleep(0.3)  # the accept loop sees stop before the socket goes
    listener.close()


def test_timeout_bounds_the_whole_fetch(trickling: int) -> None:
    url = f"http://127.0.0.1:{trickling}/acme"
    started = time.monotonic()
    with pytest.raises(ClientError, match="not complete within 2 s"):
        verify_endpoint(url, POLICY, timeout=2)
    with pytest.raises(ClientError, match="not complete within 2 s"):
        asyncio.run(averify_endpoint(url, POLICY, timeout=2))
    assert time.monotonic() - started < 20  # (each read alone is within the timeout)
