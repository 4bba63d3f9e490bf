"""vTPM quotes: parse (TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE, TCG event log), verify, validate.

Collect quotes inside a guest with :mod:`attestation.tpm.device` (needs tpm2-pytss; imported
only when that module is).
"""

from attestation.tpm.eventlog import Event, EventLog, SpecIdEvent, extend, parse_event_log, replay
from attestation.tpm.parse import (
    PcrSelection,
    TpmsAttest,
    TpmtPublic,
    TpmtSignature,
    parse_attest,
    parse_public,
    parse_signature,
    signature_from_raw,
)
from attestation.tpm.policy import TpmPolicy, validate_quote
from attestation.tpm.verify import (
    AkKey,
    EventLogReplay,
    VerifiedTpmQuote,
    pcr_digest,
    public_key_der,
    same_public_key,
    verify_ak_binding,
    verify_ak_certificate,
    verify_event_log,
    verify_quote,
)

__all__ = [
    "AkKey",
    "Event",
    "EventLog",
    "EventLogReplay",
    "PcrSelection",
    "SpecIdEvent",
    "TpmPolicy",
    "TpmsAttest",
    "TpmtPublic",
    "TpmtSignature",
    "VerifiedTpmQuote",
    "extend",
    "parse_attest",
    "parse_event_log",
    "parse_public",
    "parse_signature",
    "pcr_digest",
    "public_key_der",
    "replay",
    "same_public_key",
    "signature_from_raw",
    "validate_quote",
    "verify_ak_binding",
    "verify_ak_certificate",
    "verify_event_log",
    "verify_quote",
]
