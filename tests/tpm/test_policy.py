"""The "vtpm" policy section and validate_quote."""

from __future__ import annotations

import struct

import pytest

from attestation import Checks
from attestation.errors import InvalidPolicyError, PolicyError
from attestation.tpm import TpmPolicy, VerifiedTpmQuote, validate_quote, verify_quote
from tests.tpm._cases import QuoteCase, case


def _verified(c: QuoteCase, *, with_log: bool = False) -> VerifiedTpmQuote:
    return verify_quote(
        attest=c.attest,
        signature=c.signature,
        ak=c.ak,
        pcrs=c.pcrs,
        qualifying_data=c.qualifying_data,
        event_log=c.event_log if with_log else None,
    )


MILAN = case("tpm-azure-snp-milan-vtpm")
GCE = case("tpm-gce-cos85-nonce#1")


def test_default_pins_nothing() -> None:
    policy = TpmPolicy()
    assert policy == TpmPolicy.from_json({})
    assert policy.to_json() == {"pcrs": {}, "require_event_log": False}
    validate_quote(_verified(MILAN), policy)


def test_roundtrip_and_parsing() -> None:
    doc = {
        "pcrs": {
            "sha256": {"0": "aa" * 32, "7": ["bb" * 32, "CC" * 32]},
            "sha1": {"23": "00" * 20},
        },
        "require_event_log": True,
    }
    policy = TpmPolicy.from_json(doc)
    assert policy.pcrs["sha256"][7] == (b"\xbb" * 32, b"\xcc" * 32)
    assert policy.pcrs["sha1"][23] == (bytes(20),)
    assert policy.require_event_log
    again = policy.to_json()
    assert again["pcrs"] == {
        "sha256": {"0": "aa" * 32, "7": ["bb" * 32, "cc" * 32]},
        "sha1": {"23": "00" * 20},
    }
    assert TpmPolicy.from_json(again) == policy


@pytest.mark.parametrize(
    "doc",
    [
        {"pcr": {}},  # unknown key
        {"pcrs": []},
        {"pcrs": {"md5": {"0": "00" * 16}}},
        {"pcrs": {"sha256": []}},
        {"pcrs": {"sha256": {"00": "00" * 32}}},
        {"pcrs": {"sha256": {"-1": "00" * 32}}},
        {"pcrs": {"sha256": {"32": "00" * 32}}},
        {"pcrs": {"sha256": {"x": "00" * 32}}},
        {"pcrs": {"sha256": {"0": "00" * 20}}},  # wrong length for the bank
        {"pcrs": {"sha256": {"0": "zz" * 32}}},
        {"pcrs": {"sha256": {"0": []}}},
        {"pcrs": {"sha256": {"0": 5}}},
        {"require_event_log": "yes"},
        "not an object",
    ],
)
def test_invalid_sections(doc: object) -> None:
    with pytest.raises(InvalidPolicyError):
        TpmPolicy.from_json(doc)


def test_matching_pcrs_pass_and_are_recorded() -> None:
    pcrs = {str(i): MILAN.expected["pcrs"][str(i)] for i in (0, 4, 7, 11)}
    policy = TpmPolicy.from_json({"pcrs": {"sha256": pcrs}})
    checks = Checks()
    validate_quote(_verified(MILAN), policy, checks=checks)
    names = [c.name for c in checks]
    assert names == [f"policy.vtpm.sha256.pcr{i}" for i in (0, 4, 7, 11)]
    assert all(c.passed for c in checks)


def test_mismatching_pcr_is_a_policy_error_naming_both_values() -> None:
    wrong = "11" * 32
    policy = TpmPolicy.from_json({"pcrs": {"sha256": {"7": ["22" * 32, wrong]}}})
    with pytest.raises(PolicyError) as info:
        validate_quote(_verified(MILAN), policy)
    assert info.value.check == "policy.vtpm.sha256.pcr7"
    assert wrong in str(info.value) and MILAN.expected["pcrs"]["7"] in str(info.value)
    # One of several accepted values is enough.
    ok = TpmPolicy.from_json({"pcrs": {"sha256": {"7": [wrong, MILAN.expected["pcrs"]["7"]]}}})
    validate_quote(_verified(MILAN), ok)


def test_pinned_pcr_not_in_the_quote_is_refused() -> None:
    policy = TpmPolicy.from_json({"pcrs": {"sha384": {"0": "00" * 48}}})
    with pytest.raises(PolicyError, match="not in the quote"):
        validate_quote(_verified(MILAN), policy)


def test_require_event_log() -> None:
    policy = TpmPolicy(require_event_log=True)
    with pytest.raises(PolicyError) as info:
        validate_quote(_verified(GCE), policy)
    assert info.value.check == "policy.vtpm.event_log"
    validate_quote(_verified(GCE, with_log=True), policy)
    with pytest.raises(PolicyError):
        validate_quote(_verified(MILAN), policy)  # Azure evidence carries no log


def _header_only(log: bytes) -> bytes:
    """The log's Spec ID event alone: a valid log that extends nothing."""
    size = struct.unpack_from("<I", log, 28)[0]  # TCG_PCR_EVENT: 8 + 20 bytes, then eventSize
    return log[: 32 + size]


def test_required_event_log_that_replays_nothing_is_refused() -> None:
    assert GCE.event_log is not None
    empty = verify_quote(
        attest=GCE.attest,
        signature=GCE.signature,
        ak=GCE.ak,
        pcrs=GCE.pcrs,
        qualifying_data=GCE.qualifying_data,
        event_log=_header_only(GCE.event_log),
    )
    assert empty.event_log is not None and not any(empty.event_log.verified.values())
    with pytest.raises(PolicyError, match="replays none") as info:
        validate_quote(empty, TpmPolicy(require_event_log=True))
    assert info.value.check == "policy.vtpm.event_log"
    validate_quote(empty, TpmPolicy())  # not required: the log is only informative


def test_a_pinned_pcr_the_log_does_not_extend_is_bound_by_its_pin() -> None:
    """PCR 15 (the agent's runtime events, extended after the firmware's log ends) is quoted
    but not in the log: with ``require_event_log`` it is checked against its pin alone."""
    verified = _verified(GCE, with_log=True)
    assert verified.event_log is not None
    replayed = verified.event_log.verified["sha256"]
    assert 7 in replayed and 15 not in replayed
    quoted = verified.pcrs["sha256"]

    def pins(*indices: int) -> TpmPolicy:
        return TpmPolicy.from_json(
            {
                "pcrs": {"sha256": {str(i): quoted[i].hex() for i in indices}},
                "require_event_log": True,
            }
        )

    validate_quote(verified, pins(7))
    validate_quote(verified, pins(7, 15))
    wrong = TpmPolicy.from_json(
        {"pcrs": {"sha256": {"7": quoted[7].hex(), "15": "ab" * 32}}, "require_event_log": True}
    )
    with pytest.raises(PolicyError) as info:
        validate_quote(verified, wrong)
    assert info.value.check == "policy.vtpm.sha256.pcr15"
