"""The ``tdx`` policy section and validate_quote."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from attestation import Checks, tdx
from attestation.errors import InvalidPolicyError, PolicyError, TcbStatusError
from tests import vectors
from tests.tdx._util import EXPECTED_STATUS, TDX_VECTORS, VECTOR_IDS, verify

PHALA = vectors.vector("tdx-v4-phala-uptodate")
TRUSTEE4 = vectors.vector("tdx-v4-trustee-4")
TRUSTEE6 = vectors.vector("tdx-v4-trustee-6-module3")
GCP = vectors.vector("tdx-v4-gcp-cos-go-tdx-guest")
V5_BAD = vectors.vector("tdx-v5-phala-tcb-not-supported")
SPR = vectors.vector("tdx-v4-go-tdx-guest-spr-e4")

H48 = "ab" * 48


def test_default_policy() -> None:
    policy = tdx.TdxPolicy()
    assert policy.accepted_tcb_statuses == ("UpToDate",)
    assert policy.require_collateral is True
    assert policy.allow_debug is False
    assert tdx.TdxPolicy.from_json({}) == policy
    assert policy.to_json()["accepted_tcb_statuses"] == ["UpToDate"]


def test_from_json_full_round_trip() -> None:
    obj = {
        "mr_td": [H48],
        "mr_seam": [H48, "cd" * 48],
        "rtmr0": [H48],
        "rtmr1": [H48],
        "rtmr2": [H48],
        "rtmr3": [H48],
        "mr_config_id": [H48],
        "mr_owner": [H48],
        "mr_owner_config": [H48],
        "td_attributes": "0000001000000000",
        "xfam": "e702060000000000",
        "allow_debug": True,
        "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
        "require_collateral": False,
        "rejected_advisory_ids": ["INTEL-SA-00837"],
        "allow_service_td": True,
        "require_sept_ve_disable": True,
    }
    policy = tdx.TdxPolicy.from_json(obj)
    assert policy.mr_seam == (bytes.fromhex(H48), bytes.fromhex("cd" * 48))
    assert policy.to_json() == obj
    assert tdx.TdxPolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"unknown": 1},
        {"mr_td": H48},
        {"mr_td": ["ab" * 47]},
        {"mr_td": ["zz" * 48]},
        {"rtmr2": [1]},
        {"td_attributes": "00"},
        {"xfam": "e70206000000000000"},
        {"allow_debug": "false"},
        {"allow_debug": 0},
        {"require_collateral": 1},
        {"accepted_tcb_statuses": "UpToDate"},
        {"accepted_tcb_statuses": ["Revoked"]},
        {"accepted_tcb_statuses": ["TcbNotSupported"]},
        {"accepted_tcb_statuses": ["uptodate"]},
        {"accepted_tcb_statuses": []},
        {"rejected_advisory_ids": "INTEL-SA-1"},
    ],
)
def test_invalid_policies(obj: object) -> None:
    with pytest.raises(InvalidPolicyError):
        tdx.TdxPolicy.from_json(obj)


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(InvalidPolicyError):
        tdx.TdxPolicy(accepted_tcb_statuses=("Revoked",))
    with pytest.raises(InvalidPolicyError):
        tdx.TdxPolicy(mr_td=(b"short",))


# ---------------------------------------------------------------------------------------------
# Verdicts on the manifest vectors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=TDX_VECTORS, ids=VECTOR_IDS)
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    v: dict[str, Any] = request.param
    return v


def test_default_policy_verdicts(vector: dict[str, Any]) -> None:
    verified = verify(vector)
    status = EXPECTED_STATUS[vector["id"]]
    debug = verified.quote.td_report.debug
    if status is None:
        with pytest.raises(PolicyError, match="collateral"):
            tdx.validate_quote(verified, tdx.TdxPolicy())
    elif status != "UpToDate":
        with pytest.raises(TcbStatusError, match=status):
            tdx.validate_quote(verified, tdx.TdxPolicy())
    elif debug:
        with pytest.raises(PolicyError, match="DEBUG"):
            tdx.validate_quote(verified, tdx.TdxPolicy())
    else:
        tdx.validate_quote(verified, tdx.TdxPolicy())


def test_expected_verdicts_under_a_lenient_policy(vector: dict[str, Any]) -> None:
    """The manifest's verdict: accept (with the status) unless the TCB is not supported."""
    lenient = tdx.TdxPolicy(
        accepted_tcb_statuses=tdx.ACCEPTABLE_TCB_STATUSES,
        require_collateral=False,
        allow_debug=True,
    )
    verified = verify(vector)
    if vector["expected_verdict"].startswith("reject"):
        with pytest.raises(TcbStatusError, match="TcbNotSupported"):
            tdx.validate_quote(verified, lenient)
    else:
        tdx.validate_quote(verified, lenient)


def test_out_of_date_accepted_only_when_listed() -> None:
    verified = verify(TRUSTEE6)
    with pytest.raises(TcbStatusError, match="OutOfDate"):
        tdx.validate_quote(verified, tdx.TdxPolicy())
    tdx.validate_quote(verified, tdx.TdxPolicy(accepted_tcb_statuses=("UpToDate", "OutOfDate")))


