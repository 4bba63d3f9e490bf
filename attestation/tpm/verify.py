"""Verify vTPM quotes: the AK's signature, the qualifying data, the PCR digest, the event log.

A TPM2_Quote signs a TPMS_ATTEST with the attestation key (AK). The verifier checks that

* the signature over the attest bytes verifies with the AK (RSASSA-PKCS1-v1_5, RSA-PSS, ECDSA),
* extraData equals the qualifying data it expects (its nonce binding),
* the PCR values it was handed are exactly the selection and hash, with the signing scheme's
  hash (also for SHA-1/SHA-384 banks), to the signed pcrDigest,
* optionally, that a TCG event log replays to the quoted values of the PCRs it extends.

Who the AK is must be settled by the caller: the TEE report (Azure HCL runtime data, see
:func:`verify_ak_binding`), an AK certificate (GCE, :func:`verify_ak_certificate`) or claims.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attestation import _x509
from attestation._checks import Checks
from attestation.errors import BindingError, MalformedError, SignatureError, VerificationError
from attestation.tpm import _wire as w
from attestation.tpm.eventlog import EventLog, parse_event_log, replay
from attestation.tpm.parse import (
    EccSignature,
    RsaSignature,
    TpmsAttest,
    TpmtPublic,
    TpmtSignature,
    parse_attest,
    parse_signature,
)

__all__ = [
    "AkKey",
    "EventLogReplay",
    "VerifiedTpmQuote",
    "pcr_digest",
    "public_key_der",
    "same_public_key",
    "verify_ak_binding",
    "verify_ak_certificate",
    "verify_event_log",
    "verify_quote",
]

#: What may stand for an attestation key: its TPMT_PUBLIC, or a bare public key (Azure HCL JWK,
#: trustee's SPKI), in which case the key's TPM attributes cannot be checked.
AkKey: TypeAlias = TpmtPublic | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _key_of(ak: AkKey) -> PublicKey:
    if isinstance(ak, TpmtPublic):
        return ak.public_key()
    if isinstance(ak, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return ak
    raise MalformedError(f"AK: expected a TpmtPublic or an RSA/EC public key, got {type(ak)}")


def public_key_der(key: AkKey) -> bytes:
    """The key's DER SubjectPublicKeyInfo (a canonical form to compare or hash keys by)."""
    return _key_of(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def same_public_key(a: AkKey, b: AkKey) -> bool:
    """Whether two keys are the same public key (whatever form each is given in)."""
    return hmac.compare_digest(public_key_der(a), public_key_der(b))


def verify_ak_binding(
    ak: AkKey, expected: AkKey, *, checks: Checks | None = None, label: str = "tpm.ak_binding"
) -> None:
    """Require that the AK is the key the TEE report (or another trusted source) commits to.

    Raises BindingError otherwise, e.g. when a quote is signed by some other TPM's AK.
    """
    checks = checks if checks is not None else Checks()
    actual = hashlib.sha256(public_key_der(ak)).digest()
    wanted = hashlib.sha256(public_key_der(expected)).digest()
    checks.require(
        hmac.compare_digest(actual, wanted),
        label,
        BindingError,
        "the AK that signed the quote is not the AK the TEE report commits to",
        expected=f"SPKI sha256 {wanted.hex()}",
        actual=f"SPKI sha256 {actual.hex()}",
    )


def verify_ak_certificate(
    ak: AkKey,
    certificate: bytes | _x509.Certificate,
    *,
    intermediates: Sequence[bytes | _x509.Certificate] = (),
    root: bytes | _x509.Certificate,
    now: datetime,
    checks: Checks | None = None,
    label: str = "tpm.ak_cert",
) -> _x509.Certificate:
    """Verify an AK certificate chain up to ``root`` (e.g. Google's vTPM EK/AK root) and that
    the certificate's key is the AK. Returns the AK certificate."""
    checks = checks if checks is not None else Checks()

    def load(c: bytes | _x509.Certificate) -> _x509.Certificate:
        return c if isinstance(c, _x509.Certificate) else _x509.load_certificate(c)

    leaf = load(certificate)
    anchor = load(root)
    _x509.verify_chain(
        [leaf, *map(load, intermediates)], anchor, now=now, checks=checks, label=label
    )
    cert_key = leaf.public_key()
    checks.require(
        isinstance(cert_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        and same_public_key(ak, cert_key),
        f"{label}.key",
        BindingError,
        "the AK certificate certifies a different key than the AK",
    )
    return leaf


def pcr_digest(
    selection: TpmsAttest, pcrs: Mapping[str, Mapping[int, bytes]], hash_alg: str
) -> bytes:
    """H_hash(concatenation of the selected PCR values in selection order): the quote's pcrDigest.

    ``pcrs`` must hold every selected PCR (KeyError otherwise; :func:`verify_quote` checks that
    first and raises a VerificationError).
    """
    alg = w.hash_by_name(hash_alg, "PCR digest hash")
    data = b"".join(pcrs[s.bank][i] for s in selection.pcr_select for i in s.pcrs)
    return alg.digest(data)


@dataclass(frozen=True)
class EventLogReplay:
    """An event log replayed against quoted PCRs."""

    log: EventLog
    #: Replayed value of every PCR the log extends, per bank.
    replayed: Mapping[str, Mapping[int, bytes]]
    #: Per bank, the PCRs the log extends AND whose replay equals the quoted value.
    verified: Mapping[str, frozenset[int]]

    def fields(self) -> dict[str, object]:
        return {
            **self.log.fields(),
            "verified_pcrs": {b: sorted(p) for b, p in self.verified.items()},
        }


@dataclass(frozen=True)
class VerifiedTpmQuote:
    """A quote whose signature, qualifying data and PCR digest verified."""

    attest: TpmsAttest
    signature: TpmtSignature
    #: The AK's TPMT_PUBLIC when the caller had it (None for a bare public key).
    ak: TpmtPublic | None
    ak_key: PublicKey = field(compare=False)
    #: The quoted PCR values per bank (exactly the selection), now bound to the signature.
    pcrs: Mapping[str, Mapping[int, bytes]]
    #: False when the caller passed qualifying_data=None (binding left to the caller).
    qualifying_data_checked: bool
    event_log: EventLogReplay | None = None

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "attest": self.attest.fields(),
            "sig_alg": self.signature.scheme,
            "sig_hash": self.signature.hash,
            "signature_verified": True,
            "pcr_digest_matches": True,
            "qualifying_data_checked": self.qualifying_data_checked,
            "ak_spki_sha256": _sha256(public_key_der(self.ak_key)).hex(),
            "pcrs": {
                b: {str(i): v.hex() for i, v in vals.items()} for b, vals in self.pcrs.items()
            },
        }
        if self.ak is not None:
            out["ak_name"] = self.ak.name().hex()
            out["ak"] = self.ak.fields()
        if self.event_log is not None:
            out["event_log"] = self.event_log.fields()
        return out


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _verify_signature(key: PublicKey, sig: TpmtSignature, message: bytes, checks: Checks) -> None:
    name = "tpm.signature"
    alg = w.hash_by_id(sig.hash_alg, "signature hash")
    try:
        chosen = alg.crypto_hash()
    except MalformedError as exc:
        checks.fail(name, SignatureError, exc.message, actual=sig.hash)
    what = f"quote signature ({sig.scheme}-{sig.hash})"
    try:
        if isinstance(key, rsa.RSAPublicKey) and isinstance(sig.value, RsaSignature):
            if sig.sig_alg == w.ALG_RSASSA:
                key.verify(sig.value.signature, message, padding.PKCS1v15(), chosen)
            elif sig.sig_alg == w.ALG_RSAPSS:
                # TPMs use a salt as long as the digest or the maximum; accept either.
                pss = padding.PSS(mgf=padding.MGF1(chosen), salt_length=padding.PSS.AUTO)
                key.verify(sig.value.signature, message, pss, chosen)
            else:
                checks.fail(name, SignatureError, f"{what}: not an RSA signature scheme")
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(sig.value, EccSignature):
            key.verify(sig.value.der(), message, ec.ECDSA(chosen))
        else:
            kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else "EC"
            checks.fail(
                name, SignatureError, f"{what} cannot come from an {kind} AK", actual=sig.scheme
            )
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        checks.fail(name, SignatureError, f"{what} does not verify with the AK")
    checks.ok(name, detail=f"{what} verifies with the AK")


def _check_ak(ak: TpmtPublic, sig: TpmtSignature, checks: Checks) -> None:
    # Only a restricted signing key refuses to sign data that starts with TPM_GENERATED_VALUE;
    # an unrestricted key could sign a forged TPMS_ATTEST.
    checks.require(
        ak.is_restricted and ak.is_signing,
        "tpm.ak.attributes",
        VerificationError,
        "the AK is not a restricted signing key, so its 'quotes' may be forged",
        expected="restricted, sign",
        actual=", ".join(ak.attribute_names()),
    )
    if ak.scheme != w.ALG_NULL:
        expected = f"{w.alg_name(ak.scheme)}-{w.alg_name(ak.scheme_hash or w.ALG_NULL)}"
        actual = f"{sig.scheme}-{sig.hash}"
        checks.require(
            (ak.scheme, ak.scheme_hash) == (sig.sig_alg, sig.hash_alg),
            "tpm.ak.scheme",
            SignatureError,
            f"the signature scheme {actual} is not the AK's scheme {expected}",
            expected=expected,
            actual=actual,
        )


def _check_pcr_values(
    attest: TpmsAttest, pcrs: Mapping[str, Mapping[int, bytes]], checks: Checks
) -> dict[str, dict[int, bytes]]:
    selection = attest.selection()
    if not isinstance(pcrs, Mapping) or not all(isinstance(b, str) for b in pcrs):
        raise MalformedError("PCR values: expected a mapping of bank name -> {index: value}")
    extra_banks = sorted(set(pcrs) - set(selection))
    checks.require(
        not extra_banks,
        "tpm.pcr_selection.banks",
        VerificationError,
        "PCR values given for bank(s) the quote does not select: "
        + ", ".join(map(str, extra_banks)),
        expected=", ".join(selection) or "(none)",
        actual=", ".join(map(str, pcrs)),
    )
    out: dict[str, dict[int, bytes]] = {}
    for bank, wanted in selection.items():
        size = w.hash_by_name(bank, "PCR bank").size
        given = pcrs.get(bank, {})
        if not isinstance(given, Mapping) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in given
        ):
            raise MalformedError(f"PCR values for {bank}: expected a mapping of index -> value")
        given_set = sorted(given)
        checks.require(
            given_set == sorted(wanted),
            f"tpm.pcr_selection.{bank}",
            VerificationError,
            f"the {bank} PCR values given are not exactly the quoted selection",
            expected=",".join(map(str, wanted)),
            actual=",".join(map(str, given_set)),
        )
        bank_out: dict[int, bytes] = {}
        for index in wanted:
            value = given[index]
            if not isinstance(value, bytes | bytearray) or len(value) != size:
                raise MalformedError(f"PCR {bank}:{index}: expected {size} bytes")
            bank_out[index] = bytes(value)
        out[bank] = bank_out
    return out


