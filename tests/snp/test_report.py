"""Parsing SEV-SNP reports: every vector's fields, and strictness on lengths and reserved bytes."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest

from attestation.errors import MalformedError
from attestation.snp import REPORT_SIZE, TcbVersion, parse_report, product_from_cpuid
from tests import vectors
from tests.snp._util import TEMPLATE_ID, ids, report_bytes, snp_vectors
from tests.snp.fakepki import patch

SNP = snp_vectors()
V2 = vectors.file_of(vectors.vector("snp-milan-v2-go-sev-guest"), "report")
V3 = vectors.file_of(vectors.vector(TEMPLATE_ID), "report")
V5 = vectors.file_of(vectors.vector("snp-genoa-v5-oak"), "report")
TURIN = vectors.file_of(vectors.vector("snp-turin-v5-oak"), "report")


def test_every_sev_snp_vector_is_covered() -> None:
    assert len(SNP) == 11
    assert {v["check"] for v in SNP} == {"snp", "snp_azure"}


@pytest.mark.parametrize("v", SNP, ids=ids(SNP))
def test_parsed_fields_match_manifest(v: dict[str, Any]) -> None:
    report = parse_report(report_bytes(v))
    expected = v["parsed"]
    # For v2 the product comes from the VCEK; the parser alone cannot know it.
    product = expected["product"] if report.version == 2 else None
    fields = report.fields(product=product)
    for key, value in expected.items():
        assert fields[key] == value, key
    if report.version >= 3:
        assert report.product == expected["product"]
    else:
        assert report.product is None
        assert report.fields()["product"] is None


def test_field_offsets_of_a_v5_report() -> None:
    report = parse_report(V5)
    assert report.raw == V5
    assert report.signed_bytes == V5[:0x2A0]
    assert report.report_data == V5[0x50:0x90]
    assert report.measurement == V5[0x90:0xC0]
    assert report.host_data == V5[0xC0:0xE0]
    assert report.chip_id == V5[0x1A0:0x1E0]
    assert report.sig_r == int.from_bytes(V5[0x2A0:0x2E8], "little")
    assert report.sig_s == int.from_bytes(V5[0x2E8:0x330], "little")
    assert (report.cpuid_fam_id, report.cpuid_mod_id) == (0x19, 0x11)
    assert report.launch_mit_vector is not None


def test_turin_tcb_layout() -> None:
    report = parse_report(TURIN)
    assert report.tcb_layout == "turin"
    tcb = report.reported_tcb
    assert tcb.components() == {"fmc": 0, "bootloader": 1, "tee": 0, "snp": 2, "microcode": 71}
    # Read with the pre-Turin layout, byte 4 is reserved: the layouts are not interchangeable.
    with pytest.raises(MalformedError):
        TcbVersion.decode(0x4700000002000100, "pre-turin")  # byte 4 is reserved there


def test_tcb_encode_decode_round_trip() -> None:
    tcb = TcbVersion.encode("pre-turin", bootloader=3, tee=0, snp=8, microcode=115)
    assert tcb.raw == 0x7308000000000003
    turin = TcbVersion.encode("turin", fmc=1, bootloader=2, tee=3, snp=4, microcode=5)
    assert turin.raw == 0x0500000004030201
    assert TcbVersion.decode(turin.raw, "turin") == turin
    with pytest.raises(MalformedError):
        TcbVersion.encode("pre-turin", bootloader=1, tee=0, snp=0, microcode=0, fmc=1)
    with pytest.raises(MalformedError):
        TcbVersion.encode("turin", bootloader=256, tee=0, snp=0, microcode=0, fmc=0)


def test_product_from_cpuid() -> None:
    assert product_from_cpuid(0x19, 0x01) == "Milan"
    assert product_from_cpuid(0x19, 0x11) == "Genoa"
    assert product_from_cpuid(0x1A, 0x02) == "Turin"
    assert product_from_cpuid(0x19, 0x21) is None
    assert product_from_cpuid(0x17, 0x31) is None


def test_guest_policy_decoding() -> None:
    debug = parse_report(V2).guest_policy  # 0xb0000
    assert debug.debug and debug.smt and not debug.migrate_ma
    assert parse_report(V3).guest_policy.debug is False


@pytest.mark.parametrize("size", [0, 1, 0x2A0, REPORT_SIZE - 1, REPORT_SIZE + 1, 4096])
def test_wrong_length_is_malformed(size: int) -> None:
    data = (V3 * 4)[:size]
    with pytest.raises(MalformedError):
        parse_report(data)


def test_random_bytes_are_malformed() -> None:
    for _ in range(50):
        with pytest.raises(MalformedError):
            parse_report(os.urandom(REPORT_SIZE))


@pytest.mark.parametrize("version", [0, 1, 4, 6, 0xFFFFFFFF])
def test_unsupported_versions(version: int) -> None:
    with pytest.raises(MalformedError, match="version"):
        parse_report(patch(V3, 0, struct.pack("<I", version)))


def test_signature_algorithm_must_be_ecdsa_p384() -> None:
    with pytest.raises(MalformedError, match="signature algorithm"):
        parse_report(patch(V3, 0x34, struct.pack("<I", 2)))


def test_policy_bit_17_must_be_one() -> None:
    with pytest.raises(MalformedError, match="bit 17"):
        parse_report(patch(V3, 0x08, struct.pack("<Q", 0x10000)))


@pytest.mark.parametrize("bit", [26, 32, 40, 63])
def test_reserved_guest_policy_bits_must_be_zero(bit: int) -> None:
    with pytest.raises(MalformedError, match="reserved guest policy bits 63:26"):
        parse_report(patch(V3, 0x08, struct.pack("<Q", 0x30000 | 1 << bit)))


@pytest.mark.parametrize("bit", [16, 18, 19, 20, 21, 22, 23, 24, 25])
def test_defined_guest_policy_bits_parse(bit: int) -> None:
    # 21..25: CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS, CIPHERTEXT_HIDING, PAGE_SWAP_DISABLE.
    policy = 0x20000 | 1 << bit
    assert parse_report(patch(V3, 0x08, struct.pack("<Q", policy))).policy == policy


@pytest.mark.parametrize(
    ("data", "offset", "what"),
    [
        (V3, 0x4C, "reserved word after the flags"),
        (V3, 0x18B, "reserved after CPUID"),
        (V3, 0x19F, "reserved before CHIP_ID"),
        (V2, 0x188, "CPUID bytes are reserved in v2"),
        (V3, 0x1EB, "reserved after current version"),
        (V3, 0x1EF, "reserved after committed version"),
        (V3, 0x1F8, "v3 has no mitigation vectors"),
        (V5, 0x208, "reserved after mitigation vectors"),
        (V5, 0x29F, "last byte before the signature"),
        (V5, 0x330, "signature reserved area"),
        (V5, 0x49F, "last byte of the report"),
        (V3, 0x183, "reserved TCB byte of REPORTED_TCB"),
        (TURIN, 0x184, "reserved TCB byte in the Turin layout"),
    ],
)
def test_reserved_bytes_must_be_zero(data: bytes, offset: int, what: str) -> None:
    assert data[offset] == 0, what
    with pytest.raises(MalformedError):
        parse_report(patch(data, offset, b"\x01"))


def test_reserved_flag_bits_and_signing_key() -> None:
    with pytest.raises(MalformedError, match="flag"):
        parse_report(patch(V3, 0x48, struct.pack("<I", 1 << 5)))
    with pytest.raises(MalformedError, match="SIGNING_KEY"):
        parse_report(patch(V3, 0x48, struct.pack("<I", 2 << 2)))
    unsigned = parse_report(patch(V3, 0x48, struct.pack("<I", 7 << 2)))
    assert unsigned.signing_key_name == "none"


def test_vmpl_out_of_range() -> None:
    with pytest.raises(MalformedError, match="VMPL"):
        parse_report(patch(V3, 0x30, struct.pack("<I", 4)))


def test_unknown_cpu_family_is_malformed() -> None:
    with pytest.raises(MalformedError, match="CPUID family"):
        parse_report(patch(V3, 0x188, b"\x17"))


def test_bytearray_and_memoryview_input() -> None:
    assert parse_report(bytearray(V3)) == parse_report(V3)  # type: ignore[arg-type]
    assert parse_report(memoryview(V3)).raw == V3  # type: ignore[arg-type]
