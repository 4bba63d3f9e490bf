"""Parsers: exact layouts, strict sizes and reserved fields, only AttestationErrors escape."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, MalformedError
from attestation.tpm import (
    parse_attest,
    parse_event_log,
    parse_public,
    parse_signature,
    signature_from_raw,
)
from attestation.tpm.parse import EccPoint, EccSignature, RsaSignature, parse_pcr_selection
from tests.tpm import _build
from tests.tpm._cases import case

GCE = case("tpm-gce-cos85-nonce#1")
SWTPM = case("tpm-swtpm-trustee")
assert isinstance(GCE.signature, bytes) and isinstance(SWTPM.signature, bytes)
assert GCE.event_log is not None
assert not isinstance(GCE.ak, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
GCE_AK_RAW: bytes = GCE.ak.raw
GCE_SIG: bytes = GCE.signature
PARSERS: list[Callable[[bytes], object]] = [
    parse_attest,
    parse_public,
    parse_signature,
    parse_event_log,
    parse_pcr_selection,
]
SAMPLES: list[bytes] = [GCE.attest, GCE_AK_RAW, GCE_SIG, GCE.event_log[:4000]]
SAMPLE_IDS = ["attest", "public", "signature", "event_log"]

P256 = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- TPMS_ATTEST -----------------------------------------------------------------------------


def test_attest_layout() -> None:
    a = parse_attest(GCE.attest)
    assert a.magic == 0xFF544347 and a.type == 0x8018
    assert a.extra_data == b"\x90\x09"
    assert a.safe is True and a.reset_count == 10
    assert a.selection() == {"sha256": tuple(range(24))}
    assert a.raw == GCE.attest


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"\xff\x54\x43\x48", "magic"),
        (4, b"\x80\x17", "type"),  # TPM_ST_ATTEST_CERTIFY etc. are not quotes
        (4, b"\x80\x14", "type"),
    ],
)
def test_attest_magic_and_type(offset: int, value: bytes, message: str) -> None:
    bad = GCE.attest[:offset] + value + GCE.attest[offset + len(value) :]
    with pytest.raises(MalformedError, match=message):
        parse_attest(bad)


def _synthetic_attest(**kw: object) -> bytes:
    banks = {"sha256": [0, 1]}
    return _build.attest(
        extra_data=kw.pop("extra_data", b"n"),  # type: ignore[arg-type]
        banks=banks,
        values=_build.pcr_values(banks),
        **kw,  # type: ignore[arg-type]
    )


def test_attest_names_and_sizes() -> None:
    assert parse_attest(_synthetic_attest(signer=b"")).qualified_signer == b""
    assert parse_attest(_synthetic_attest(signer=b"\x40\x00\x00\x01")).qualified_signer
    for bad_signer in (b"\x00", b"\x00\x0b" + bytes(31), b"\x00\x99" + bytes(32)):
        with pytest.raises(MalformedError, match="qualifiedSigner"):
            parse_attest(_synthetic_attest(signer=bad_signer))
    assert len(parse_attest(_synthetic_attest(extra_data=bytes(66))).extra_data) == 66
    with pytest.raises(MalformedError, match="extraData"):
        parse_attest(_synthetic_attest(extra_data=bytes(67)))


def test_attest_safe_flag_and_selection_checks() -> None:
    raw = _synthetic_attest()
    safe_at = 4 + 2 + 2 + 34 + 2 + 1 + 16
    assert raw[safe_at] == 1
    with pytest.raises(MalformedError, match="safe"):
        parse_attest(raw[:safe_at] + b"\x02" + raw[safe_at + 1 :])
    sel_at = safe_at + 1 + 8
    selection = raw[sel_at : sel_at + 10]
    assert parse_pcr_selection(selection)[0].pcrs == (0, 1)
    for bad, match in (
        (struct.pack(">I", 17), "PCR selections"),
        (struct.pack(">IHB", 1, 0x0099, 3) + bytes(3), "hash"),
        (struct.pack(">IHB", 1, 0x000B, 5) + bytes(5), "sizeofSelect"),
        (struct.pack(">IHBxxxHBxxx", 2, 0x000B, 3, 0x000B, 3), "twice"),
    ):
        with pytest.raises(MalformedError, match=match):
            parse_pcr_selection(bad)


# -- TPMT_PUBLIC -----------------------------------------------------------------------------


def test_public_rsa_fields() -> None:
    ak = parse_public(GCE_AK_RAW)
    f = ak.fields()
    assert f["type"] == "rsa" and f["key_bits"] == 2048 and f["exponent"] == 65537
    assert f["object_attributes"] == "0x00050072"
    assert ak.name()[:2] == b"\x00\x0b" and len(ak.name()) == 34
    assert ak.unique == ak.public_key().public_numbers().n.to_bytes(256, "big")  # type: ignore[union-attr]


@pytest.mark.parametrize("key", [P256, P384], ids=["p256", "p384"])
def test_public_ecc_roundtrip(key: ec.EllipticCurvePrivateKey) -> None:
    raw = _build.public_ecc(key.public_key(), hash_alg="sha384")
    ak = parse_public(raw)
    assert (
        ak.fields()["curve"] == {"secp256r1": "nist_p256", "secp384r1": "nist_p384"}[key.curve.name]
    )
    assert isinstance(ak.unique, EccPoint)
    assert ak.public_key().public_numbers() == key.public_key().public_numbers()
    assert ak.fields()["scheme"] == "ecdsa" and ak.fields()["scheme_hash"] == "sha384"


def test_public_name_is_namealg_and_hash_of_the_exact_bytes() -> None:
    raw = _build.public_ecc(P256.public_key())
    assert parse_public(raw).name() == b"\x00\x0b" + hashlib.sha256(raw).digest()


def test_public_rejects_bad_structures() -> None:
    raw = _build.public_rsa(RSA2048.public_key())
    cases: list[tuple[bytes, str]] = [
        (b"\x00\x08" + raw[2:], "not an RSA or ECC"),  # KEYEDHASH
        (raw[:2] + b"\x00\x10" + raw[4:], "nameAlg"),  # NULL nameAlg
        (raw[:4] + b"\x80\x05\x00\x72" + raw[8:], "reserved"),
        (raw[:4] + b"\x00\x05\x00\x73" + raw[8:], "reserved"),  # bit 0
        (raw[:8] + b"\x00\x05abcde" + raw[10:], "authPolicy"),
        (raw + b"\x00", "trailing"),
        (raw[:-1], "truncated"),
    ]
    for bad, match in cases:
        with pytest.raises(MalformedError, match=match):
            parse_public(bad)
    # keyBits disagreeing with the modulus size
    key_bits_at = 10 + 2 + 4
    bad = raw[:key_bits_at] + struct.pack(">H", 3072) + raw[key_bits_at + 2 :]
    with pytest.raises(MalformedError, match="modulus"):
        parse_public(bad)


@pytest.mark.parametrize("name_alg", [0x0012])  # SM3_256: a TPM hash hashlib cannot compute
def test_public_refuses_a_name_alg_that_cannot_be_computed(name_alg: int) -> None:
    """Refused at parse: otherwise the evidence verifies and printing the AK's Name raises."""
    raw = _build.public_ecc(P256.public_key())
    bad = raw[:2] + struct.pack(">H", name_alg) + raw[4:]
    with pytest.raises(MalformedError, match="nameAlg sm3_256 is not supported"):
        parse_public(bad)


