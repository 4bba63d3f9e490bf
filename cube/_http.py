"""HTTP helpers the agent and the proxy share: reading a body within a size limit (a client
response's — JWKS, evidence — or a request's), and telling a content-encoded request body."""

from __future__ import annotations

import aiohttp
from multidict import MultiMapping

__all__ = ["BodyTooLarge", "is_content_encoded", "read_at_most", "read_stream_at_most"]


class BodyTooLarge(Exception):
    """The body is longer than the limit (nothing past the limit was read)."""


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, however many pieces it arrives in; :class:`BodyTooLarge` past ``limit``.

    ``response.content.read(n)`` returns what has arrived so far, not ``n`` bytes: a body sent
    in two packets would be cut in half by a single call.
    """
    return await read_stream_at_most(response.content, limit, response.content_length)


async def read_stream_at_most(
    stream: aiohttp.StreamReader, limit: int, declared: int | None
) -> bytes:
    """A body from ``stream`` (a client response's or a server request's), refused unread if
    its ``declared`` length is over ``limit``, and as soon as more than ``limit`` arrives."""
    if (declared or 0) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for piece in stream.iter_chunked(64 * 1024):
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
    return bytes(body)


def is_content_encoded(headers: MultiMapping[str]) -> bool:
    """Whether any ``Content-Encoding`` header names something other than ``identity`` (every
    such header counts: reading the first only let ``identity`` then ``gzip`` through)."""
    values = headers.getall("Content-Encoding", ())
    return any(value.strip().lower() not in ("identity", "") for value in values)
