"""Caching must never cache a verdict (speed itself is measured by scripts/bench-attestation)."""

from __future__ import annotations

import pytest

from attestation import tdx
from attestation.errors import SignatureError
from tests import vectors

PHALA = vectors.vector("tdx-v4-phala-uptodate")


def test_quote_signatures_are_not_cached() -> None:
    """A tampered quote fails even right after the genuine one verified (no verdict cache)."""
    raw = vectors.file_of(PHALA, "quote")
    collateral = tdx.Collateral.from_json(vectors.read(PHALA["files"]["collateral_phala"]["path"]))
    now = vectors.time_inside(PHALA)
    tdx.verify_quote(tdx.parse_quote(raw), collateral=collateral, now=now)
    tampered = raw[:200] + bytes([raw[200] ^ 1]) + raw[201:]
    with pytest.raises(SignatureError):
        tdx.verify_quote(tdx.parse_quote(tampered), collateral=collateral, now=now)
