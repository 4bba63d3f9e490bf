"""Azure HCL reports: parsing, strictness and the runtime-data binding."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from attestation._checks import Checks
from attestation.azure import HclReport, parse_hcl_report, verify_hcl_binding
from attestation.errors import BindingError, MalformedError
from attestation.snp import parse_report, verify_report
from tests import vectors

HCL_VECTORS = [
    v
    for v in vectors.manifest()["vectors"]
    if "hcl" in v.get("files", {}) and v["kind"] in ("sev-snp", "tdx")
]
HCL_IDS = [v["id"] for v in HCL_VECTORS]
SNP_HCL = vectors.read("sev-snp/genoa-v3-azure-trustee/hcl-report.bin")
TDX_HCL = vectors.read("tdx/azure-trustee/hcl-report.bin")
VAR_OFFSET = 0x4D4
_N = base64.urlsafe_b64encode(
    rsa.generate_private_key(public_exponent=65537, key_size=1024)
    .public_key()
    .public_numbers()
    .n.to_bytes(128, "big")
).rstrip(b"=")
AK = b'{"kid": "HCLAkPub", "kty": "RSA", "n": "' + _N + b'", "e": "AQAB"}'


def _report_data(hcl: HclReport) -> bytes:
    if hcl.report_type == "snp":
        return parse_report(hcl.tee_report).report_data
    return hcl.tee_report[128:192]  # TDREPORT: REPORTMACSTRUCT.reportdata


def _with_runtime(data: bytes, runtime: bytes) -> bytes:
    """Rebuild an HCL report around new runtime data, keeping every size field consistent."""
    head = bytearray(data[:VAR_OFFSET])
    struct.pack_into("<I", head, 8, VAR_OFFSET + len(runtime))
    struct.pack_into("<I", head, 0x4C0, 20 + len(runtime))
    struct.pack_into("<I", head, 0x4D0, len(runtime))
    out = bytes(head) + runtime
    return out + bytes(max(0, len(data) - len(out)))


def test_all_hcl_vectors_found() -> None:
    assert {v["id"] for v in HCL_VECTORS} >= {
        "snp-genoa-v3-azure-trustee",
        "snp-milan-v2-azure-trustee",
        "tdx-v4-azure-trustee",
    }


@pytest.mark.parametrize("v", HCL_VECTORS, ids=HCL_IDS)
def test_parse_matches_manifest(v: dict[str, Any]) -> None:
    hcl = parse_hcl_report(vectors.file_of(v, "hcl"))
    fields = hcl.fields()
    for key, value in v.get("hcl", {}).items():
        assert fields[key] == value, key
    assert hcl.report_type_id == v.get("hcl", {}).get("report_type", hcl.report_type_id)
    assert hcl.report_type == ("snp" if v["kind"] == "sev-snp" else "tdx")
    assert len(hcl.tee_report) == (1184 if hcl.report_type == "snp" else 1024)
    assert isinstance(hcl.ak_public, rsa.RSAPublicKey)
    assert hcl.ak_public.key_size == 2048
    assert hcl.ek_public is not None
    assert json.loads(hcl.runtime_data)["vm-configuration"] == fields["vm_configuration"]
    assert hcl.runtime_claims["keys"][0]["kid"] == "HCLAkPub"  # type: ignore[index]


@pytest.mark.parametrize("v", HCL_VECTORS, ids=HCL_IDS)
def test_binding_holds_for_every_vector(v: dict[str, Any]) -> None:
    assert v["hcl_runtime_data_bound"] is True
    hcl = parse_hcl_report(vectors.file_of(v, "hcl"))
    checks = Checks()
    verify_hcl_binding(hcl, _report_data(hcl), checks=checks)
    assert [c.name for c in checks if c.passed][-2:] == [
        "hcl.runtime_data_binding",
        "hcl.report_data_padding",
    ]
    assert hashlib.sha256(hcl.runtime_data).digest() == _report_data(hcl)[:32]


def test_snp_report_inside_hcl_is_the_extracted_one() -> None:
    v = vectors.vector("snp-genoa-v3-azure-trustee")
    hcl = parse_hcl_report(vectors.file_of(v, "hcl"))
    assert hcl.tee_report == vectors.file_of(v, "report")


def test_binding_refuses_other_report_data() -> None:
    hcl = parse_hcl_report(SNP_HCL)
    good = _report_data(hcl)
    for bad in (bytes(64), good[:31] + bytes([good[31] ^ 1]) + good[32:]):
        with pytest.raises(BindingError):
            verify_hcl_binding(hcl, bad)
    # The rest is zero on every real report; anything else there is refused, not ignored.
    with pytest.raises(BindingError, match=r"report_data\[32:64\] is not zero"):
        verify_hcl_binding(hcl, good[:32] + b"\xff" * 32)
    with pytest.raises(BindingError):
        verify_hcl_binding(hcl, good[:63] + b"\x01")
    with pytest.raises(MalformedError):
        verify_hcl_binding(hcl, good[:32])


def test_changed_runtime_json_breaks_the_binding() -> None:
    hcl = parse_hcl_report(SNP_HCL)
    changed = hcl.runtime_data.replace(b'"secure-boot":true', b'"secure-boot":false')
    assert changed != hcl.runtime_data
    tampered = parse_hcl_report(_with_runtime(SNP_HCL, changed))
    assert tampered.runtime_claims["vm-configuration"]["secure-boot"] is False  # type: ignore[index]
    with pytest.raises(BindingError):
        verify_hcl_binding(tampered, _report_data(hcl))


def test_runtime_data_round_trip_helper_is_faithful() -> None:
    hcl = parse_hcl_report(SNP_HCL)
    assert _with_runtime(SNP_HCL, hcl.runtime_data) == SNP_HCL


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, b"HCLB", "signature"),
        (4, struct.pack("<I", 3), "header version"),
        (8, struct.pack("<I", 2435), "report_size"),
        (0x14, struct.pack("<I", 1), "reserved"),
        (0x4C0, struct.pack("<I", 1221), "request data size"),
        (0x4C4, struct.pack("<I", 2), "request data version"),
        (0x4C8, struct.pack("<I", 3), "report type"),
        (0x4CC, struct.pack("<I", 9), "hash type"),
        (0x4D0, struct.pack("<I", 1199), "request data size"),
    ],
)
def test_header_fields_are_checked(offset: int, value: bytes, match: str) -> None:
    data = SNP_HCL[:offset] + value + SNP_HCL[offset + len(value) :]
    with pytest.raises(MalformedError, match=match):
        parse_hcl_report(data)


def test_padding_must_be_zero() -> None:
    with pytest.raises(MalformedError, match="padding"):
        parse_hcl_report(SNP_HCL[:-1] + b"\x01")
    # A TDX HCL report's TDREPORT (1024 bytes) is padded with zeros to 1184.
    with pytest.raises(MalformedError, match="padding"):
        parse_hcl_report(TDX_HCL[: 0x20 + 1024] + b"\x01" + TDX_HCL[0x20 + 1025 :])


def test_trailing_padding_may_be_absent() -> None:
    size = struct.unpack_from("<I", SNP_HCL, 8)[0]
    assert parse_hcl_report(SNP_HCL[:size]).runtime_data == parse_hcl_report(SNP_HCL).runtime_data


@pytest.mark.parametrize("size", [0, 4, 0x20, 0x4C0, 0x4D4, 0x4D5, 2000])
def test_truncated_is_malformed(size: int) -> None:
    with pytest.raises(MalformedError):
        parse_hcl_report(SNP_HCL[:size])


@pytest.mark.parametrize(
    ("runtime", "match"),
    [
        (b"not json", "JSON"),
        (b"[1, 2]", "object"),
        (b'{"keys": []}', "keys"),
        (b'{"keys": [{"kid": "HCLEkPub", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "HCLAkPub"),
        (b'{"keys": [{"kid": "HCLAkPub", "kty": "EC", "n": "AQAB", "e": "AQAB"}]}', "RSA"),
        (b'{"keys": [{"kid": "HCLAkPub", "kty": "RSA", "n": "!!", "e": "AQAB"}]}', "base64url"),
        (b'{"keys": [{"kid": "HCLAkPub", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "usable"),
        (b'{"keys": [' + AK + b'], "keys": 1}', "duplicate"),
        (b'{"keys": [' + AK + b", " + AK + b"]}", "twice"),
        (b'{"keys": [' + AK + b'], "user-data": "xyz"}', "user-data"),
        (b'{"keys": [' + AK + b'], "vm-configuration": 1}', "vm-configuration"),
        (b'{"keys": [' + AK + b'], "x": NaN}', "JSON"),
        (b"\xff\xfe", "JSON"),
    ],
)  # fmt: skip
def test_bad_runtime_json_is_malformed(runtime: bytes, match: str) -> None:
    with pytest.raises(MalformedError, match=match):
        parse_hcl_report(_with_runtime(SNP_HCL, runtime))


def test_minimal_runtime_json_parses() -> None:
    hcl = parse_hcl_report(_with_runtime(SNP_HCL, b'{"keys": [' + AK + b"]}"))
    assert hcl.ek_public is None
    assert hcl.user_data is None
    assert hcl.fields()["vm_configuration"] is None


def test_runtime_claims_are_read_only() -> None:
    hcl = parse_hcl_report(SNP_HCL)
    with pytest.raises(TypeError):
        hcl.runtime_claims["keys"] = ()  # type: ignore[index]


def test_platform_names() -> None:
    assert parse_hcl_report(SNP_HCL).platform == "sev-snp"
    assert parse_hcl_report(TDX_HCL).platform == "tdx"


def test_bytearray_chain_and_vcek_inputs() -> None:
    v = vectors.vector("snp-genoa-v3-azure-trustee")
    hcl = parse_hcl_report(bytearray(vectors.file_of(v, "hcl")))  # type: ignore[arg-type]
    verified = verify_report(
        hcl.tee_report,
        vcek=bytearray(vectors.file_of(v, "vcek")),  # type: ignore[arg-type]
        cert_chain=bytearray(vectors.file_of(v, "chain")),  # type: ignore[arg-type]
        now=vectors.time_inside(v),
    )
    verify_hcl_binding(hcl, verified.report.report_data)
