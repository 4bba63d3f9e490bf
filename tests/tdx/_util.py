"""Shared helpers for the TDX tests: the manifest's TDX vectors and their collateral."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from attestation import tdx
from tests import vectors

TDX_VECTORS = vectors.vectors(kind="tdx")
VECTOR_IDS = [v["id"] for v in TDX_VECTORS]
WITH_COLLATERAL = [v for v in TDX_VECTORS if "collateral" in v]
WITHOUT_COLLATERAL = [v for v in TDX_VECTORS if "collateral" not in v]

# Expected final TCB status per vector (None: no collateral, TCB not evaluated).
EXPECTED_STATUS: dict[str, str | None] = {
    "tdx-v4-phala-uptodate": "UpToDate",
    "tdx-v5-phala-tcb-not-supported": "TcbNotSupported",
    "tdx-v4-go-tdx-guest-spr-e4": "TcbNotSupported",
    "tdx-v5-go-tdx-guest": "UpToDate",
    "tdx-v4-trustee-4": "UpToDate",
    "tdx-v4-trustee-6-module3": "OutOfDate",
    "tdx-v4-gcp-cos-go-tdx-guest": None,
    "tdx-v4-azure-trustee": None,
}


def quote_bytes(v: dict[str, Any]) -> bytes:
    return vectors.file_of(v, "quote")


def pcs_qe_identity_body(signed: tdx.SignedJson) -> bytes:
    """A PCS-shaped QE identity body around the exact signed text taken from other collateral."""
    return (
        b'{"enclaveIdentity":'
        + signed.body
        + b',"signature":"'
        + signed.signature.hex().encode()
        + b'"}'
    )


def collateral_for(v: dict[str, Any]) -> tdx.Collateral | None:
    """The collateral a vector's ``files`` name (see MANIFEST.json), or None."""
    files = v["files"]
    if "collateral_phala" in files:
        return tdx.Collateral.from_json(vectors.read(files["collateral_phala"]["path"]))
    if "collateral_pcs" not in files:
        return None
    pcs = files["collateral_pcs"]
    if "from_phala" in pcs:
        # TCB info from a PCS response; QE identity, CRLs and chains from a dcap-qvl JSON.
        donor = tdx.Collateral.from_json(vectors.read(pcs["from_phala"]["path"]))
        own = tdx.Collateral.from_pcs(
            vectors.read(pcs["tcb_info"]["path"]),
            pcs_qe_identity_body(donor.qe_identity_signed),
        )
        return dataclasses.replace(
            donor, tcb_info=own.tcb_info, tcb_info_signed=own.tcb_info_signed, source="mixed"
        )

    def part(role: str) -> bytes | None:
        return vectors.read(pcs[role]["path"]) if role in pcs else None

    tcb_info, qe_identity = part("tcb_info"), part("qe_identity")
    assert tcb_info is not None and qe_identity is not None
    return tdx.Collateral.from_pcs(tcb_info, qe_identity, part("pck_crl"), part("root_crl"))


def verify(
    v: dict[str, Any],
    *,
    data: bytes | None = None,
    collateral: tdx.Collateral | str | None = "default",
    now: datetime | None = None,
) -> tdx.VerifiedTdxQuote:
    quote = tdx.parse_quote(quote_bytes(v) if data is None else data)
    coll = collateral_for(v) if collateral == "default" else collateral
    assert not isinstance(coll, str)
    return tdx.verify_quote(
        quote, collateral=coll, now=vectors.time_inside(v) if now is None else now
    )


def phala_json(v: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vectors.read(v["files"]["collateral_phala"]["path"]))
    return data


def signed_region_end(data: bytes) -> int:
    """Offset where the structure ends (the start of the trailing bytes)."""
    quote = tdx.parse_quote(data)
    return len(data) - len(quote.trailing)


def der_tlv(tag: int, body: bytes) -> bytes:
    """One DER TLV (definite, minimal length)."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def synthetic_crl(entries: int) -> bytes:
    """An ECDSA-SHA256 CRL listing ``entries`` revoked serials (not validly signed)."""
    alg = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    issuer = der_tlv(
        0x30, der_tlv(0x31, der_tlv(0x30, der_tlv(0x06, b"\x55\x04\x03") + der_tlv(0x0C, b"x")))
    )
    when = der_tlv(0x17, b"250101000000Z")
    revoked = b"".join(
        der_tlv(0x30, der_tlv(0x02, bytes([i % 128])) + when) for i in range(entries)
    )
    tbs = der_tlv(
        0x30, der_tlv(0x02, b"\x01") + alg + issuer + when + when + der_tlv(0x30, revoked)
    )
    return der_tlv(0x30, tbs + alg + der_tlv(0x03, bytes(65)))
