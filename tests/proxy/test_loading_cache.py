"""The identity layer's cache (proxy/identity/_cache.py): a lookup made after a clear (a
revocation was committed and announced) never takes the answer of a load begun before it."""

from __future__ import annotations

import asyncio

from proxy.identity._cache import LoadingCache


def test_a_lookup_after_a_clear_does_not_join_a_load_from_before_it() -> None:
    async def main() -> tuple[str, str]:
        cache = LoadingCache(60.0)
        release = asyncio.Event()

        async def before() -> tuple[str, None]:  # read the row before the revocation
            await release.wait()
            return "valid", None

        async def after() -> tuple[str, None]:  # what the database says now
            return "revoked", None

        first = asyncio.create_task(cache.load("token", before))
        await asyncio.sleep(0)
        cache.clear()  # the revocation is committed and announced
        second = asyncio.create_task(cache.load("token", after))
        await asyncio.sleep(0)
        release.set()
        return await first, await second

    first, second = asyncio.run(main())
    assert second == "revoked"
    assert first == "valid"  # its own caller started before the clear