def verify_quote(
    *,
    attest: bytes | TpmsAttest,
    signature: bytes | TpmtSignature,
    ak: AkKey,
    pcrs: Mapping[str, Mapping[int, bytes]],
    qualifying_data: bytes | None,
    event_log: bytes | EventLog | None = None,
    checks: Checks | None = None,
) -> VerifiedTpmQuote:
    """Verify one TPM2_Quote.

    ``signature`` is a marshalled TPMT_SIGNATURE, or a :class:`TpmtSignature` (use
    :func:`~attestation.tpm.parse.signature_from_raw` for bare signature bytes as Azure's JSON
    carries them). ``pcrs`` maps bank name ("sha256") to {PCR index: value} and must hold
    exactly the quoted selection. ``qualifying_data`` is compared with extraData (None: not
    checked here; the caller binds the quote some other way). ``event_log``, when given, is
    replayed and every PCR it extends must equal the quoted value.
    """
    checks = checks if checks is not None else Checks()
    if qualifying_data is not None and not isinstance(qualifying_data, bytes | bytearray):
        raise MalformedError("qualifying data: expected bytes or None")
    parsed = attest if isinstance(attest, TpmsAttest) else parse_attest(attest)
    sig = signature if isinstance(signature, TpmtSignature) else parse_signature(signature)
    checks.ok("tpm.attest.magic", expected="0xff544347", actual=f"0x{parsed.magic:08x}")
    checks.ok("tpm.attest.type", expected="0x8018 (quote)", actual=f"0x{parsed.type:04x}")
    key = _key_of(ak)
    if isinstance(ak, TpmtPublic):
        _check_ak(ak, sig, checks)
    else:
        checks.ok(
            "tpm.ak.attributes",
            detail="AK given as a bare public key: TPM attributes "
            "not available, its binding is the caller's",
        )
    _verify_signature(key, sig, parsed.raw, checks)

    if qualifying_data is None:
        checks.ok(
            "tpm.extra_data",
            actual=parsed.extra_data,
            detail="no qualifying data expected by the caller: not checked",
        )
    else:
        checks.require(
            hmac.compare_digest(parsed.extra_data, bytes(qualifying_data)),
            "tpm.extra_data",
            BindingError,
            "quote extraData is not the expected qualifying data (stale or replayed quote?)",
            expected=bytes(qualifying_data),
            actual=parsed.extra_data,
        )

    values = _check_pcr_values(parsed, pcrs, checks)
    computed = pcr_digest(parsed, values, sig.hash)
    checks.require(
        hmac.compare_digest(computed, parsed.pcr_digest),
        "tpm.pcr_digest",
        VerificationError,
        f"the PCR values given do not hash ({sig.hash}) to the quoted pcrDigest",
        expected=parsed.pcr_digest,
        actual=computed,
    )
    frozen = MappingProxyType({b: MappingProxyType(v) for b, v in values.items()})
    replayed = None
    if event_log is not None:
        replayed = verify_event_log(event_log, frozen, checks=checks)
    return VerifiedTpmQuote(
        attest=parsed,
        signature=sig,
        ak=ak if isinstance(ak, TpmtPublic) else None,
        ak_key=key,
        pcrs=frozen,
        qualifying_data_checked=qualifying_data is not None,
        event_log=replayed,
    )


