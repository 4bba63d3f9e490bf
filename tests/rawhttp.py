"""A request with exactly the headers given, repeated names included (``http.client``'s
``request`` takes a dict, which cannot hold a header twice)."""

from __future__ import annotations

import http.client
from collections.abc import Sequence


def post_raw(
    conn: http.client.HTTPConnection, path: str, headers: Sequence[tuple[str, str]], body: bytes
) -> tuple[int, bytes]:
    """POST ``body`` with ``headers`` (in order, as given) and a Content-Length; the status and
    the body of the answer."""
    try:
        conn.putrequest("POST", path)
        for name, value in (*headers, ("Content-Length", str(len(body)))):
            conn.putheader(name, value)
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()
