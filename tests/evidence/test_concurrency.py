"""Concurrent collection: every document verifies and answers its own nonce, because the
collector serialises access to the device (configfs-tsm allows one report at a time)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from attestation import evidence
from attestation.guest import TeeDevice, TeeEvidence
from attestation.guest._evidence import Platform
from tests.evidence import _util as e

NONCES = [hashlib.sha512(bytes([i])).digest()[: 32 + i] for i in range(12)]


class CountingDevice:
    """A TeeDevice that records how many callers are inside it at once."""

    def __init__(self, inner: TeeDevice) -> None:
        self.inner = inner
        self.active = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def platform(self) -> Platform:
        return self.inner.platform

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.002)  # widen the window a second caller would have to slip in
            return self.inner.get_evidence(report_data)
        finally:
            with self._lock:
                self.active -= 1

    async def aget_evidence(self, report_data: bytes) -> TeeEvidence:
        return await asyncio.to_thread(self.get_evidence, report_data)


def _verify_all(documents: list[bytes], claims: bytes) -> None:
    assert len(set(documents)) == len(documents)
    for nonce, document in zip(NONCES, documents, strict=True):
        verified = evidence.verify_evidence(
            document, nonce=nonce, policy=e.ALLOW_SIMULATED, now=e.NOW
        )
        assert verified.nonce == nonce
        assert verified.claims.raw == claims


@pytest.mark.parametrize("device", sorted(e.DEVICES))
def test_threads(device: str) -> None:
    counting = CountingDevice(e.DEVICES[device]())
    collector = evidence.EvidenceCollector(tee=counting)
    claims = e.claims_bytes()
    with ThreadPoolExecutor(max_workers=8) as pool:
        documents = list(pool.map(lambda n: collector.collect(n, claims), NONCES))
    _verify_all(documents, claims)
    assert counting.calls == len(NONCES)
    assert counting.most == 1


@pytest.mark.parametrize("device", sorted(e.DEVICES))
def test_asyncio_gather(device: str) -> None:
    counting = CountingDevice(e.DEVICES[device]())
    collector = evidence.EvidenceCollector(tee=counting)
    claims = e.claims_bytes()

    async def gather() -> list[bytes]:
        return list(await asyncio.gather(*(collector.acollect(n, claims) for n in NONCES)))

    _verify_all(asyncio.run(gather()), claims)
    assert counting.most == 1


def test_acollect_does_not_block_the_event_loop() -> None:
    counting = CountingDevice(e.DEVICES["configfs-snp"]())
    collector = evidence.EvidenceCollector(tee=counting)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> bytes:
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        document = await collector.acollect(e.NONCE, e.claims_bytes())
        stop.set()
        await task
        return document

    document = asyncio.run(main())
    evidence.verify_evidence(document, nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW)
    assert ticks > 1  # the loop kept running while the device was busy