def verify_event_log(
    log: bytes | EventLog,
    pcrs: Mapping[str, Mapping[int, bytes]],
    *,
    checks: Checks | None = None,
) -> EventLogReplay:
    """Replay ``log`` and require every PCR it extends to equal the quoted value in ``pcrs``.

    ``pcrs`` must be PCR values already bound to a verified quote (``VerifiedTpmQuote.pcrs``).
    Banks the quote and log share are compared; PCRs the log extends but the quote does not
    select are left unverified (not in ``verified``). A log sharing no bank with the quote
    cannot vouch for anything and is refused.
    """
    checks = checks if checks is not None else Checks()
    parsed = log if isinstance(log, EventLog) else parse_event_log(log)
    replayed = replay(parsed)
    common = [b for b in pcrs if b in replayed]
    checks.require(
        bool(common),
        "tpm.event_log.banks",
        VerificationError,
        "the event log shares no PCR bank with the quote",
        expected=", ".join(pcrs),
        actual=", ".join(replayed),
    )
    verified: dict[str, frozenset[int]] = {}
    for bank in common:
        quoted = pcrs[bank]
        matched: set[int] = set()
        for index, value in sorted(replayed[bank].items()):
            if index not in quoted:
                continue
            checks.require(
                hmac.compare_digest(value, quoted[index]),
                f"tpm.event_log.{bank}.pcr{index}",
                VerificationError,
                f"PCR {bank}:{index}: the event log replays to {value.hex()}, "
                f"the quote has {quoted[index].hex()}",
                expected=quoted[index],
                actual=value,
            )
            matched.add(index)
        verified[bank] = frozenset(matched)
        unquoted = sorted(set(replayed[bank]) - set(quoted))
        not_in_log = sorted(set(quoted) - set(replayed[bank]))
        checks.ok(
            f"tpm.event_log.{bank}",
            actual=",".join(map(str, sorted(matched))),
            detail=f"{len(parsed.events)} events; PCRs replayed and equal to the quote: "
            f"{sorted(matched)}; extended but not quoted: {unquoted}; quoted but not in the "
            f"log: {not_in_log}",
        )
    return EventLogReplay(
        parsed,
        MappingProxyType({b: MappingProxyType(v) for b, v in replayed.items()}),
        MappingProxyType(verified),
    )
