"""Tampering with a genuine quote is rejected with the right error."""

from __future__ import annotations

import struct

import pytest

from attestation import Checks
from attestation.errors import (
    AttestationError,
    BindingError,
    MalformedError,
    SignatureError,
    VerificationError,
)
from attestation.tpm import (
    TpmtSignature,
    parse_event_log,
    signature_from_raw,
    verify_event_log,
    verify_quote,
)
from attestation.tpm.parse import RsaSignature
from tests.tpm._cases import QuoteCase, case, cases

CASES = cases()
IDS = [c.id for c in CASES]


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _verify(c: QuoteCase, **overrides: object) -> object:
    args: dict[str, object] = {
        "attest": c.attest,
        "signature": c.signature,
        "ak": c.ak,
        "pcrs": c.pcrs,
        "qualifying_data": c.qualifying_data,
    }
    args.update(overrides)
    return verify_quote(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_flipping_attest_bytes_is_rejected(c: QuoteCase) -> None:
    positions = sorted({*range(0, len(c.attest), 7), len(c.attest) - 1})
    for index in positions:
        for mask in (0x01, 0x80):
            with pytest.raises((MalformedError, SignatureError)) as info:
                _verify(c, attest=_flip(c.attest, index, mask))
            assert info.type in (MalformedError, SignatureError), index


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_flipping_signature_bytes_is_rejected(c: QuoteCase) -> None:
    if isinstance(c.signature, TpmtSignature):
        assert isinstance(c.signature.value, RsaSignature)
        raw = c.signature.value.signature
        for index in range(0, len(raw), 5):
            bad = signature_from_raw(_flip(raw, index), sig_alg="rsassa", hash_alg="sha256")
            with pytest.raises(SignatureError):
                _verify(c, signature=bad)
        return
    for index in range(0, len(c.signature), 5):
        # Header bytes (sigAlg, hash, size) give MalformedError or a wrong scheme/hash;
        # signature bytes give SignatureError.
        with pytest.raises((MalformedError, SignatureError)):
            _verify(c, signature=_flip(c.signature, index))
    for index in range(6, len(c.signature)):
        with pytest.raises(SignatureError):
            _verify(c, signature=_flip(c.signature, index, 0x40))


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_changed_pcr_value_breaks_the_digest(c: QuoteCase) -> None:
    (bank,) = c.pcrs
    for index in (0, 7, 16, 23):
        pcrs = {bank: dict(c.pcrs[bank])}
        pcrs[bank][index] = _flip(pcrs[bank][index], 3)
        checks = Checks()
        with pytest.raises(VerificationError) as info:
            _verify(c, pcrs=pcrs, checks=checks)
        assert info.value.check == "tpm.pcr_digest"
        assert type(info.value) is VerificationError
        assert checks.items[-1].name == "tpm.pcr_digest" and not checks.items[-1].passed


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_pcr_values_must_cover_exactly_the_selection(c: QuoteCase) -> None:
    (bank,) = c.pcrs
    missing = {bank: {i: v for i, v in c.pcrs[bank].items() if i != 5}}
    with pytest.raises(VerificationError) as info:
        _verify(c, pcrs=missing)
    assert info.value.check == f"tpm.pcr_selection.{bank}"
    other = "sha512" if bank != "sha512" else "sha1"
    extra_bank = {**c.pcrs, other: {0: bytes(64 if other == "sha512" else 20)}}
    with pytest.raises(VerificationError) as info:
        _verify(c, pcrs=extra_bank)
    assert info.value.check == "tpm.pcr_selection.banks"
    wrong_size = {bank: {**c.pcrs[bank], 0: b"\x00" * 5}}
    with pytest.raises(MalformedError):
        _verify(c, pcrs=wrong_size)


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_wrong_qualifying_data_is_a_binding_error(c: QuoteCase) -> None:
    for wrong in (c.qualifying_data + b"\x00", b"\x01" * 32, b""):
        if wrong == c.qualifying_data:
            continue
        with pytest.raises(BindingError) as info:
            _verify(c, qualifying_data=wrong)
        assert info.value.check == "tpm.extra_data"
    # None: the caller binds the quote elsewhere; recorded as not checked.
    checks = Checks()
    verified = _verify(c, qualifying_data=None, checks=checks)
    assert not verified.qualifying_data_checked  # type: ignore[attr-defined]
    assert any(ch.name == "tpm.extra_data" and "not checked" in ch.detail for ch in checks)


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_truncated_and_extended_attest_is_malformed(c: QuoteCase) -> None:
    for cut in (0, 1, 4, 6, 10, len(c.attest) // 2, len(c.attest) - 1):
        with pytest.raises(MalformedError):
            _verify(c, attest=c.attest[:cut])
    with pytest.raises(MalformedError, match="trailing"):
        _verify(c, attest=c.attest + b"\x00")


def test_wrong_signature_hash_is_rejected() -> None:
    c = case("tpm-azure-snp-milan-vtpm")
    assert isinstance(c.signature, TpmtSignature)
    assert isinstance(c.signature.value, RsaSignature)
    for scheme, hash_alg in (("rsassa", "sha384"), ("rsassa", "sha1"), ("rsapss", "sha256")):
        bad = signature_from_raw(c.signature.value.signature, sig_alg=scheme, hash_alg=hash_alg)
        with pytest.raises(SignatureError):
            _verify(c, signature=bad)


def test_gce_signature_scheme_must_match_the_ak() -> None:
    c = case("tpm-gce-cos85-nonce#1")
    assert isinstance(c.signature, bytes)
    # Same signature bytes relabelled as RSA-PSS: the AK's scheme is RSASSA-SHA256.
    relabelled = struct.pack(">H", 0x0016) + c.signature[2:]
    with pytest.raises(SignatureError) as info:
        _verify(c, signature=relabelled)
    assert info.value.check == "tpm.ak.scheme"


def _event_digest_ranges(log: bytes) -> list[tuple[int, int, int, int]]:
    """(start, end, pcr, alg) of every event digest, walking the log independently."""
    header_size = struct.unpack_from("<I", log, 28)[0]
    offset = 32 + header_size
    out = []
    while offset < len(log):
        pcr, kind, count = struct.unpack_from("<III", log, offset)
        offset += 12
        for _ in range(count):
            (alg,) = struct.unpack_from("<H", log, offset)
            size = {4: 20, 11: 32, 12: 48}[alg]
            if kind != 3:  # EV_NO_ACTION digests are never extended
                out.append((offset + 2, offset + 2 + size, pcr, alg))
            offset += 2 + size
        (data_size,) = struct.unpack_from("<I", log, offset)
        offset += 4 + data_size
    return out


@pytest.mark.parametrize("quote", [0, 1, 2])
def test_tampered_event_log_digest_names_the_pcr(quote: int) -> None:
    c = case(f"tpm-gce-cos85-nonce#{quote}")
    assert c.event_log is not None
    (bank,) = c.pcrs
    alg = {"sha1": 4, "sha256": 11, "sha384": 12}[bank]
    ranges = [r for r in _event_digest_ranges(c.event_log) if r[3] == alg]
    assert len(ranges) > 20
    for start, end, pcr, _ in ranges[::3]:
        bad = _flip(c.event_log, (start + end) // 2)
        checks = Checks()
        with pytest.raises(VerificationError) as info:
            _verify(c, event_log=bad, checks=checks)
        assert info.value.check == f"tpm.event_log.{bank}.pcr{pcr}"
        assert f"PCR {bank}:{pcr}" in str(info.value)
        assert c.pcrs[bank][pcr].hex() in str(info.value)  # both values are named


def test_tampered_event_log_digest_of_another_bank_is_not_this_quotes_business() -> None:
    """A sha1 digest flip does not change the sha256 replay; the sha1 quote catches it."""
    c256 = case("tpm-gce-cos85-nonce#1")
    c1 = case("tpm-gce-cos85-nonce#0")
    assert c256.event_log is not None
    start, _end, pcr, _ = next(r for r in _event_digest_ranges(c256.event_log) if r[3] == 4)
    bad = _flip(c256.event_log, start)
    _verify(c256, event_log=bad)
    with pytest.raises(VerificationError, match=f"PCR sha1:{pcr}"):
        _verify(c1, event_log=bad)


def test_event_log_byte_flips_never_escape_the_error_hierarchy() -> None:
    c = case("tpm-gce-cos85-nonce#1")
    assert c.event_log is not None
    digest_bytes = {
        i for s, e, _, alg in _event_digest_ranges(c.event_log) if alg == 11 for i in range(s, e)
    }
    for index in range(0, len(c.event_log), 11):
        bad = _flip(c.event_log, index)
        try:
            verify_event_log(bad, c.pcrs)
        except AttestationError as exc:
            if index in digest_bytes:
                assert type(exc) is VerificationError
            continue
        # Accepted: the flip hit something replay does not hash (event data, event type,
        # other banks' digests) -- never a sha256 digest.
        assert index not in digest_bytes


def test_truncated_event_log_is_malformed() -> None:
    c = case("tpm-gce-cos85-nonce#1")
    assert c.event_log is not None
    for cut in (0, 10, 40, 100, len(c.event_log) - 1):
        with pytest.raises(MalformedError):
            verify_event_log(c.event_log[:cut], c.pcrs)
    with pytest.raises(MalformedError):
        parse_event_log(c.event_log + b"\x00")


def test_badly_typed_inputs_are_malformed() -> None:
    c = case("tpm-swtpm-trustee")
    for pcrs in (
        {"sha256": {str(i): v for i, v in c.pcrs["sha256"].items()}},
        {"sha256": {**c.pcrs["sha256"], "1": bytes(32)}},
        {"sha256": {True: bytes(32)}},
        {11: c.pcrs["sha256"]},
        {"sha256": list(c.pcrs["sha256"].values())},
        [],
    ):
        with pytest.raises(MalformedError):
            _verify(c, pcrs=pcrs)
    with pytest.raises(MalformedError):
        _verify(c, qualifying_data=c.qualifying_data.hex())
    with pytest.raises(MalformedError):
        _verify(c, attest=None)
    with pytest.raises(MalformedError):
        _verify(c, signature="")
