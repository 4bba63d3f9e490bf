"""Every way a ``cube-evidence/1`` document must be refused, each with its error class."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest

from attestation import evidence, tdx
from attestation.errors import (
    AttestationError,
    BindingError,
    CertificateChainError,
    MalformedError,
    PolicyError,
    SignatureError,
    SimulatedEvidenceError,
    StaleEvidenceError,
    TcbStatusError,
)
from attestation.policy import Policy
from attestation.sim import SimulatedSnp, SimulatedTdx, TdxPlatformTcb
from tests.evidence import _util as e

SNP_DOC = e.collect("configfs-snp")
TDX_DOC = e.collect("configfs-tdx")
DOCS = {"sim-sev-snp": SNP_DOC, "sim-tdx": TDX_DOC}


def refuse(
    document: bytes,
    error: type[AttestationError],
    *,
    nonce: bytes = e.NONCE,
    policy: Policy = e.ALLOW_SIMULATED,
    check: str | None = None,
    **kwargs: Any,
) -> AttestationError:
    """Verify, expecting ``error`` exactly (not merely a subclass of its parent)."""
    with pytest.raises(AttestationError) as info:
        evidence.verify_evidence(document, nonce=nonce, policy=policy, **{"now": e.NOW, **kwargs})
    assert type(info.value) is error, repr(info.value)
    if check is not None:
        assert info.value.check == check
    return info.value


def accept(document: bytes, *, policy: Policy = e.ALLOW_SIMULATED, **kwargs: Any) -> None:
    evidence.verify_evidence(document, nonce=e.NONCE, policy=policy, **{"now": e.NOW, **kwargs})


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_baseline_accepts(platform: str) -> None:
    accept(DOCS[platform])


@pytest.mark.parametrize(("platform", "other"), [("sim-sev-snp", "tdx"), ("sim-tdx", "sev-snp")])
def test_simulated_evidence_of_a_platform_the_policy_does_not_list(
    platform: str, other: str
) -> None:
    # allow_simulated allows simulation; it does not widen the platforms the policy names.
    policy = Policy.from_json(
        {"format": "cube-policy/1", "allow_simulated": True, "platforms": [other]}
    )
    refuse(DOCS[platform], PolicyError, policy=policy, check="policy.platform")
    listed = Policy.from_json(
        {"format": "cube-policy/1", "allow_simulated": True, "platforms": [platform]}
    )
    accept(DOCS[platform], policy=listed)


# -- nonce and claims binding ------------------------------------------------------------------


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_wrong_nonce(platform: str) -> None:
    refuse(DOCS[platform], BindingError, nonce=e.OTHER_NONCE, check="evidence.nonce")
    refuse(DOCS[platform], BindingError, nonce=e.NONCE + b"\0", check="evidence.nonce")


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_nonce_edited_in_the_document_breaks_the_binding(platform: str) -> None:
    # A relay that answers a new nonce with old evidence: the nonce matches, REPORT_DATA not.
    def change(doc: dict[str, Any]) -> None:
        doc["nonce"] = e.OTHER_NONCE.hex()

    edited = e.edit(DOCS[platform], change)
    refuse(edited, BindingError, nonce=e.OTHER_NONCE, check="evidence.binding.report_data")


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_claims_bytes_altered(platform: str) -> None:
    claims = e.claims_of(DOCS[platform])
    altered = claims.replace(b'"0.1.0"', b'"0.1.1"')
    assert altered != claims and len(altered) == len(claims)
    refuse(
        e.set_claims(DOCS[platform], altered), BindingError, check="evidence.binding.report_data"
    )
    other_model = claims.replace(b"1111", b"3333", 1)
    refuse(e.set_claims(DOCS[platform], other_model), BindingError)


@pytest.mark.parametrize("platform", sorted(DOCS))
@pytest.mark.parametrize(
    "reserialise",
    [
        lambda c: json.dumps(c, indent=2),
        lambda c: json.dumps(c, sort_keys=True),  # default separators: ", " and ": "
        lambda c: json.dumps(c, separators=(",", ":")),  # insertion order, not sorted
        lambda c: json.dumps(c, sort_keys=True, separators=(",", ":")) + "\n",
    ],
    ids=["indented", "spaces", "unsorted", "trailing-newline"],
)
def test_claims_reserialised_are_not_the_claims(platform: str, reserialise: Any) -> None:
    """Nothing is re-serialised before hashing: the same JSON value in other bytes fails."""
    claims = e.claims_of(DOCS[platform])
    value = json.loads(claims)
    value = {"model": value.pop("model"), **value}  # so "unsorted" really differs
    other = reserialise(value).encode()
    assert other != claims and json.loads(other) == json.loads(claims)
    refuse(e.set_claims(DOCS[platform], other), BindingError, check="evidence.binding.report_data")


def test_unknown_claim_key_is_malformed_even_when_bound() -> None:
    claims = e.claims_bytes(gpu_evidence="later")
    document = e.collect(claims=claims)  # correctly bound, but the claims are not cube's
    error = refuse(document, MalformedError)
    assert "gpu_evidence" in error.message


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model": None}, "model"),
        ({"issued_at": None}, "issued_at"),
        ({"tls_cert_sha256": None}, "tls_cert_sha256"),
        ({"tls_cert_sha256": "00" * 31}, "tls_cert_sha256"),
        ({"config_digest": "11" * 32}, "config_digest"),
        ({"config_digest": "sha256:" + "11" * 31}, "config_digest"),
        ({"model": {"name": "tiny", "digest": "md5:00"}}, "digest"),
        ({"model": {"name": "tiny", "digest": e.MODEL_DIGEST, "size": 1}}, "size"),
        ({"issued_at": "2030-01-01T12:00:00"}, "issued_at"),
        ({"issued_at": "soon"}, "issued_at"),
        # Valid ISO 8601, but outside what a UTC datetime can hold once converted.
        ({"issued_at": "0001-01-01T00:30:00+01:00"}, "issued_at"),
        ({"issued_at": "9999-12-31T23:30:00-01:00"}, "issued_at"),
        ({"agent_version": 1}, "agent_version"),
        ({"tpm_ak_sha256": "zz"}, "tpm_ak_sha256"),
        ({"hpke_public_key": "not base64!"}, "hpke_public_key"),
    ],
)
def test_malformed_claims(overrides: dict[str, Any], needle: str) -> None:
    document = e.collect(claims=e.claims_bytes(**overrides))
    error = refuse(document, MalformedError)
    assert needle in error.message


@pytest.mark.parametrize(
    "path",
    [
        "tls_cert_sha256",
        "model",
        "model.name",
        "model.digest",
        "config_digest",
        "agent_version",
        "issued_at",
    ],
)
def test_required_claim_given_as_null(path: str) -> None:
    """JSON null is no value: a required claim that is null is refused, not read as "None"."""
    claims = e.claims_dict()
    *parents, key = path.split(".")
    target = claims
    for parent in parents:
        target = target[parent]
    target[key] = None
    document = e.collect(claims=evidence.encode_claims(claims))
    error = refuse(document, MalformedError)
    assert key in error.message and "null" in error.message, error.message


@pytest.mark.parametrize(
    "raw",
    [b"", b"[]", b"not json", b'{"a":1,"a":2}', "\udcff".encode("utf-8", "surrogatepass")],
    ids=["empty", "array", "text", "duplicate-keys", "bad-utf8"],
)
def test_claims_that_are_not_a_json_object(raw: bytes) -> None:
    refuse(e.collect(claims=raw), MalformedError)


# -- platform ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sim", "real"), [("sim-sev-snp", "sev-snp"), ("sim-tdx", "tdx")])
def test_simulated_evidence_relabelled_as_real_is_refused_by_real_roots(
    sim: str, real: str
) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["platform"] = real

    relabelled = e.edit(DOCS[sim], change)
    # The strict default policy: real platforms only, and the real AMD/Intel roots.
    refuse(relabelled, CertificateChainError, policy=Policy())
    refuse(relabelled, CertificateChainError, policy=e.ALLOW_SIMULATED)


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_simulated_refused_without_allow_simulated(platform: str) -> None:
    error = refuse(DOCS[platform], SimulatedEvidenceError, policy=Policy(), check="policy.platform")
    assert "SIMULATED" in error.message
    # Listing the sim platform is not enough; allow_simulated is what counts.
    listed = Policy.from_json({"format": "cube-policy/1", "platforms": [platform]})
    refuse(DOCS[platform], SimulatedEvidenceError, policy=listed)


def test_platform_not_in_the_policy() -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["platform"] = "sev-snp"

    relabelled = e.edit(SNP_DOC, change)
    only_tdx = Policy.from_json({"format": "cube-policy/1", "platforms": ["tdx"]})
    refuse(relabelled, PolicyError, policy=only_tdx, check="policy.platform")


def test_tampered_report_in_the_document() -> None:
    def change(doc: dict[str, Any]) -> None:
        report = bytearray(base64.b64decode(doc["tee"]["report"]))
        report[0x90] ^= 1  # MEASUREMENT
        doc["tee"]["report"] = base64.b64encode(bytes(report)).decode()

    refuse(e.edit(SNP_DOC, change), SignatureError, check="snp.report.signature")


def test_tampered_quote_in_the_document() -> None:
    def change(doc: dict[str, Any]) -> None:
        quote = bytearray(base64.b64decode(doc["tee"]["quote"]))
        quote[48 + 136] ^= 1  # MRTD
        doc["tee"]["quote"] = base64.b64encode(bytes(quote)).decode()

    refuse(e.edit(TDX_DOC, change), SignatureError)


def test_report_of_another_nonce_swapped_in() -> None:
    """A genuine report, correctly signed, made for another nonce: the binding catches it."""
    other = json.loads(e.collect(nonce=e.OTHER_NONCE))

    def change(doc: dict[str, Any]) -> None:
        doc["tee"]["report"] = other["tee"]["report"]

    refuse(e.edit(SNP_DOC, change), BindingError, check="evidence.binding.report_data")


# -- evidence age ------------------------------------------------------------------------------


def test_stale_evidence() -> None:
    refuse(
        SNP_DOC, StaleEvidenceError, now=e.NOW + timedelta(seconds=301), check="policy.evidence_age"
    )
    accept(SNP_DOC, now=e.NOW + timedelta(seconds=300))
    strict = e.policy(max_evidence_age_seconds=10)
    refuse(SNP_DOC, StaleEvidenceError, policy=strict, now=e.NOW + timedelta(seconds=11))
    accept(SNP_DOC, policy=strict, now=e.NOW + timedelta(seconds=10))


def test_issued_in_the_future() -> None:
    refuse(
        SNP_DOC,
        StaleEvidenceError,
        now=e.NOW - timedelta(seconds=61),
        check="policy.evidence_not_future",
    )
    accept(SNP_DOC, now=e.NOW - timedelta(seconds=60))
    no_skew = e.policy(max_clock_skew_seconds=0)
    refuse(SNP_DOC, StaleEvidenceError, policy=no_skew, now=e.NOW - timedelta(seconds=1))
    accept(SNP_DOC, policy=no_skew)


def test_issued_at_with_an_offset_is_normalised() -> None:
    local = (e.NOW + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    document = e.collect(claims=e.claims_bytes(issued_at=local))
    verified = evidence.verify_evidence(
        document, nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    assert verified.claims.issued_at == e.NOW


# -- the policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "check"),
    [("model_digests", "policy.model_digest"), ("config_digests", "policy.config_digest")],
)
def test_digest_not_in_the_policy(key: str, check: str) -> None:
    other = "sha256:" + "ab" * 32
    error = refuse(SNP_DOC, PolicyError, policy=e.policy(**{key: [other]}), check=check)
    assert check.removeprefix("policy.") in error.message
    wanted = e.MODEL_DIGEST if key == "model_digests" else e.CONFIG_DIGEST
    accept(SNP_DOC, policy=e.policy(**{key: [other, wanted]}))
    # Digests compare case-insensitively (they are hex).
    accept(SNP_DOC, policy=e.policy(**{key: [wanted.upper().replace("SHA256", "sha256")]}))


def test_agent_version_not_in_the_policy() -> None:
    refuse(
        SNP_DOC,
        PolicyError,
        policy=e.policy(agent_versions=["0.2.0"]),
        check="policy.agent_version",
    )
    accept(SNP_DOC, policy=e.policy(agent_versions=["0.1.0", "0.2.0"]))


def test_snp_measurement_pinned() -> None:
    accept(SNP_DOC, policy=e.policy(sev_snp={"measurements": [e.SIM_MEASUREMENT.hex()]}))
    error = refuse(
        SNP_DOC,
        PolicyError,
        policy=e.policy(sev_snp={"measurements": ["00" * 48]}),
        check="snp.policy.measurement",
    )
    assert error.message


def test_tdx_mr_td_pinned() -> None:
    verified = evidence.verify_evidence(TDX_DOC, nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW)
    assert verified.tee is not None
    mr_td = verified.fields()["mr_td"]
    assert isinstance(mr_td, str)
    accept(TDX_DOC, policy=e.policy(tdx={"mr_td": [mr_td]}))
    refuse(TDX_DOC, PolicyError, policy=e.policy(tdx={"mr_td": ["00" * 48]}))


def test_measurement_reported_by_the_guest_is_what_the_policy_sees() -> None:
    measured = bytes(range(48))
    document = e.collect(measurement=measured)
    accept(document, policy=e.policy(sev_snp={"measurements": [measured.hex()]}))
    refuse(
        document, PolicyError, policy=e.policy(sev_snp={"measurements": [e.SIM_MEASUREMENT.hex()]})
    )


@pytest.mark.parametrize("platform", sorted(DOCS))
def test_revoked_measurement(platform: str) -> None:
    verified = evidence.verify_evidence(
        DOCS[platform], nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    fields = verified.fields()
    measurement = fields["measurement"] if platform == "sim-sev-snp" else fields["mr_td"]
    assert isinstance(measurement, str)
    error = refuse(
        DOCS[platform],
        PolicyError,
        policy=e.policy(revoked_measurements=[measurement]),
        check="policy.revoked_measurements",
    )
    assert measurement in error.message
    accept(DOCS[platform], policy=e.policy(revoked_measurements=["00" * 48]))


def test_debug_guest_refused_by_default() -> None:
    document = e.collect(policy=0x30000 | 1 << 19)
    refuse(document, PolicyError, check="snp.policy.debug")
    accept(document, policy=e.policy(sev_snp={"allow_debug": True}))


def test_debug_td_refused_by_default() -> None:
    document = e.collect("configfs-tdx", td_attributes=bytes.fromhex("0100001000000000"))
    refuse(document, PolicyError, check="tdx.policy.debug")
    accept(document, policy=e.policy(tdx={"allow_debug": True}))


def test_tdx_platform_below_every_tcb_level() -> None:
    # A PCESVN below every TCB level of the (simulator's) TCB info: TcbNotSupported, which no
    # policy can accept.
    document = e.collect("configfs-tdx", sim=SimulatedTdx(tcb=TdxPlatformTcb(pcesvn=1)))
    error = refuse(document, TcbStatusError, check="tdx.policy.tcb_status")
    assert "TcbNotSupported" in error.message
    lenient = e.policy(tdx={"accepted_tcb_statuses": ["UpToDate", "OutOfDate"]})
    refuse(document, TcbStatusError, policy=lenient)


def test_require_tpm_without_a_tpm_quote() -> None:
    refuse(SNP_DOC, PolicyError, policy=e.policy(require_tpm=True), check="evidence.tpm.present")


@pytest.mark.parametrize(
    ("vtpm", "why"),
    [
        ({"pcrs": {"sha256": {"0": "ee" * 32}}}, "vtpm.pcrs"),
        ({"require_event_log": True}, "vtpm.require_event_log"),
    ],
)
@pytest.mark.parametrize("platform", sorted(DOCS))
def test_vtpm_section_requires_a_tpm_quote(platform: str, vtpm: dict[str, Any], why: str) -> None:
    """The ``tpm`` member is not bound by REPORT_DATA: a relay can delete it. A policy that
    pins vTPM PCRs (or wants an event log) must not pass evidence without a quote, with or
    without ``require_tpm``."""
    error = refuse(
        DOCS[platform], PolicyError, policy=e.policy(vtpm=vtpm), check="evidence.tpm.present"
    )
    assert why in error.message, error.message
    # A bank listed with no PCR in it pins nothing, and asks for nothing.
    accept(DOCS[platform], policy=e.policy(vtpm={"pcrs": {"sha256": {}}}))


# -- nonce and document shape ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["00" * 32, "ab" * 48, "FF" * 64])
def test_parse_nonce_accepts_32_to_64_bytes(value: str) -> None:
    assert evidence.parse_nonce(value) == bytes.fromhex(value)


@pytest.mark.parametrize("value", ["", "00" * 31, "00" * 65, "0" * 63, "zz" * 32, "00 " * 32])
def test_parse_nonce_refuses(value: str) -> None:
    with pytest.raises(MalformedError):
        evidence.parse_nonce(value)


@pytest.mark.parametrize("length", [0, 16, 31, 65])
def test_document_nonce_of_the_wrong_length(length: int) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["nonce"] = bytes(length).hex()

    with pytest.raises(MalformedError):
        evidence.parse_evidence(e.edit(SNP_DOC, change))
    refuse(e.edit(SNP_DOC, change), MalformedError, nonce=bytes(length))


@pytest.mark.parametrize("length", [0, 16, 31, 65])
def test_verifier_nonce_of_the_wrong_length(length: int) -> None:
    refuse(SNP_DOC, MalformedError, nonce=bytes(length))


def _doc_edit(change: Any) -> bytes:
    return e.edit(SNP_DOC, change)


def _set(path: str, value: object) -> Any:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return change


_DELETE = object()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _crl_of_version_64() -> bytes:
    crl = bytearray(SimulatedSnp().crl_der())
    at = crl.index(b"\x02\x01\x01")  # TBSCertList version: v2
    crl[at + 2] = 0x40
    return bytes(crl)


def _collateral_with_a_lone_surrogate() -> bytes:
    collateral = json.loads(SimulatedTdx().collateral_json())
    collateral["tcb_info"] += "\ud800"
    return json.dumps(collateral).encode()  # valid JSON: the surrogate is escaped


# Each of these once escaped verify_evidence as a non-AttestationError (the proxy answered 500).
CRASHED_BEFORE = {
    "tee-crl-unknown-version": _doc_edit(_set("tee.crl", _b64(_crl_of_version_64()))),
    "tee-collateral-lone-surrogate": e.edit(
        TDX_DOC, _set("tee.collateral", _b64(_collateral_with_a_lone_surrogate()))
    ),
}

MALFORMED_DOCUMENTS = {
    **CRASHED_BEFORE,
    "empty": b"",
    "not-json": b"cube-evidence/1",
    "array": b"[]",
    "nan": b'{"format": NaN}',
    "duplicate-keys": SNP_DOC[:-1] + b', "platform": "sim-sev-snp"}',
    "duplicate-format": b'{"format": "cube-evidence/1", "format": "cube-evidence/1"}',
    "unknown-top-level-key": _doc_edit(_set("extra", 1)),
    "wrong-format": _doc_edit(_set("format", "cube-evidence/2")),
    "format-missing": _doc_edit(_set("format", _DELETE)),
    "unknown-platform": _doc_edit(_set("platform", "sgx")),
    "platform-not-a-string": _doc_edit(_set("platform", 1)),
    "nonce-not-hex": _doc_edit(_set("nonce", "xy" * 32)),
    "nonce-missing": _doc_edit(_set("nonce", _DELETE)),
    "claims-not-base64": _doc_edit(_set("claims", "***")),
    "claims-missing": _doc_edit(_set("claims", _DELETE)),
    "tee-missing": _doc_edit(_set("tee", _DELETE)),
    "tee-not-an-object": _doc_edit(_set("tee", "report")),
    "tee-unknown-key": _doc_edit(_set("tee.quote", "AAAA")),
    "tee-report-missing": _doc_edit(_set("tee.report", _DELETE)),
    "tee-vcek-missing": _doc_edit(_set("tee.vcek", _DELETE)),
    "tee-report-not-base64": _doc_edit(_set("tee.report", "%%%")),
    "tee-report-truncated": _doc_edit(_set("tee.report", "AAAA")),
    "tpm-not-an-object": _doc_edit(_set("tpm", [])),
    "tpm-empty": _doc_edit(_set("tpm", {})),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_DOCUMENTS))
def test_malformed_documents(name: str) -> None:
    refuse(MALFORMED_DOCUMENTS[name], MalformedError)


def test_what_crashed_before_names_its_cause() -> None:
    crl = refuse(CRASHED_BEFORE["tee-crl-unknown-version"], MalformedError)
    assert "CRL" in str(crl) and "InvalidVersion" in str(crl)
    collateral = refuse(CRASHED_BEFORE["tee-collateral-lone-surrogate"], MalformedError)
    assert "tcb_info: a lone UTF-16 surrogate" in str(collateral)


def test_claims_with_a_lone_surrogate_are_malformed_even_when_bound() -> None:
    claims = json.dumps(e.claims_dict(agent_version="0.1.0\ud800"), sort_keys=True).encode()
    assert b"\\ud800" in claims  # ASCII JSON with the escape; bound like any claims
    error = refuse(e.collect(claims=claims), MalformedError)
    assert "agent_version: a lone UTF-16 surrogate" in str(error)


def test_vtpm_platform_needs_a_tpm_part_and_no_tee() -> None:
    def as_vtpm(doc: dict[str, Any]) -> None:
        doc["platform"] = "vtpm"

    with pytest.raises(MalformedError):
        evidence.parse_evidence(_doc_edit(as_vtpm))  # has "tee", lacks "tpm"

    def bare(doc: dict[str, Any]) -> None:
        doc["platform"] = "vtpm"
        del doc["tee"]

    with pytest.raises(MalformedError, match="tpm"):
        evidence.parse_evidence(_doc_edit(bare))


def test_errors_are_attestation_errors_with_exit_codes() -> None:
    assert MalformedError("x").exit_code == 3
    assert BindingError("x").exit_code == 4
    assert CertificateChainError("x").exit_code == 4
    assert PolicyError("x").exit_code == 5
    assert SimulatedEvidenceError("x").exit_code == 5
    assert StaleEvidenceError("x").exit_code == 6


def test_certificate_window_refuses_an_unknown_certificate_version() -> None:
    der = tdx.embedded_root().der
    assert evidence.certificate_window(der)[0].year == 2018
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] version: v3
    v6 = der[: at + 4] + b"\x05" + der[at + 5 :]
    # cryptography raises x509.InvalidVersion here, which is not a ValueError.
    with pytest.raises(MalformedError, match=r"not a valid X\.509 certificate"):
        evidence.certificate_window(v6)
