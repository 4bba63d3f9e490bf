"""Parsing TDX quotes: every manifest vector field by field, plus structural rejections."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import pytest

from attestation import tdx
from attestation.errors import MalformedError
from attestation.tdx._quote import HEADER_SIZE, TD10_REPORT_SIZE
from tests import vectors
from tests.tdx._util import TDX_VECTORS, VECTOR_IDS, quote_bytes


@pytest.fixture(params=TDX_VECTORS, ids=VECTOR_IDS)
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    v: dict[str, Any] = request.param
    return v


def test_every_tdx_vector_is_covered() -> None:
    assert len(TDX_VECTORS) == 8
    assert {v["check"] for v in TDX_VECTORS} == {"tdx", "tdx_azure"}


def test_parsed_fields_match_manifest(vector: dict[str, Any]) -> None:
    quote = tdx.parse_quote(quote_bytes(vector))
    fields = quote.fields()
    for key, expected in vector["parsed"].items():
        assert fields[key] == expected, key


def test_flat_fields_for_the_cli(vector: dict[str, Any]) -> None:
    fields = tdx.parse_quote(quote_bytes(vector)).fields()
    td = vector["parsed"]["td_report"]
    for key in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data", "mr_seam"):
        assert fields[key] == td[key]
    assert fields["td_attributes"] == td["td_attributes"]
    assert fields["xfam"] == td["xfam"]


def test_pck_extensions_match_manifest(vector: dict[str, Any]) -> None:
    quote = tdx.parse_quote(quote_bytes(vector))
    got = quote.pck_extensions.fields()
    for key, expected in vector["pck_extensions"].items():
        assert got[key] == expected, key
    assert len(quote.pck_chain) == len(vector["pck_chain"])


def test_trailing_bytes_are_kept_not_rejected(vector: dict[str, Any]) -> None:
    data = quote_bytes(vector)
    quote = tdx.parse_quote(data)
    assert len(quote.trailing) == vector["parsed"]["trailing_bytes"]
    assert data.endswith(quote.trailing)
    assert quote.sig_data_len == vector["parsed"]["sig_data_len"]


def test_ascii_trailer_of_spr_e4_quote() -> None:
    quote = tdx.parse_quote(quote_bytes(vectors.vector("tdx-v4-go-tdx-guest-spr-e4")))
    assert quote.trailing == b"\nextra bytes(only for testing purpose)\n"


def test_v5_body_types() -> None:
    for vid in ("tdx-v5-go-tdx-guest", "tdx-v5-phala-tcb-not-supported"):
        quote = tdx.parse_quote(quote_bytes(vectors.vector(vid)))
        assert quote.version == 5
        assert quote.body_type == tdx.BODY_TYPE_TD15
        assert quote.td_report.tee_tcb_svn2 is not None
        assert quote.td_report.mr_service_td == bytes(48)
        assert len(quote.signed_data) == HEADER_SIZE + 6 + 648
    v4 = tdx.parse_quote(quote_bytes(vectors.vector("tdx-v4-phala-uptodate")))
    assert v4.body_type == tdx.BODY_TYPE_TD10
    assert v4.td_report.tee_tcb_svn2 is None
    assert len(v4.signed_data) == HEADER_SIZE + TD10_REPORT_SIZE


def test_trustee_parse_oracle() -> None:
    """trustee's expected claims for tdx_quote_4.dat: an independent parser's view."""
    v = vectors.vector("tdx-v4-trustee-4")
    oracle = json.loads(vectors.file_of(v, "expected_claims"))
    quote = tdx.parse_quote(quote_bytes(v))
    body, header = oracle["quote"]["body"], oracle["quote"]["header"]
    td = quote.td_report
    assert td.mr_td.hex() == body["mr_td"]
    assert td.mr_seam.hex() == body["mr_seam"]
    assert td.mr_signer_seam.hex() == body["mrsigner_seam"]
    assert td.mr_config_id.hex() == body["mr_config_id"]
    assert td.mr_owner.hex() == body["mr_owner"]
    assert td.mr_owner_config.hex() == body["mr_owner_config"]
    assert [r.hex() for r in td.rtmrs] == [body[f"rtmr_{i}"] for i in range(4)]
    assert td.report_data.hex() == body["report_data"] == oracle["report_data"]
    assert td.tee_tcb_svn.hex() == body["tcb_svn"]
    assert td.seam_attributes.hex() == body["seam_attributes"]
    assert td.td_attributes.hex() == body["td_attributes"]
    assert td.xfam.hex() == body["xfam"]
    assert quote.header.raw[0:2].hex() == header["version"]
    assert quote.header.raw[2:4].hex() == header["att_key_type"]
    assert quote.header.raw[4:8].hex() == header["tee_type"]
    assert quote.header.raw[8:12].hex() == header["reserved"]
    assert quote.header.qe_vendor_id.hex() == header["vendor_id"]
    assert quote.header.user_data.hex() == header["user_data"]
    assert td.debug is oracle["td_attributes"]["debug"]
    assert td.sept_ve_disable is oracle["td_attributes"]["septve_disable"]
    assert quote.pck_extensions.platform_instance_id is not None
    # trustee prints PlatformInstanceID byte-reversed; the DER OCTET STRING order is ours.
    assert quote.pck_extensions.platform_instance_id[::-1].hex() == oracle["platform_instance_id"]


def test_gcp_report_data_is_the_nonce() -> None:
    v = vectors.vector("tdx-v4-gcp-cos-go-tdx-guest")
    quote = tdx.parse_quote(quote_bytes(v))
    assert quote.report_data == vectors.file_of(v, "nonce")


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------

PHALA = vectors.vector("tdx-v4-phala-uptodate")
V5 = vectors.vector("tdx-v5-go-tdx-guest")


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def _sig_offset(data: bytes) -> int:
    quote = tdx.parse_quote(data)
    return len(quote.signed_data) + 4


@pytest.mark.parametrize("data", [b"", b"\x04", bytes(47), bytes(48), bytes(5000)])
def test_empty_and_short_inputs(data: bytes) -> None:
    with pytest.raises(MalformedError):
        tdx.parse_quote(data)


@pytest.mark.parametrize("seed", range(20))
def test_random_inputs(seed: int) -> None:
    rnd = os.urandom(64 + seed * 251)
    with pytest.raises(MalformedError):
        tdx.parse_quote(rnd)


def test_random_after_valid_header() -> None:
    header = quote_bytes(PHALA)[:HEADER_SIZE]
    for size in (0, 100, 632, 636, 5000):
        with pytest.raises(MalformedError):
            tdx.parse_quote(header + os.urandom(size))


@pytest.mark.parametrize("v", [PHALA, V5], ids=["v4", "v5"])
def test_every_truncation_of_the_structure(v: dict[str, Any]) -> None:
    data = quote_bytes(v)
    end = len(data) - len(tdx.parse_quote(data).trailing)
    for cut in [*range(0, end, 13), end - 1]:
        with pytest.raises(MalformedError):
            tdx.parse_quote(data[:cut])


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, struct.pack("<H", 3), "version"),
        (0, struct.pack("<H", 6), "version"),
        (2, struct.pack("<H", 3), "attestation key type"),
        (4, struct.pack("<I", 0), "TEE type"),
    ],
)
def test_header_field_rejections(offset: int, value: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        tdx.parse_quote(_patched(quote_bytes(PHALA), offset, value))


def test_v5_body_descriptor_rejections() -> None:
    data = quote_bytes(V5)
    with pytest.raises(MalformedError, match="body type 1"):
        tdx.parse_quote(_patched(data, 48, struct.pack("<H", 1)))
    with pytest.raises(MalformedError, match="must be 648"):
        tdx.parse_quote(_patched(data, 50, struct.pack("<I", 584)))
    with pytest.raises(MalformedError, match="must be 584"):
        tdx.parse_quote(_patched(data, 48, struct.pack("<H", 2)))


def test_signature_data_length_must_match_structure() -> None:
    data = quote_bytes(PHALA)
    length_at = _sig_offset(data) - 4
    sig_len = struct.unpack_from("<I", data, length_at)[0]
    with pytest.raises(MalformedError):
        tdx.parse_quote(_patched(data, length_at, struct.pack("<I", sig_len - 1)))
    # Longer than the data that is there (into the trailing zero bytes): sizes disagree.
    with pytest.raises(MalformedError):
        tdx.parse_quote(_patched(data, length_at, struct.pack("<I", sig_len + 1)))
    with pytest.raises(MalformedError, match="implausible"):
        tdx.parse_quote(_patched(data, length_at, struct.pack("<I", 0xFFFFFFFF)))


def test_certification_types_and_sizes() -> None:
    data = quote_bytes(PHALA)
    cert = _sig_offset(data) + 128
    with pytest.raises(MalformedError, match="certification data type 5"):
        tdx.parse_quote(_patched(data, cert, struct.pack("<H", 5)))
    size = struct.unpack_from("<I", data, cert + 2)[0]
    with pytest.raises(MalformedError, match="certification data size"):
        tdx.parse_quote(_patched(data, cert + 2, struct.pack("<I", size - 1)))
    inner = cert + 6 + 384 + 64
    auth_size = struct.unpack_from("<H", data, inner)[0]
    assert auth_size == 32
    nested = inner + 2 + auth_size
    with pytest.raises(MalformedError, match="nested certification data type"):
        tdx.parse_quote(_patched(data, nested, struct.pack("<H", 6)))
    nested_size = struct.unpack_from("<I", data, nested + 2)[0]
    with pytest.raises(MalformedError, match="PCK chain size"):
        tdx.parse_quote(_patched(data, nested + 2, struct.pack("<I", nested_size + 1)))
    with pytest.raises(MalformedError):
        tdx.parse_quote(_patched(data, inner, struct.pack("<H", auth_size + 1)))


def test_qe_report_reserved_bytes_must_be_zero() -> None:
    data = quote_bytes(PHALA)
    qe = _sig_offset(data) + 128 + 6
    for reserved in (20, 96 + 5, 160 + 31, 262 + 10):
        with pytest.raises(MalformedError, match="reserved"):
            tdx.parse_quote(_patched(data, qe + reserved, b"\x01"))


def test_pck_chain_with_garbage_between_certificates() -> None:
    data = quote_bytes(PHALA)
    marker = b"-----END CERTIFICATE-----\n"
    at = data.index(marker) + len(marker)
    # Same length so every size stays consistent: overwrite padding-free bytes with text.
    garbage = _patched(data, at, b"X")
    with pytest.raises(MalformedError):
        tdx.parse_quote(garbage)


def test_pck_chain_bad_base64() -> None:
    data = quote_bytes(PHALA)
    at = data.index(b"-----BEGIN CERTIFICATE-----") + 40
    with pytest.raises(MalformedError):
        tdx.parse_quote(_patched(data, at, b"*"))


def test_pck_leaf_without_sgx_extension_is_malformed() -> None:
    from attestation.tdx._pck import parse_pck_extensions

    root = tdx.embedded_root()
    with pytest.raises(MalformedError, match="SGX extension"):
        parse_pck_extensions(root)


def test_quote_is_immutable() -> None:
    quote = tdx.parse_quote(quote_bytes(PHALA))
    with pytest.raises(AttributeError):
        quote.trailing = b""  # type: ignore[misc]