def test_public_ecc_rejects_bad_points_and_curves() -> None:
    raw = _build.public_ecc(P256.public_key())
    curve_at = 10 + 2 + 4
    assert raw[curve_at : curve_at + 2] == b"\x00\x03"
    with pytest.raises(MalformedError, match="curve"):
        parse_public(raw[:curve_at] + b"\x00\x77" + raw[curve_at + 2 :])
    # P-384 curve id with P-256 sized coordinates
    with pytest.raises(MalformedError, match="needs 48"):
        parse_public(raw[:curve_at] + b"\x00\x04" + raw[curve_at + 2 :])
    off_curve = raw[:-1] + bytes([raw[-1] ^ 1])
    ak = parse_public(off_curve)  # parse has no crypto ...
    with pytest.raises(MalformedError, match="not a point"):
        ak.public_key()  # ... the key is checked when it is made


def test_public_with_storage_parameters() -> None:
    # A storage-style RSA key: AES-128-CFB symmetric, NULL scheme, explicit exponent.
    key = RSA2048.public_key()
    n = key.public_numbers().n.to_bytes(256, "big")
    raw = (
        struct.pack(">HHI", 0x0001, 0x000B, 0x00030072)
        + _build.tpm2b(bytes(32))
        + struct.pack(">HHH", 0x0006, 128, 0x0043)
        + struct.pack(">H", 0x0010)
        + struct.pack(">HI", 2048, 65537)
        + _build.tpm2b(n)
    )
    ak = parse_public(raw)
    assert not ak.is_signing and ak.fields()["scheme"] == "null"
    assert ak.parameters.symmetric is not None and ak.parameters.symmetric.key_bits == 128


