"""Reading an aiohttp client response's body within a size limit (shared by the agent and the
proxy for documents fetched from elsewhere: JWKS, evidence)."""

from __future__ import annotations

import aiohttp

__all__ = ["BodyTooLarge", "read_at_most"]


class BodyTooLarge(Exception):
    """The body is longer than the limit (nothing past the limit was read)."""


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, however many pieces it arrives in; :class:`BodyTooLarge` past ``limit``.

    ``response.content.read(n)`` returns what has arrived so far, not ``n`` bytes: a body sent
    in two packets would be cut in half by a single call.
    """
    if (response.content_length or 0) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for piece in response.content.iter_chunked(64 * 1024):
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
    return bytes(body)
