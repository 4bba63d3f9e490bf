"""Timing of quote verification (pytest-benchmark; run with --benchmark-enable to measure)."""

from __future__ import annotations

from typing import Any

import pytest

from attestation.tpm import verify_quote
from tests.tpm._cases import case


@pytest.mark.parametrize(
    ("case_id", "with_log"),
    [("tpm-azure-snp-milan-vtpm", False), ("tpm-gce-cos85-nonce#1", False),
     ("tpm-gce-cos85-nonce#1", True)],
    ids=["azure-rsa2048", "gce-rsa2048", "gce-rsa2048+event-log"],
)  # fmt: skip
def test_verify_quote_speed(benchmark: Any, case_id: str, with_log: bool) -> None:
    c = case(case_id)

    def run() -> object:
        return verify_quote(
            attest=c.attest,
            signature=c.signature,
            ak=c.ak,
            pcrs=c.pcrs,
            qualifying_data=c.qualifying_data,
            event_log=c.event_log if with_log else None,
        )

    result = benchmark(run)
    assert result is not None