# -- TPMT_SIGNATURE --------------------------------------------------------------------------


def test_signature_forms() -> None:
    sig = parse_signature(GCE_SIG)
    assert (sig.scheme, sig.hash) == ("rsassa", "sha256")
    assert isinstance(sig.value, RsaSignature) and len(sig.value.signature) == 256
    ecc = parse_signature(_build.sign(P256, b"x", scheme="ecdsa"))
    assert isinstance(ecc.value, EccSignature) and ecc.fields()["sig_alg"] == "ecdsa"
    raw = signature_from_raw(bytes(64), sig_alg="ecdsa", hash_alg="sha256")
    assert isinstance(raw.value, EccSignature) and raw.value.r == bytes(32)
    assert raw.raw is None


def test_signature_rejects_bad_structures() -> None:
    for bad, match in (
        (b"\x00\x05" + GCE_SIG[2:], "not supported"),  # HMAC
        (b"\x00\x10", "not supported"),  # NULL
        (GCE_SIG[:2] + b"\x00\x10" + GCE_SIG[4:], "hash"),
        (GCE_SIG[:4] + b"\x00\x00", "empty"),
        (GCE_SIG[:4] + b"\x02\x01" + bytes(513), "more than"),
        (GCE_SIG + b"\x00", "trailing"),
    ):
        with pytest.raises(MalformedError, match=match):
            parse_signature(bad)
    bad_raw: tuple[tuple[bytes, dict[str, str]], ...] = (
        (b"", {}),
        (bytes(10), {"sig_alg": "hmac"}),
        (bytes(10), {"hash_alg": "md5"}),
        (bytes(63), {"sig_alg": "ecdsa"}),
        (bytes(600), {}),
    )
    for args in bad_raw:
        with pytest.raises(MalformedError):
            signature_from_raw(args[0], **args[1])


# -- all parsers -----------------------------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_empty_and_random_inputs_are_malformed(parser: Callable[[bytes], object]) -> None:
    rng = random.Random(1234)
    inputs = [b"", b"\x00", bytes(3), os.urandom(16)]
    inputs += [rng.randbytes(rng.randrange(1, 400)) for _ in range(200)]
    for data in inputs:
        with pytest.raises(MalformedError):
            parser(data)


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
def test_non_bytes_input_is_malformed(parser: Callable[[bytes], object]) -> None:
    for value in (None, "ff54", 42):
        with pytest.raises(MalformedError):
            parser(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parser", "sample"), list(zip(PARSERS[:4], SAMPLES, strict=True)), ids=SAMPLE_IDS
)
def test_every_truncation_is_malformed(parser: Callable[[bytes], object], sample: bytes) -> None:
    step = max(1, len(sample) // 300)
    for cut in range(0, len(sample), step):
        if parser is parse_event_log and cut > 0:
            # A log truncated exactly at an event boundary is still a valid (shorter) log.
            with contextlib.suppress(MalformedError):
                parser(sample[:cut])
            continue
        with pytest.raises(MalformedError):
            parser(sample[:cut])


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@_FUZZ
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_attestation_errors(
    parser: Callable[[bytes], object], data: bytes
) -> None:
    with contextlib.suppress(AttestationError):
        parser(data)


@pytest.mark.parametrize(
    ("parser", "sample"), list(zip(PARSERS[:4], SAMPLES, strict=True)), ids=SAMPLE_IDS
)
@_FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_mutated_samples_raise_only_attestation_errors(
    parser: Callable[[bytes], object], sample: bytes, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        result = parser(bytes(data))
    except AttestationError:
        return
    # Whatever parses must also describe itself and (for keys) build or refuse a key cleanly.
    if hasattr(result, "fields"):
        with contextlib.suppress(AttestationError):
            result.fields()
    if hasattr(result, "public_key"):
        with contextlib.suppress(AttestationError):
            result.public_key()
