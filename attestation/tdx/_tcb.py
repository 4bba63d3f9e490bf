"""TCB status of a TDX platform from verified collateral (Intel TDX DCAP, as Intel's QVL does it).

1. The PCK certificate's FMSPC and PCE-ID must be the TCB info's.
2. TCB levels, highest first (Intel's order: SGX components, then PCESVN, then TDX components):
   the first level whose SGX components (comp01..16 of the PCK certificate) and PCESVN are all
   >= the level's, and whose TDX components (TEE_TCB_SVN of the TD report) are all >= the
   level's, gives the platform status. When the TDX module major version (TEE_TCB_SVN[1]) is not
   0, components 0 and 1 belong to the module and are graded by the TCB info's
   ``tdxModuleIdentities["TDX_<major>"]`` with ISVSVN = TEE_TCB_SVN[0] instead. No level ->
   ``TcbNotSupported``.
3. The module identity (base ``tdxModule`` for major 0) must match MRSIGNER_SEAM and, under its
   mask, SEAM_ATTRIBUTES.
4. The QE report must match the QE identity (MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES under
   their masks); its ISVSVN picks the QE level.
5. Statuses converge as in Intel's QVL: an ``OutOfDate`` module or QE turns UpToDate /
   SWHardeningNeeded into OutOfDate and the Configuration statuses into
   OutOfDateConfigurationNeeded; ``Revoked`` anywhere is Revoked; for TD 1.5 reports a TD launched
   on an out-of-date module whose current module (TEE_TCB_SVN2) is up to date is
   ``TDRelaunchAdvised`` (or ``TDRelaunchAdvisedConfigurationNeeded``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime

from attestation._checks import Checks
from attestation.errors import CollateralError
from attestation.tdx._collateral import (
    Collateral,
    IsvTcbLevel,
    TcbLevel,
    TdxModuleIdentity,
)
from attestation.tdx._pck import PckExtensions
from attestation.tdx._quote import BODY_TYPE_TD15, TdxQuote
from attestation.tdx._util import format_time

__all__ = [
    "ACCEPTABLE_TCB_STATUSES",
    "TCB_NOT_SUPPORTED",
    "TcbEvaluation",
    "evaluate_tcb",
]

TCB_NOT_SUPPORTED = "TcbNotSupported"
TD_RELAUNCH_ADVISED = "TDRelaunchAdvised"
TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED = "TDRelaunchAdvisedConfigurationNeeded"
#: Every final status a policy may accept (never Revoked, never TcbNotSupported).
ACCEPTABLE_TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    TD_RELAUNCH_ADVISED,
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED,
)
_CONFIGURATION_NEEDED = (
    "ConfigurationNeeded",
    "OutOfDateConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED,
)


@dataclass(frozen=True)
class TcbEvaluation:
    """How the TCB status was reached, level by level."""

    #: The final status (platform, module and QE converged).
    status: str
    #: Advisory IDs of every level that contributed, in order, without duplicates.
    advisory_ids: tuple[str, ...]
    #: Status of the matched TCB info level (``TcbNotSupported`` when none matched).
    platform_status: str
    platform_tcb_date: datetime | None
    platform_advisory_ids: tuple[str, ...]
    #: "TDX_01", ... when the module is graded by a module identity; None for major version 0.
    module_identity: str | None
    module_status: str | None
    module_advisory_ids: tuple[str, ...]
    qe_status: str
    qe_tcb_date: datetime | None
    qe_advisory_ids: tuple[str, ...]
    tcb_evaluation_data_number: int

    def fields(self) -> dict[str, object]:
        """In the test-vector manifest's representation (``tcb_status``, ``qe_identity_status``)."""
        platform: dict[str, object] = {
            "fmspc_matches": True,
            "pceid_matches": True,
            "platform_status": self.platform_status,
            "advisory_ids": list(self.advisory_ids),
            "status": self.status,
            "module_mrsigner_matches": True,
            "module_attributes_match": True,
        }
        if self.platform_tcb_date is not None:
            platform["platform_tcb_date"] = format_time(self.platform_tcb_date)
        if self.module_identity is not None:
            platform["module_identity"] = self.module_identity
        if self.module_status is not None:
            platform["module_status"] = self.module_status
        qe: dict[str, object] = {
            "mrsigner_matches": True,
            "isvprodid_matches": True,
            "miscselect_matches": True,
            "attributes_match": True,
            "status": self.qe_status,
            "advisory_ids": list(self.qe_advisory_ids),
        }
        return {
            "tcb_status": platform,
            "qe_identity_status": qe,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
        }


