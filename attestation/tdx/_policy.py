"""The ``tdx`` section of ``cube-policy/1`` and the validation of verified quotes against it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

from attestation._checks import Checks
from attestation._json import ObjectReader, refuse_nulls
from attestation.errors import InvalidPolicyError, PolicyError, TcbStatusError
from attestation.tdx._tcb import ACCEPTABLE_TCB_STATUSES
from attestation.tdx._verify import VerifiedTdxQuote

__all__ = ["TdxPolicy", "validate_quote"]

#: TD report fields a policy may pin to a list of accepted 48-byte values.
MEASUREMENT_FIELDS = (
    "mr_td",
    "mr_seam",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
)


@dataclass(frozen=True)
class TdxPolicy:
    """What a verifier accepts from a TDX quote. ``TdxPolicy()`` is the strict default.

    Measurement lists left as None are not checked; ``td_attributes`` and ``xfam`` must match
    exactly when given. Only ``UpToDate`` is accepted unless ``accepted_tcb_statuses`` says
    otherwise; ``Revoked`` and ``TcbNotSupported`` can never be accepted.
    """

    mr_td: tuple[bytes, ...] | None = None
    mr_seam: tuple[bytes, ...] | None = None
    rtmr0: tuple[bytes, ...] | None = None
    rtmr1: tuple[bytes, ...] | None = None
    rtmr2: tuple[bytes, ...] | None = None
    rtmr3: tuple[bytes, ...] | None = None
    mr_config_id: tuple[bytes, ...] | None = None
    mr_owner: tuple[bytes, ...] | None = None
    mr_owner_config: tuple[bytes, ...] | None = None
    td_attributes: bytes | None = None
    xfam: bytes | None = None
    allow_debug: bool = False
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    require_collateral: bool = True
    #: Intel advisories (INTEL-SA-xxxxx) refused whatever the TCB status.
    rejected_advisory_ids: tuple[str, ...] = ()
    #: TD 1.5: accept a TD bound to a service TD (non-zero MR_SERVICE_TD).
    allow_service_td: bool = False
    #: Require TD_ATTRIBUTES.SEPT_VE_DISABLE (bit 28), as Linux guests should set it.
    require_sept_ve_disable: bool = False

    def __post_init__(self) -> None:
        for status in self.accepted_tcb_statuses:
            if status not in ACCEPTABLE_TCB_STATUSES:
                raise InvalidPolicyError(
                    f"tdx.accepted_tcb_statuses: {status!r} cannot be accepted (allowed: "
                    f"{', '.join(ACCEPTABLE_TCB_STATUSES)})"
                )
        if not self.accepted_tcb_statuses:
            raise InvalidPolicyError("tdx.accepted_tcb_statuses: must not be empty")
        for name in ("td_attributes", "xfam"):
            value = getattr(self, name)
            if value is not None and len(value) != 8:
                raise InvalidPolicyError(f"tdx.{name}: must be 8 bytes")
        for name in MEASUREMENT_FIELDS:
            values = getattr(self, name)
            if values is not None and any(len(v) != 48 for v in values):
                raise InvalidPolicyError(f"tdx.{name}: values must be 48 bytes")

    @classmethod
    def from_json(cls, obj: object) -> Self:
        refuse_nulls(obj, "policy.tdx", InvalidPolicyError)
        r = ObjectReader(obj, what="policy.tdx", error=InvalidPolicyError)
        default = cls()
        statuses = r.strings("accepted_tcb_statuses")
        advisories = r.strings("rejected_advisory_ids")
        policy = cls(
            mr_td=r.hex_list("mr_td", 48),
            mr_seam=r.hex_list("mr_seam", 48),
            rtmr0=r.hex_list("rtmr0", 48),
            rtmr1=r.hex_list("rtmr1", 48),
            rtmr2=r.hex_list("rtmr2", 48),
            rtmr3=r.hex_list("rtmr3", 48),
            mr_config_id=r.hex_list("mr_config_id", 48),
            mr_owner=r.hex_list("mr_owner", 48),
            mr_owner_config=r.hex_list("mr_owner_config", 48),
            td_attributes=r.hex("td_attributes", 8),
            xfam=r.hex("xfam", 8),
            allow_debug=r.boolean("allow_debug", default.allow_debug),
            accepted_tcb_statuses=(
                default.accepted_tcb_statuses if statuses is None else tuple(statuses)
            ),
            require_collateral=r.boolean("require_collateral", default.require_collateral),
            rejected_advisory_ids=() if advisories is None else tuple(advisories),
            allow_service_td=r.boolean("allow_service_td", default.allow_service_td),
            require_sept_ve_disable=r.boolean(
                "require_sept_ve_disable", default.require_sept_ve_disable
            ),
        )
        r.finish()
        return policy

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in MEASUREMENT_FIELDS:
                out[f.name] = [v.hex() for v in value]
            elif isinstance(value, bytes):
                out[f.name] = value.hex()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out


def validate_quote(
    verified: VerifiedTdxQuote, policy: TdxPolicy, *, checks: Checks | None = None
) -> None:
    """Raise :class:`PolicyError` (or :class:`TcbStatusError`) unless ``policy`` accepts it."""
    checks = Checks() if checks is None else checks
    td = verified.quote.td_report

    status = verified.tcb_status
    if status is None:
        checks.require(
            not policy.require_collateral,
            "tdx.policy.collateral",
            PolicyError,
            "the policy requires Intel collateral (TCB info, QE identity) and none was given, "
            "so the platform's TCB status is unknown",
            expected="collateral",
            actual="none",
        )
    else:
        advisories = ", ".join(verified.advisory_ids) or "none"
        checks.require(
            status in policy.accepted_tcb_statuses,
            "tdx.policy.tcb_status",
            TcbStatusError,
            f"TDX TCB status {status} is not accepted by the policy "
            f"(accepted: {', '.join(policy.accepted_tcb_statuses)}; advisories: {advisories})",
            expected=", ".join(policy.accepted_tcb_statuses),
            actual=status,
        )
        rejected = [a for a in verified.advisory_ids if a in policy.rejected_advisory_ids]
        checks.require(
            not rejected,
            "tdx.policy.advisories",
            TcbStatusError,
            f"the platform is affected by rejected advisories: {', '.join(rejected)}",
            expected=f"none of {', '.join(policy.rejected_advisory_ids) or 'none'}",
            actual=advisories,
        )

    checks.require(
        policy.allow_debug or not td.debug,
        "tdx.policy.debug",
        PolicyError,
        "the TD is a DEBUG TD (TD_ATTRIBUTES bit 0): the host can read its memory",
        expected="debug off" if not policy.allow_debug else "any",
        actual="debug on" if td.debug else "debug off",
    )
    checks.require(
        not policy.require_sept_ve_disable or td.sept_ve_disable,
        "tdx.policy.sept_ve_disable",
        PolicyError,
        "TD_ATTRIBUTES.SEPT_VE_DISABLE is not set",
        expected=True if policy.require_sept_ve_disable else "any",
        actual=td.sept_ve_disable,
    )
    for name in MEASUREMENT_FIELDS:
        accepted: tuple[bytes, ...] | None = getattr(policy, name)
        actual: bytes = getattr(td, name)
        if accepted is None:
            continue
        checks.require(
            actual in accepted,
            f"tdx.policy.{name}",
            PolicyError,
            f"{name.upper()} {actual.hex()} is not one of the {len(accepted)} accepted value(s)",
            expected=" | ".join(v.hex() for v in accepted),
            actual=actual,
        )
    for name in ("td_attributes", "xfam"):
        wanted: bytes | None = getattr(policy, name)
        if wanted is not None:
            checks.equal(f"tdx.policy.{name}", wanted, getattr(td, name), PolicyError, name.upper())
    if td.mr_service_td is not None:
        checks.require(
            policy.allow_service_td or not any(td.mr_service_td),
            "tdx.policy.service_td",
            PolicyError,
            "the TD is bound to a service TD (MR_SERVICE_TD is not zero) and the policy does "
            "not allow that",
            expected="zero",
            actual=td.mr_service_td,
        )
