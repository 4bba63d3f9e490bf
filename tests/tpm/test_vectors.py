"""Every vTPM vector of MANIFEST.json: parsed fields, signature and PCR digest verdicts."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from attestation import Checks
from attestation.errors import AttestationError
from attestation.tpm import (
    TpmtPublic,
    VerifiedTpmQuote,
    parse_attest,
    parse_event_log,
    parse_public,
    verify_quote,
)
from tests import vectors
from tests.tpm._cases import QuoteCase, cases, tpm_vector_ids
from tests.tpm._protobuf import parse_gotpm_attestation

CASES = cases()
IDS = [c.id for c in CASES]


def _verify(c: QuoteCase, **overrides: object) -> VerifiedTpmQuote:
    args: dict[str, object] = {
        "attest": c.attest,
        "signature": c.signature,
        "ak": c.ak,
        "pcrs": c.pcrs,
        "qualifying_data": c.qualifying_data,
    }
    args.update(overrides)
    return verify_quote(**args)  # type: ignore[arg-type]


def test_every_tpm_vector_has_cases() -> None:
    covered = {c.vector["id"] for c in CASES}
    assert set(tpm_vector_ids()) <= covered
    assert "tdx-v4-azure-trustee" in covered  # the vTPM quote riding with the TDX vector
    assert len(CASES) == 10


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_attest_fields_match_manifest(c: QuoteCase) -> None:
    assert parse_attest(c.attest).fields() == c.expected["attest"]


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_verdict_matches_manifest(c: QuoteCase) -> None:
    expected = c.expected
    sig_ok = expected.get("signature_verified", c.vector.get("signature_verified"))
    assert sig_ok is True
    assert expected.get("pcr_digest_matches", True) is True
    checks = Checks()
    verified = _verify(c, checks=checks)
    assert verified.fields()["signature_verified"] is True
    assert verified.fields()["pcr_digest_matches"] is True
    assert verified.qualifying_data_checked
    assert verified.attest.fields() == expected["attest"]
    names = [ch.name for ch in checks]
    for required in ("tpm.signature", "tpm.extra_data", "tpm.pcr_digest"):
        assert required in names
    assert all(ch.passed for ch in checks)


_MANIFEST_SCHEME = {"rsassa": "rsassa-pkcs1v15", "rsapss": "rsa-pss", "ecdsa": "ecdsa"}


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_signature_scheme_matches_manifest(c: QuoteCase) -> None:
    sig = _verify(c).signature
    sig_alg = c.expected.get("sig_alg")
    if sig_alg is None:
        assert c.vector["id"] == "tpm-swtpm-trustee"  # the manifest does not name it
        assert (sig.scheme, sig.hash) == ("rsassa", "sha256")
    elif "sig_hash" in c.expected:  # go-tpm-tools style: scheme and hash apart
        assert (sig.scheme, sig.hash) == (sig_alg, c.expected["sig_hash"])
    else:  # "rsassa-pkcs1v15-sha256"
        assert f"{_MANIFEST_SCHEME[sig.scheme]}-{sig.hash}" == sig_alg


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_pcr_values_match_manifest(c: QuoteCase) -> None:
    expected = c.expected.get("pcrs")
    (bank,) = c.pcrs
    if expected is None:
        # swtpm-trustee: the manifest describes the values instead (PCR17-22 all ff).
        assert c.vector["id"] == "tpm-swtpm-trustee"
        assert all(c.pcrs[bank][i] == b"\xff" * 32 for i in range(17, 23))
        assert all(c.pcrs[bank][i] == bytes(32) for i in (*range(17), 23))
        return
    assert {str(i): v.hex() for i, v in c.pcrs[bank].items()} == expected
    verified = _verify(c)
    assert {str(i): v.hex() for i, v in verified.pcrs[bank].items()} == expected


def test_azure_extra_data_ascii() -> None:
    for vid in ("tpm-azure-snp-milan-vtpm", "tdx-v4-azure-trustee/tpm"):
        c = next(x for x in CASES if x.id == vid)
        assert parse_attest(c.attest).extra_data.decode("latin-1") == c.expected["extra_data_ascii"]
    genoa = next(x for x in CASES if x.id == "tpm-azure-snp-genoa-vtpm")
    assert (
        parse_attest(genoa.attest).extra_data.decode("latin-1")
        == genoa.expected["extra_data_ascii"]
    )


@pytest.mark.parametrize("vid", ["tpm-gce-cos85-nonce", "tpm-gce-cos85-no-nonce"])
def test_gce_ak_and_event_log_fields(vid: str) -> None:
    v = vectors.vector(vid)
    att = parse_gotpm_attestation(vectors.file_of(v, "pb"))
    ak = parse_public(att.ak_pub)
    assert ak.name().hex() == v["ak_name"]
    assert v["ak_type"] == "RSAPublicKey"
    assert isinstance(ak.public_key(), rsa.RSAPublicKey)
    assert ak.is_restricted and ak.is_signing and ak.is_fixed_tpm
    assert ak.fields()["scheme"] == "rsassa"
    assert len(att.event_log) == v["event_log_len"]
    assert hashlib.sha256(att.event_log).hexdigest() == v["event_log_sha256"]
    assert hashlib.sha256(att.ak_cert).hexdigest() == v["ak_cert"]["sha256_der"]
    log = parse_event_log(att.event_log)
    assert log.spec_id.banks == ("sha1", "sha256", "sha384")


@pytest.mark.parametrize("c", [c for c in CASES if c.event_log is not None], ids=lambda c: c.id)
def test_gce_event_log_replays_to_quoted_pcrs(c: QuoteCase) -> None:
    checks = Checks()
    verified = _verify(c, event_log=c.event_log, checks=checks)
    assert verified.event_log is not None
    (bank,) = c.pcrs
    # The COS-85 firmware log extends PCRs 0-9; each replays to the quoted value.
    assert verified.event_log.verified == {bank: frozenset(range(10))}
    for index in range(10):
        assert verified.event_log.replayed[bank][index] == c.pcrs[bank][index]
        assert f"tpm.event_log.{bank}.pcr{index}" in [ch.name for ch in checks]
    assert verified.event_log.fields()["verified_pcrs"] == {bank: list(range(10))}
    assert "event_log" in verified.fields()


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_ak_forms(c: QuoteCase) -> None:
    if isinstance(c.ak, TpmtPublic):
        verified = _verify(c)
        assert verified.ak == c.ak
        assert verified.fields()["ak_name"] == c.ak.name().hex()
        # The same AK as a bare key verifies too; only the TPM attributes go unchecked.
        assert _verify(c, ak=c.ak.public_key()).ak is None
    else:
        assert _verify(c).ak is None


def test_cases_reject_wrong_vector_pairs() -> None:
    """Each quote verifies with its own AK only (the Azure AKs differ per VM)."""
    aks = {c.vector["id"]: c.ak for c in CASES}
    for c in CASES:
        for vid, ak in aks.items():
            if vid == c.vector["id"]:
                continue
            if vid.startswith("tpm-gce") and c.vector["id"].startswith("tpm-gce"):
                continue  # the two GCE attestations come from the same VM and AK
            with pytest.raises(AttestationError):
                _verify(c, ak=ak)