def _masked_equal(actual: bytes, expected: bytes, mask: bytes) -> bool:
    return len(actual) == len(expected) == len(mask) and all(
        a & m == e & m for a, e, m in zip(actual, expected, mask, strict=True)
    )


def _level_key(level: TcbLevel) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    return (level.sgx_components, level.pcesvn, level.tdx_components)


def _at_least(actual: tuple[int, ...] | bytes, required: tuple[int, ...], start: int = 0) -> bool:
    return all(actual[i] >= required[i] for i in range(start, len(required)))


def _first_isv_level(levels: tuple[IsvTcbLevel, ...], isvsvn: int) -> IsvTcbLevel | None:
    # Intel orders these by ISVSVN, highest first; sort so the JSON order cannot matter.
    for level in sorted(levels, key=lambda lv: lv.isvsvn, reverse=True):
        if isvsvn >= level.isvsvn:
            return level
    return None


def _converge(status: str, component: str | None) -> str:
    """Intel QVL convergeTcbStatusWith{TdxModule,Qe}Status: only OutOfDate/Revoked matter."""
    if component == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    if component == "Revoked":
        return "Revoked"
    if component == TCB_NOT_SUPPORTED:
        return TCB_NOT_SUPPORTED
    return status


def _merge_ids(*groups: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        out.extend(i for i in group if i not in out)
    return tuple(out)


def _check_qe(quote: TdxQuote, collateral: Collateral, checks: Checks) -> IsvTcbLevel | None:
    qe = quote.qe_report
    identity = collateral.qe_identity
    checks.equal(
        "tdx.qe_identity.mrsigner",
        identity.mrsigner,
        qe.mr_signer,
        CollateralError,
        "QE report MRSIGNER is not the QE identity's",
    )
    checks.equal(
        "tdx.qe_identity.isvprodid",
        identity.isvprodid,
        qe.isv_prod_id,
        CollateralError,
        "QE report ISVPRODID is not the QE identity's",
    )
    misc = struct.pack("<I", qe.misc_select)
    checks.require(
        _masked_equal(misc, identity.miscselect, identity.miscselect_mask),
        "tdx.qe_identity.miscselect",
        CollateralError,
        f"QE report MISCSELECT {misc.hex()} does not match {identity.miscselect.hex()} under "
        f"mask {identity.miscselect_mask.hex()}",
        expected=f"{identity.miscselect.hex()} & {identity.miscselect_mask.hex()}",
        actual=misc,
    )
    checks.require(
        _masked_equal(qe.attributes, identity.attributes, identity.attributes_mask),
        "tdx.qe_identity.attributes",
        CollateralError,
        f"QE report ATTRIBUTES {qe.attributes.hex()} do not match {identity.attributes.hex()} "
        f"under mask {identity.attributes_mask.hex()}",
        expected=f"{identity.attributes.hex()} & {identity.attributes_mask.hex()}",
        actual=qe.attributes,
    )
    level = _first_isv_level(identity.tcb_levels, qe.isv_svn)
    checks.ok(
        "tdx.qe_identity.tcb_level",
        actual=f"isvsvn {qe.isv_svn}",
        expected=level.tcb_status if level is not None else TCB_NOT_SUPPORTED,
        detail=(
            f"QE ISVSVN {qe.isv_svn} >= level {level.isvsvn}: {level.tcb_status}"
            if level is not None
            else f"QE ISVSVN {qe.isv_svn} is below every QE identity level"
        ),
    )
    return level


def _module_identity(
    quote: TdxQuote, collateral: Collateral, checks: Checks
) -> TdxModuleIdentity | None:
    """Check MRSIGNER_SEAM / SEAM_ATTRIBUTES; return the module identity for major > 0."""
    td = quote.td_report
    info = collateral.tcb_info
    identity: TdxModuleIdentity | None = None
    if td.module_major == 0:
        mrsigner, attributes, mask = (
            info.tdx_module.mrsigner,
            info.tdx_module.attributes,
            info.tdx_module.attributes_mask,
        )
        what = "tdxModule"
    else:
        wanted = f"TDX_{td.module_major:02X}"
        identity = next((m for m in info.tdx_module_identities if m.id == wanted), None)
        checks.require(
            identity is not None,
            "tdx.tcb.module.identity",
            CollateralError,
            f"TCB info has no TDX module identity {wanted} for module major version "
            f"{td.module_major}",
            expected=wanted,
            actual=", ".join(m.id for m in info.tdx_module_identities) or "none",
        )
        assert identity is not None
        mrsigner = identity.mrsigner
        attributes, mask = identity.attributes, identity.attributes_mask
        what = identity.id
    checks.equal(
        "tdx.tcb.module.mrsigner",
        mrsigner,
        td.mr_signer_seam,
        CollateralError,
        f"MRSIGNER_SEAM is not the TDX module signer of {what}",
    )
    checks.require(
        _masked_equal(td.seam_attributes, attributes, mask),
        "tdx.tcb.module.attributes",
        CollateralError,
        f"SEAM_ATTRIBUTES {td.seam_attributes.hex()} do not match {what} "
        f"({attributes.hex()} under mask {mask.hex()})",
        expected=f"{attributes.hex()} & {mask.hex()}",
        actual=td.seam_attributes,
    )
    return identity


def _check_for_relaunch(
    quote: TdxQuote,
    *,
    collateral: Collateral,
    levels: list[TcbLevel],
    sgx_status: str,
    tdx_status: str,
    module_status: str | None,
    qe_status: str,
) -> str:
    """Intel QVL checkForRelaunch (TD 1.5): launched out of date, current module up to date."""
    svn2 = quote.td_report.tee_tcb_svn2
    if svn2 is None or qe_status in ("OutOfDate", "Revoked", TCB_NOT_SUPPORTED):
        return tdx_status
    if sgx_status not in (
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
    ):
        return tdx_status
    if tdx_status not in ("OutOfDate", "OutOfDateConfigurationNeeded"):
        return tdx_status
    if module_status != "OutOfDate":
        return tdx_status
    latest = levels[0]
    if svn2[1] == 0:
        current_ok = svn2[0] >= latest.tdx_components[0] and svn2[2] >= latest.tdx_components[2]
    else:
        wanted = f"TDX_{svn2[1]:02X}"
        identity = next(
            (m for m in collateral.tcb_info.tdx_module_identities if m.id == wanted), None
        )
        if identity is None:
            raise CollateralError(
                f"TCB info has no TDX module identity {wanted} for TEE_TCB_SVN2",
                check="tdx.tcb.relaunch",
            )
        latest_module = max(identity.tcb_levels, key=lambda lv: lv.isvsvn)
        current_ok = svn2[0] >= latest_module.isvsvn and svn2[2] >= latest.tdx_components[2]
    if not current_ok:
        return tdx_status
    if sgx_status in _CONFIGURATION_NEEDED or tdx_status in _CONFIGURATION_NEEDED:
        return TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED
    return TD_RELAUNCH_ADVISED


def evaluate_tcb(
    quote: TdxQuote, pck: PckExtensions, collateral: Collateral, checks: Checks
) -> TcbEvaluation:
    """Grade the platform, TDX module and QE against verified collateral.

    Mismatches between the quote and the collateral (FMSPC, PCE-ID, QE identity, module signer)
    raise :class:`CollateralError`; a TCB below every level is the status ``TcbNotSupported``.
    """
    info = collateral.tcb_info
    td = quote.td_report
    checks.equal(
        "tdx.tcb.fmspc", info.fmspc, pck.fmspc, CollateralError,
        "TCB info is for another platform (FMSPC)",
    )  # fmt: skip
    checks.equal(
        "tdx.tcb.pce_id", info.pce_id, pck.pce_id, CollateralError,
        "TCB info is for another PCE (PCE-ID)",
    )  # fmt: skip
    qe_level = _check_qe(quote, collateral, checks)
    qe_status = qe_level.tcb_status if qe_level is not None else TCB_NOT_SUPPORTED
    qe_ids = qe_level.advisory_ids if qe_level is not None else ()
    identity = _module_identity(quote, collateral, checks)

    levels = sorted(info.tcb_levels, key=_level_key, reverse=True)
    skip = 2 if td.module_major > 0 else 0
    sgx_level: TcbLevel | None = None
    tdx_level: TcbLevel | None = None
    for level in levels:
        if pck.tcb.pcesvn >= level.pcesvn and _at_least(pck.tcb.components, level.sgx_components):
            sgx_level = sgx_level or level
            if _at_least(td.tee_tcb_svn, level.tdx_components, skip):
                tdx_level = level
                break

    module_level: IsvTcbLevel | None = None
    module_status: str | None = None
    if identity is not None:
        module_level = _first_isv_level(identity.tcb_levels, td.module_svn)
        module_status = module_level.tcb_status if module_level else TCB_NOT_SUPPORTED
        checks.ok(
            "tdx.tcb.module.level",
            expected=module_status,
            actual=f"{identity.id} isvsvn {td.module_svn}",
            detail=(
                f"module ISVSVN {td.module_svn} >= level {module_level.isvsvn}: {module_status}"
                if module_level
                else f"module ISVSVN {td.module_svn} is below every {identity.id} level"
            ),
        )
    module_ids = module_level.advisory_ids if module_level else ()

    if tdx_level is None or sgx_level is None:
        platform_status = TCB_NOT_SUPPORTED
        status = TCB_NOT_SUPPORTED
        checks.ok(
            "tdx.tcb.level",
            expected="a TCB level at or below the platform",
            actual=TCB_NOT_SUPPORTED,
            detail=(
                f"PCK TCB {list(pck.tcb.components)} pcesvn {pck.tcb.pcesvn}, TEE_TCB_SVN "
                f"{td.tee_tcb_svn.hex()}: below every level of TCB info for FMSPC "
                f"{info.fmspc.hex()}"
            ),
        )
        platform_ids: tuple[str, ...] = ()
    else:
        platform_status = tdx_level.tcb_status
        platform_ids = tdx_level.advisory_ids
        checks.ok(
            "tdx.tcb.level",
            expected=platform_status,
            actual=f"tcbDate {format_time(tdx_level.tcb_date)}",
            detail=(
                f"PCK TCB {list(pck.tcb.components)} pcesvn {pck.tcb.pcesvn}, TEE_TCB_SVN "
                f"{td.tee_tcb_svn.hex()} >= level of {format_time(tdx_level.tcb_date)}: "
                f"{platform_status}"
            ),
        )
        status = _converge(platform_status, module_status)
        if status not in ("Revoked", TCB_NOT_SUPPORTED):
            if quote.body_type == BODY_TYPE_TD15:
                status = _check_for_relaunch(
                    quote,
                    collateral=collateral,
                    levels=levels,
                    sgx_status=sgx_level.tcb_status,
                    tdx_status=status,
                    module_status=module_status,
                    qe_status=qe_status,
                )
            status = _converge(status, qe_status)
    advisory_ids = _merge_ids(platform_ids, module_ids, qe_ids)
    checks.ok(
        "tdx.tcb.status",
        actual=status,
        detail=(
            f"platform {platform_status}, module {module_status or 'n/a'}, QE {qe_status}"
            + (f"; advisories {', '.join(advisory_ids)}" if advisory_ids else "")
        ),
    )
    return TcbEvaluation(
        status=status,
        advisory_ids=advisory_ids,
        platform_status=platform_status,
        platform_tcb_date=tdx_level.tcb_date if tdx_level is not None else None,
        platform_advisory_ids=platform_ids,
        module_identity=identity.id if identity is not None else None,
        module_status=module_status,
        module_advisory_ids=module_ids,
        qe_status=qe_status,
        qe_tcb_date=qe_level.tcb_date if qe_level is not None else None,
        qe_advisory_ids=qe_ids,
        tcb_evaluation_data_number=min(
            info.tcb_evaluation_data_number,
            collateral.qe_identity.tcb_evaluation_data_number,
        ),
    )
