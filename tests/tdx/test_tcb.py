"""The TCB status algorithm (Intel QVL semantics) on real collateral with edited inputs."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from attestation import Checks, tdx
from attestation.errors import CollateralError
from attestation.tdx._tcb import evaluate_tcb
from tests import vectors
from tests.tdx._util import collateral_for, quote_bytes

PHALA = vectors.vector("tdx-v4-phala-uptodate")
V5 = vectors.vector("tdx-v5-go-tdx-guest")
DATE = datetime(2024, 1, 1, tzinfo=UTC)


def _svn(*head: int) -> bytes:
    return bytes(head) + bytes(16 - len(head))


def _setup(v: dict[str, Any]) -> tuple[tdx.TdxQuote, tdx.Collateral]:
    quote = tdx.parse_quote(quote_bytes(v))
    collateral = collateral_for(v)
    assert collateral is not None
    return quote, collateral


def _with_td(quote: tdx.TdxQuote, **changes: Any) -> tdx.TdxQuote:
    return dataclasses.replace(quote, td_report=dataclasses.replace(quote.td_report, **changes))


def _grade(
    quote: tdx.TdxQuote, collateral: tdx.Collateral, pck: tdx.PckExtensions | None = None
) -> tdx.TcbEvaluation:
    return evaluate_tcb(quote, pck or quote.pck_extensions, collateral, Checks())


def _with_info(collateral: tdx.Collateral, **changes: Any) -> tdx.Collateral:
    return dataclasses.replace(
        collateral, tcb_info=dataclasses.replace(collateral.tcb_info, **changes)
    )


def _with_qe_levels(collateral: tdx.Collateral, *levels: tuple[int, str]) -> tdx.Collateral:
    return dataclasses.replace(
        collateral,
        qe_identity=dataclasses.replace(
            collateral.qe_identity,
            tcb_levels=tuple(
                tdx.IsvTcbLevel(svn, DATE, status, (f"INTEL-SA-QE{svn}",)) for svn, status in levels
            ),
        ),
    )


def test_real_vector_baseline() -> None:
    quote, collateral = _setup(PHALA)
    result = _grade(quote, collateral)
    assert (result.status, result.platform_status, result.module_status) == (
        "UpToDate",
        "UpToDate",
        "UpToDate",
    )
    assert result.module_identity == "TDX_01"
    assert result.qe_status == "UpToDate"
    assert result.tcb_evaluation_data_number == 17


def test_level_order_in_the_json_does_not_matter() -> None:
    quote, collateral = _setup(PHALA)
    reversed_levels = _with_info(
        collateral, tcb_levels=tuple(reversed(collateral.tcb_info.tcb_levels))
    )
    assert _grade(quote, reversed_levels).status == "UpToDate"


def test_module_components_are_skipped_when_major_is_not_zero() -> None:
    quote, collateral = _setup(PHALA)
    # Level TDX components are [5, 0, 2, ...]; byte 0 (module SVN 4) is graded by TDX_01.
    result = _grade(_with_td(quote, tee_tcb_svn=_svn(4, 1, 3)), collateral)
    assert result.platform_status == "UpToDate"
    assert result.module_status == "UpToDate"
    assert result.status == "UpToDate"


def test_module_out_of_date_converges() -> None:
    quote, collateral = _setup(PHALA)
    result = _grade(_with_td(quote, tee_tcb_svn=_svn(2, 1, 3)), collateral)
    assert result.platform_status == "UpToDate"
    assert result.module_status == "OutOfDate"
    assert result.status == "OutOfDate"


def test_module_below_every_level_is_not_supported() -> None:
    quote, collateral = _setup(PHALA)
    result = _grade(_with_td(quote, tee_tcb_svn=_svn(1, 1, 3)), collateral)
    assert result.module_status == "TcbNotSupported"
    assert result.status == "TcbNotSupported"


def test_module_major_zero_grades_every_component() -> None:
    quote, collateral = _setup(PHALA)
    below = _grade(_with_td(quote, tee_tcb_svn=_svn(4, 0, 3)), collateral)
    assert below.status == "TcbNotSupported"
    assert below.module_identity is None
    assert _grade(_with_td(quote, tee_tcb_svn=_svn(5, 0, 3)), collateral).status == "UpToDate"


def test_tdx_component_below_level_is_not_supported() -> None:
    quote, collateral = _setup(PHALA)
    assert _grade(_with_td(quote, tee_tcb_svn=_svn(6, 1, 1)), collateral).status == (
        "TcbNotSupported"
    )


def test_unknown_module_identity() -> None:
    quote, collateral = _setup(PHALA)
    with pytest.raises(CollateralError, match="TDX_02"):
        _grade(_with_td(quote, tee_tcb_svn=_svn(6, 2, 3)), collateral)


def test_module_signer_and_attributes() -> None:
    quote, collateral = _setup(PHALA)
    with pytest.raises(CollateralError, match="MRSIGNER_SEAM"):
        _grade(_with_td(quote, mr_signer_seam=b"\x01" * 48), collateral)
    with pytest.raises(CollateralError, match="SEAM_ATTRIBUTES"):
        _grade(_with_td(quote, seam_attributes=_svn(1)[:8]), collateral)


def test_lower_pcesvn_selects_an_older_level_with_advisories() -> None:
    quote, collateral = _setup(PHALA)
    pck = quote.pck_extensions
    older = dataclasses.replace(pck, tcb=dataclasses.replace(pck.tcb, pcesvn=5))
    result = _grade(quote, collateral, older)
    assert result.platform_status == "OutOfDate"
    assert result.status == "OutOfDate"
    assert "INTEL-SA-00106" in result.advisory_ids
    assert result.platform_tcb_date == datetime(2018, 1, 4, tzinfo=UTC)
    too_old = dataclasses.replace(pck, tcb=dataclasses.replace(pck.tcb, pcesvn=4))
    assert _grade(quote, collateral, too_old).status == "TcbNotSupported"


def test_sgx_component_below_every_level() -> None:
    quote, collateral = _setup(PHALA)
    pck = quote.pck_extensions
    low = dataclasses.replace(
        pck, tcb=dataclasses.replace(pck.tcb, components=(1, *pck.tcb.components[1:]))
    )
    assert _grade(quote, collateral, low).status == "TcbNotSupported"


def test_fmspc_and_pce_id_must_match() -> None:
    quote, collateral = _setup(PHALA)
    pck = quote.pck_extensions
    with pytest.raises(CollateralError, match="FMSPC"):
        _grade(quote, collateral, dataclasses.replace(pck, fmspc=bytes(6)))
    with pytest.raises(CollateralError, match="PCE-ID"):
        _grade(quote, collateral, dataclasses.replace(pck, pce_id=b"\x00\x01"))


@pytest.mark.parametrize(
    ("platform", "qe_levels", "expected"),
    [
        ("UpToDate", [(99, "UpToDate"), (1, "OutOfDate")], "OutOfDate"),
        ("SWHardeningNeeded", [(99, "UpToDate"), (1, "OutOfDate")], "OutOfDate"),
        (
            "ConfigurationNeeded",
            [(99, "UpToDate"), (1, "OutOfDate")],
            "OutOfDateConfigurationNeeded",
        ),
        (
            "ConfigurationAndSWHardeningNeeded",
            [(99, "UpToDate"), (1, "OutOfDate")],
            "OutOfDateConfigurationNeeded",
        ),
        ("OutOfDate", [(99, "UpToDate"), (1, "OutOfDate")], "OutOfDate"),
        ("ConfigurationNeeded", [(1, "UpToDate")], "ConfigurationNeeded"),
        ("UpToDate", [(1, "Revoked")], "Revoked"),
        ("UpToDate", [(99, "UpToDate")], "TcbNotSupported"),
        ("Revoked", [(1, "UpToDate")], "Revoked"),
    ],
)
def test_qe_status_convergence(
    platform: str, qe_levels: list[tuple[int, str]], expected: str
) -> None:
    quote, collateral = _setup(PHALA)
    levels = collateral.tcb_info.tcb_levels
    edited = _with_info(
        collateral, tcb_levels=(dataclasses.replace(levels[0], tcb_status=platform), *levels[1:])
    )
    result = _grade(quote, _with_qe_levels(edited, *qe_levels))
    assert result.platform_status == platform
    assert result.status == expected


def test_advisories_are_merged_without_duplicates() -> None:
    quote, collateral = _setup(PHALA)
    levels = collateral.tcb_info.tcb_levels
    edited = _with_info(
        collateral,
        tcb_levels=(
            dataclasses.replace(levels[0], advisory_ids=("INTEL-SA-1", "INTEL-SA-QE1")),
            *levels[1:],
        ),
    )
    result = _grade(quote, _with_qe_levels(edited, (99, "UpToDate"), (1, "OutOfDate")))
    assert result.advisory_ids == ("INTEL-SA-1", "INTEL-SA-QE1")
    assert result.qe_advisory_ids == ("INTEL-SA-QE1",)


# TD 1.5 relaunch: the v5 vector's TCB info has levels [5,0,3] UpToDate, [5,0,2] OutOfDate and
# module TDX_01 levels 6 UpToDate, 4 OutOfDate.


def _relaunch(svn: bytes, svn2: bytes) -> tdx.TcbEvaluation:
    quote, collateral = _setup(V5)
    return _grade(_with_td(quote, tee_tcb_svn=svn, tee_tcb_svn2=svn2), collateral)


def test_relaunch_advised_when_current_module_is_up_to_date() -> None:
    result = _relaunch(_svn(4, 1, 2), _svn(6, 1, 3))
    assert result.platform_status == "OutOfDate"
    assert result.module_status == "OutOfDate"
    assert result.status == "TDRelaunchAdvised"


def test_no_relaunch_when_current_module_is_still_out_of_date() -> None:
    assert _relaunch(_svn(4, 1, 2), _svn(5, 1, 3)).status == "OutOfDate"
    assert _relaunch(_svn(4, 1, 2), _svn(6, 1, 2)).status == "OutOfDate"


def test_relaunch_with_module_major_zero_in_svn2() -> None:
    assert _relaunch(_svn(4, 1, 2), _svn(5, 0, 3)).status == "TDRelaunchAdvised"
    assert _relaunch(_svn(4, 1, 2), _svn(4, 0, 3)).status == "OutOfDate"


def test_relaunch_with_configuration_needed() -> None:
    quote, collateral = _setup(V5)
    levels = collateral.tcb_info.tcb_levels
    edited = _with_info(
        collateral,
        tcb_levels=(
            levels[0],
            dataclasses.replace(levels[1], tcb_status="OutOfDateConfigurationNeeded"),
            *levels[2:],
        ),
    )
    result = _grade(_with_td(quote, tee_tcb_svn=_svn(4, 1, 2), tee_tcb_svn2=_svn(6, 1, 3)), edited)
    assert result.status == "TDRelaunchAdvisedConfigurationNeeded"


def test_no_relaunch_for_td10_reports() -> None:
    quote, collateral = _setup(V5)
    td10 = dataclasses.replace(
        _with_td(quote, tee_tcb_svn=_svn(4, 1, 2), tee_tcb_svn2=None, mr_service_td=None),
        body_type=tdx.BODY_TYPE_TD10,
    )
    assert _grade(td10, collateral).status == "OutOfDate"


def test_checks_explain_the_grade() -> None:
    quote, collateral = _setup(PHALA)
    checks = Checks()
    evaluate_tcb(quote, quote.pck_extensions, collateral, checks)
    by_name = {c.name: c for c in checks}
    assert by_name["tdx.tcb.level"].expected == "UpToDate"
    assert "TDX_01" in (by_name["tdx.tcb.module.level"].actual or "")
    assert by_name["tdx.tcb.status"].actual == "UpToDate"
    assert "QE UpToDate" in by_name["tdx.tcb.status"].detail
