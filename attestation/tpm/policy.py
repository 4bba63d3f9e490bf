"""The ``vtpm`` section of a ``cube-policy/1`` policy, and its validation against a verified quote.

    "vtpm": {
      "pcrs": {"sha256": {"0": "<hex>", "7": ["<hex>", "<hex>"]}},
      "require_event_log": false
    }

Each pinned PCR must be in the quote and equal to the value (or one of the values) given. With
``require_event_log`` the (unsigned) event log must replay to the quote at least one quoted PCR
(a bare header replays nothing); a PCR the log has events for must replay to its quoted value
(attestation.tpm.verify). A pinned PCR the log has no events for is still checked, against the
quote: the OS extends some after the firmware's log ends (PCR 15, the agent's runtime events),
and the pin, not the unsigned log, is what binds it. An absent section pins nothing and does not
require an event log. Either asks for a vTPM quote: evidence without one is refused
(attestation.evidence), whatever ``require_tpm`` says.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Self

from attestation._checks import Checks
from attestation._json import ObjectReader, decode_hex, refuse_nulls
from attestation.errors import InvalidPolicyError, MalformedError, PolicyError
from attestation.tpm import _wire as w
from attestation.tpm.parse import MAX_PCR_SELECT
from attestation.tpm.verify import VerifiedTpmQuote

__all__ = ["TpmPolicy", "validate_quote"]

_INDEX = re.compile(r"0|[1-9][0-9]?")
_MAX_PCRS = MAX_PCR_SELECT * 8


def _empty() -> Mapping[str, Mapping[int, tuple[bytes, ...]]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class TpmPolicy:
    #: bank -> PCR index -> accepted values (any of them). Unpinned PCRs are not checked.
    pcrs: Mapping[str, Mapping[int, tuple[bytes, ...]]] = field(default_factory=_empty)
    #: Require an event log that replays to the quote (at least one quoted PCR).
    require_event_log: bool = False

    @classmethod
    def from_json(cls, obj: object) -> Self:
        refuse_nulls(obj, "policy.vtpm", InvalidPolicyError)
        r = ObjectReader(obj, what="policy.vtpm", error=InvalidPolicyError)
        raw_pcrs = r.raw("pcrs")
        require_event_log = r.boolean("require_event_log", False)
        r.finish()
        pcrs: dict[str, Mapping[int, tuple[bytes, ...]]] = {}
        if raw_pcrs is not None:
            if not isinstance(raw_pcrs, Mapping):
                raise InvalidPolicyError("policy.vtpm.pcrs: expected an object of banks")
            for bank, values in raw_pcrs.items():
                what = f"policy.vtpm.pcrs.{bank}"
                try:
                    size = w.hash_by_name(str(bank), what).size
                except MalformedError as exc:
                    raise InvalidPolicyError(exc.message) from None
                if not isinstance(values, Mapping):
                    raise InvalidPolicyError(f"{what}: expected an object of PCR index -> hex")
                bank_out: dict[int, tuple[bytes, ...]] = {}
                for key, value in values.items():
                    if (
                        not isinstance(key, str)
                        or not _INDEX.fullmatch(key)
                        or int(key) >= _MAX_PCRS
                    ):
                        raise InvalidPolicyError(f"{what}: {key!r} is not a PCR index (0..31)")
                    items = value if isinstance(value, list) else [value]
                    if not items:
                        raise InvalidPolicyError(f"{what}.{key}: empty list of accepted values")
                    bank_out[int(key)] = tuple(
                        decode_hex(v, what=f"{what}.{key}", length=size, error=InvalidPolicyError)
                        for v in items
                    )
                pcrs[str(bank)] = MappingProxyType(dict(sorted(bank_out.items())))
        return cls(pcrs=MappingProxyType(pcrs), require_event_log=require_event_log)

    def to_json(self) -> dict[str, object]:
        pcrs: dict[str, object] = {}
        for bank, values in self.pcrs.items():
            pcrs[bank] = {
                str(i): v[0].hex() if len(v) == 1 else [x.hex() for x in v]
                for i, v in values.items()
            }
        return {"pcrs": pcrs, "require_event_log": self.require_event_log}


def validate_quote(
    verified: VerifiedTpmQuote, policy: TpmPolicy, *, checks: Checks | None = None
) -> None:
    """Check a verified quote against the policy; PolicyError for anything it does not accept."""
    checks = checks if checks is not None else Checks()
    if policy.require_event_log and verified.event_log is None:
        checks.fail(
            "policy.vtpm.event_log",
            PolicyError,
            "the policy requires a vTPM event log that replays to the quoted PCRs; none was "
            "verified",
        )
    for bank, values in policy.pcrs.items():
        quoted = verified.pcrs.get(bank, {})
        for index, accepted in values.items():
            name = f"policy.vtpm.{bank}.pcr{index}"
            shown = " or ".join(v.hex() for v in accepted)
            if index not in quoted:
                checks.fail(
                    name,
                    PolicyError,
                    f"PCR {bank}:{index} is pinned by the policy but not in the quote",
                    expected=shown,
                    actual="(not quoted)",
                )
            actual = quoted[index]
            checks.require(
                any(hmac.compare_digest(actual, v) for v in accepted),
                name,
                PolicyError,
                f"PCR {bank}:{index} is {actual.hex()}, the policy accepts {shown}",
                expected=shown,
                actual=actual,
            )
    if policy.require_event_log:
        _require_replayed(verified, policy, checks)


def _require_replayed(verified: VerifiedTpmQuote, policy: TpmPolicy, checks: Checks) -> None:
    """A required event log must account for the quote: the log is not signed, and one that
    replays nothing (a bare header) must not pass for one that "replays to the quoted PCRs"."""
    del policy  # (pinned PCRs are bound by their pins; see the module's docstring)
    replayed = verified.event_log.verified if verified.event_log is not None else {}
    checks.require(
        any(replayed.values()),
        "policy.vtpm.event_log",
        PolicyError,
        "the policy requires a vTPM event log that replays to the quoted PCRs: the log "
        "replays none of the quoted PCRs",
        expected="at least one quoted PCR replayed from the log",
        actual="replayed and equal to the quote: "
        + "; ".join(f"{b} {sorted(v)}" for b, v in replayed.items()),
    )