def test_tcb_not_supported_is_never_accepted() -> None:
    for v in (V5_BAD, SPR):
        verified = verify(v)
        with pytest.raises(TcbStatusError, match="TcbNotSupported"):
            tdx.validate_quote(
                verified,
                tdx.TdxPolicy(accepted_tcb_statuses=tdx.ACCEPTABLE_TCB_STATUSES),
            )


def test_revoked_is_never_accepted() -> None:
    verified = dataclasses.replace(verify(PHALA), tcb_status="Revoked")
    with pytest.raises(TcbStatusError, match="Revoked"):
        tdx.validate_quote(
            verified, tdx.TdxPolicy(accepted_tcb_statuses=tdx.ACCEPTABLE_TCB_STATUSES)
        )


def test_debug_td_needs_allow_debug() -> None:
    verified = verify(TRUSTEE4)
    assert verified.quote.td_report.debug
    with pytest.raises(PolicyError, match="DEBUG"):
        tdx.validate_quote(verified, tdx.TdxPolicy())
    tdx.validate_quote(verified, tdx.TdxPolicy(allow_debug=True))


def test_collateral_optional_when_the_policy_says_so() -> None:
    verified = verify(GCP)
    checks = Checks()
    tdx.validate_quote(verified, tdx.TdxPolicy(require_collateral=False), checks=checks)
    assert next(c.name for c in checks) == "tdx.policy.collateral"


@pytest.mark.parametrize(
    "name", ["mr_td", "mr_seam", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner"]
)
def test_measurement_lists(name: str) -> None:
    verified = verify(PHALA)
    actual = getattr(verified.quote.td_report, name)
    accept: dict[str, Any] = {name: (bytes(48), actual)}
    tdx.validate_quote(verified, tdx.TdxPolicy(**accept))
    other = bytes([actual[0] ^ 1]) + actual[1:]
    checks = Checks()
    with pytest.raises(PolicyError, match=name.upper()):
        refuse: dict[str, Any] = {name: (other,)}
        tdx.validate_quote(verified, tdx.TdxPolicy(**refuse), checks=checks)
    failed = list(checks)[-1]
    assert failed.name == f"tdx.policy.{name}" and not failed.passed
    assert failed.actual == actual.hex() and failed.expected == other.hex()


def test_attributes_and_xfam_exact() -> None:
    verified = verify(PHALA)
    td = verified.quote.td_report
    tdx.validate_quote(verified, tdx.TdxPolicy(td_attributes=td.td_attributes, xfam=td.xfam))
    with pytest.raises(PolicyError, match="TD_ATTRIBUTES"):
        tdx.validate_quote(verified, tdx.TdxPolicy(td_attributes=bytes(8)))
    with pytest.raises(PolicyError, match="XFAM"):
        tdx.validate_quote(verified, tdx.TdxPolicy(xfam=bytes(8)))


def test_sept_ve_disable() -> None:
    tdx.validate_quote(verify(PHALA), tdx.TdxPolicy(require_sept_ve_disable=True))
    azure = verify(vectors.vector("tdx-v4-azure-trustee"))
    assert not azure.quote.td_report.sept_ve_disable
    with pytest.raises(PolicyError, match="SEPT_VE_DISABLE"):
        tdx.validate_quote(
            azure, tdx.TdxPolicy(require_collateral=False, require_sept_ve_disable=True)
        )


def test_rejected_advisories() -> None:
    verified = dataclasses.replace(verify(TRUSTEE6), advisory_ids=("INTEL-SA-00837",))
    policy = tdx.TdxPolicy(accepted_tcb_statuses=("OutOfDate",))
    tdx.validate_quote(verified, policy)
    with pytest.raises(TcbStatusError, match="INTEL-SA-00837"):
        tdx.validate_quote(
            verified, dataclasses.replace(policy, rejected_advisory_ids=("INTEL-SA-00837",))
        )


def test_service_td() -> None:
    verified = verify(vectors.vector("tdx-v5-go-tdx-guest"))
    tdx.validate_quote(verified, tdx.TdxPolicy())
    bound = dataclasses.replace(
        verified,
        quote=dataclasses.replace(
            verified.quote,
            td_report=dataclasses.replace(verified.quote.td_report, mr_service_td=b"\x01" * 48),
        ),
    )
    with pytest.raises(PolicyError, match="service TD"):
        tdx.validate_quote(bound, tdx.TdxPolicy())
    tdx.validate_quote(bound, tdx.TdxPolicy(allow_service_td=True))


def test_policy_composes_into_cube_policy() -> None:
    from attestation.policy import Policy

    policy = Policy.from_json(
        {"format": "cube-policy/1", "tdx": {"accepted_tcb_statuses": ["OutOfDate"]}}
    )
    assert policy.tdx.accepted_tcb_statuses == ("OutOfDate",)
