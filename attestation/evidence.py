"""``cube-evidence/1``: the document an agent serves and every verifier checks.

Binding (ARCHITECTURE.md): ``report_data = SHA-512(b"cube-evidence/1\\0" || nonce ||
SHA-256(claims bytes))``; a vTPM quote's qualifying data is the SHA-256 of the same input. The
verifier recomputes it from the nonce *it* chose and the claims bytes it received, then trusts
only the keys named in those claims. Nothing is re-serialised before hashing.

Verification order: document shape, platform allowed, nonce, claims, platform evidence
(signatures, chains, collateral), binding, then the policy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from attestation import snp, tdx, tpm
from attestation._checks import Check, Checks
from attestation._json import ObjectReader, decode_hex, loads_object
from attestation._x509 import pem_certificate
from attestation.azure import parse_hcl_report, verify_hcl_binding
from attestation.errors import (
    BindingError,
    CollectionError,
    MalformedError,
    PolicyError,
    SimulatedEvidenceError,
    StaleEvidenceError,
)
from attestation.guest import TeeDevice
from attestation.policy import REAL_PLATFORMS, SIMULATED_PLATFORMS, Policy
from attestation.tpm.device import TpmQuoter

if TYPE_CHECKING:
    from attestation.sim import SimulatedSnp, SimulatedTdx

__all__ = [
    "EVIDENCE_FORMAT",
    "NONCE_MAX_BYTES",
    "NONCE_MIN_BYTES",
    "Claims",
    "EvidenceCollector",
    "EvidenceDocument",
    "VerifiedEvidence",
    "binding_input",
    "certificate_window",
    "check_platform_allowed",
    "encode_claims",
    "parse_evidence",
    "parse_nonce",
    "report_data_for",
    "tpm_qualifying_data_for",
    "validate_tee",
    "verify_evidence",
    "verify_snp",
    "verify_tdx",
]

EVIDENCE_FORMAT = "cube-evidence/1"
_DOMAIN = b"cube-evidence/1\0"
NONCE_MIN_BYTES = 32
NONCE_MAX_BYTES = 64
PLATFORMS = (*REAL_PLATFORMS, *SIMULATED_PLATFORMS)


_HEX_DIGITS = re.compile(r"[0-9a-fA-F]*")


def _check_nonce_length(nonce: bytes, *, what: str) -> None:
    if not NONCE_MIN_BYTES <= len(nonce) <= NONCE_MAX_BYTES:
        raise MalformedError(
            f"{what}: must be {NONCE_MIN_BYTES} to {NONCE_MAX_BYTES} bytes, got {len(nonce)}"
        )


def _decode_nonce(value: object, *, what: str) -> bytes:
    # Hex digits only: bytes.fromhex would also take spaces, so one nonce had many spellings.
    if not isinstance(value, str) or not _HEX_DIGITS.fullmatch(value):
        raise MalformedError(f"{what}: expected a string of hex digits")
    raw = decode_hex(value, what=what)
    _check_nonce_length(raw, what=what)
    return raw


def parse_nonce(value: str) -> bytes:
    """A nonce as it travels: hex of 32 to 64 bytes."""
    return _decode_nonce(value, what="nonce")


def binding_input(nonce: bytes, claims: bytes) -> bytes:
    return _DOMAIN + nonce + hashlib.sha256(claims).digest()


def report_data_for(nonce: bytes, claims: bytes) -> bytes:
    """The 64 bytes a TEE report must carry as REPORT_DATA / REPORTDATA."""
    return hashlib.sha512(binding_input(nonce, claims)).digest()


def tpm_qualifying_data_for(nonce: bytes, claims: bytes) -> bytes:
    """The 32 bytes a vTPM quote must carry as extraData."""
    return hashlib.sha256(binding_input(nonce, claims)).digest()


def certificate_window(der: bytes) -> tuple[datetime, datetime]:
    """(not before, not after) of an agent's TLS certificate (DER). The claims bind its hash;
    its validity bounds how long the key behind it may be relied on (agents rotate it).
    Raises :class:`MalformedError` when ``der`` is not a certificate."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    # An unknown version is x509.InvalidVersion, which is not a ValueError.
    except (ValueError, x509.InvalidVersion):
        raise MalformedError("the TLS certificate is not a valid X.509 certificate") from None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def encode_claims(claims: Mapping[str, object]) -> bytes:
    """Canonical claims bytes (sorted keys, no spaces). Verifiers never re-encode: they hash
    the bytes they received."""
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256_digest(reader: ObjectReader, key: str, *, required: bool) -> str | None:
    value = reader.string(key, required=required)
    if value is None:
        return None
    if not value.startswith("sha256:"):
        raise MalformedError(f"claims.{key}: expected 'sha256:<hex>'")
    decode_hex(value[7:], what=f"claims.{key}", length=32)
    return value.lower()


@dataclass(frozen=True)
class Claims:
    """What the agent asserts about itself; bound into the TEE report by hash."""

    raw: bytes
    tls_cert_sha256: bytes
    hpke_public_key: bytes | None
    model_name: str
    model_digest: str
    config_digest: str
    agent_version: str
    issued_at: datetime
    tpm_ak_sha256: bytes | None

    @classmethod
    def parse(cls, raw: bytes) -> Claims:
        r = ObjectReader(loads_object(raw, what="claims"), what="claims")
        model = ObjectReader(r.raw("model", required=True), what="claims.model")
        model_name = model.string("name", required=True)
        model_digest = _sha256_digest(model, "digest", required=True)
        model.finish()
        issued = r.string("issued_at", required=True)
        try:
            issued_at = datetime.fromisoformat(str(issued).replace("Z", "+00:00"))
            if issued_at.tzinfo is None:
                raise MalformedError("claims.issued_at: needs a time zone")
            issued_at = issued_at.astimezone(UTC)  # (year 1 at +01:00 is before year 1 UTC)
        except (ValueError, OverflowError) as exc:
            raise MalformedError("claims.issued_at: not an ISO 8601 time") from exc
        claims = cls(
            raw=raw,
            tls_cert_sha256=r.hex("tls_cert_sha256", 32, required=True) or b"",
            hpke_public_key=r.b64("hpke_public_key"),
            model_name=str(model_name),
            model_digest=str(model_digest),
            config_digest=str(_sha256_digest(r, "config_digest", required=True)),
            agent_version=str(r.string("agent_version", required=True)),
            issued_at=issued_at,
            tpm_ak_sha256=r.hex("tpm_ak_sha256", 32),
        )
        r.finish()
        return claims

    def to_json(self) -> dict[str, object]:
        return {
            "tls_cert_sha256": self.tls_cert_sha256.hex(),
            "hpke_public_key": None
            if self.hpke_public_key is None
            else base64.b64encode(self.hpke_public_key).decode(),
            "model": {"name": self.model_name, "digest": self.model_digest},
            "config_digest": self.config_digest,
            "agent_version": self.agent_version,
            "issued_at": self.issued_at.isoformat().replace("+00:00", "Z"),
            "tpm_ak_sha256": None if self.tpm_ak_sha256 is None else self.tpm_ak_sha256.hex(),
        }


@dataclass(frozen=True)
class TpmPart:
    quote: bytes
    signature: bytes
    ak_public: bytes
    pcrs: Mapping[str, Mapping[int, bytes]]
    event_log: bytes | None


@dataclass(frozen=True)
class EvidenceDocument:
    """A parsed (not verified) ``cube-evidence/1`` document."""

    platform: str
    nonce: bytes
    claims_raw: bytes
    tee: Mapping[str, bytes]
    tpm: TpmPart | None


_TEE_KEYS = {
    "sev-snp": ("report", "vcek", "cert_chain", "crl", "hcl_report"),
    "tdx": ("quote", "collateral", "hcl_report"),
}


def _pcrs(obj: object) -> dict[str, dict[int, bytes]]:
    banks = ObjectReader(obj, what="tpm.pcrs")
    out: dict[str, dict[int, bytes]] = {}
    sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
    for bank in ("sha1", "sha256", "sha384", "sha512"):
        values = banks.raw(bank)
        if values is None:
            continue
        reader = ObjectReader(values, what=f"tpm.pcrs.{bank}")
        bank_out: dict[int, bytes] = {}
        for index in range(24):
            value = reader.hex(str(index), sizes[bank])
            if value is not None:
                bank_out[index] = value
        reader.finish()
        out[bank] = bank_out
    banks.finish()
    return out


def parse_evidence(data: bytes) -> EvidenceDocument:
    """Parse the JSON shape of an evidence document (no cryptography)."""
    r = ObjectReader(loads_object(data, what="evidence"), what="evidence")
    fmt = r.string("format", required=True)
    if fmt != EVIDENCE_FORMAT:
        raise MalformedError(f"evidence.format: expected {EVIDENCE_FORMAT!r}, got {fmt!r}")
    platform = str(r.string("platform", required=True))
    if platform not in PLATFORMS:
        raise MalformedError(
            f"evidence.platform: unknown platform {platform!r} (known: {', '.join(PLATFORMS)})"
        )
    nonce = _decode_nonce(r.raw("nonce", required=True), what="evidence.nonce")
    claims_raw = r.b64("claims", required=True) or b""
    tee: dict[str, bytes] = {}
    base = platform.removeprefix("sim-")
    if base in _TEE_KEYS:
        t = ObjectReader(r.raw("tee", required=True), what="evidence.tee")
        for key in _TEE_KEYS[base]:
            value = t.b64(key)
            if value is not None:
                tee[key] = value
        t.finish()
        needed = "report" if base == "sev-snp" else "quote"
        if needed not in tee and "hcl_report" not in tee:
            raise MalformedError(f"evidence.tee: missing {needed!r}")
        if base == "sev-snp" and "report" in tee and "hcl_report" in tee:
            # The HCL report carries the SNP report: a second one would go unverified.
            raise MalformedError("evidence.tee: give 'report' or 'hcl_report', not both")
        if base == "sev-snp" and "vcek" not in tee:
            raise MalformedError("evidence.tee: missing 'vcek'")
    elif r.raw("tee") is not None:
        raise MalformedError(f"evidence.tee: not expected for platform {platform!r}")
    tpm_part = None
    if "tpm" in r:
        t = ObjectReader(r.raw("tpm"), what="evidence.tpm")
        tpm_part = TpmPart(
            quote=t.b64("quote", required=True) or b"",
            signature=t.b64("signature", required=True) or b"",
            ak_public=t.b64("ak_public", required=True) or b"",
            pcrs=_pcrs(t.raw("pcrs", required=True)),
            event_log=t.b64("event_log"),
        )
        t.finish()
    elif platform == "vtpm":
        raise MalformedError("evidence.tpm: required for platform 'vtpm'")
    r.finish()
    return EvidenceDocument(platform, nonce, claims_raw, tee, tpm_part)


TeeResult = snp.VerifiedSnpReport | tdx.VerifiedTdxQuote


@dataclass(frozen=True)
class VerifiedEvidence:
    """Evidence that verified and satisfied the policy."""

    platform: str
    nonce: bytes
    claims: Claims
    tee: TeeResult | None
    tpm: tpm.VerifiedTpmQuote | None
    checks: tuple[Check, ...]

    @property
    def simulated(self) -> bool:
        return self.platform in SIMULATED_PLATFORMS

    @property
    def digest(self) -> str:
        """Identifies this evidence in audit records: SHA-256 over nonce and claims."""
        return "sha256:" + hashlib.sha256(binding_input(self.nonce, self.claims.raw)).hexdigest()

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.tee is not None:
            out.update(self.tee.fields())
        out["claims"] = self.claims.to_json()
        return out


def check_platform_allowed(platform: str, policy: Policy, *, checks: Checks) -> None:
    """Refuse simulated evidence unless the policy allows it, and platforms it does not list."""
    if platform in SIMULATED_PLATFORMS:
        checks.require(
            policy.allow_simulated,
            "policy.platform",
            SimulatedEvidenceError,
            f"evidence is SIMULATED ({platform}) and the policy does not allow simulated "
            "evidence (allow_simulated / --allow-simulated)",
            expected="a real TEE platform",
            actual=platform,
        )
    checks.require(
        policy.lists_platform(platform),
        "policy.platform",
        PolicyError,
        f"platform {platform!r} is not accepted by the policy",
        expected=", ".join(sorted(policy.platforms)),
        actual=platform,
    )


def verify_snp(
    report: bytes,
    *,
    vcek: bytes,
    cert_chain: bytes | None = None,
    crl: bytes | None = None,
    simulated: bool = False,
    now: datetime,
    checks: Checks,
) -> snp.VerifiedSnpReport:
    """Verify an SNP report against AMD's roots (or, when ``simulated``, the simulator's)."""
    return snp.verify_report(
        snp.parse_report(report),
        vcek=vcek,
        cert_chain=cert_chain,
        crl=crl,
        now=now,
        roots=_sim_snp().trust_roots() if simulated else snp.DEFAULT_TRUST_ROOTS,
        checks=checks,
    )


def verify_tdx(
    quote: bytes,
    *,
    collateral: tdx.Collateral | None,
    simulated: bool = False,
    now: datetime,
    checks: Checks,
) -> tdx.VerifiedTdxQuote:
    """Verify a TDX quote against Intel's root (or, when ``simulated``, the simulator's)."""
    if simulated and collateral is None:
        collateral = _sim_tdx().collateral()
    return tdx.verify_quote(
        tdx.parse_quote(quote),
        collateral=collateral,
        now=now,
        root=_sim_tdx().root_certificate() if simulated else None,
        checks=checks,
    )


def validate_tee(policy: Policy, result: TeeResult, *, checks: Checks) -> None:
    """The policy's platform section and revoked measurements, against a verified report."""
    if isinstance(result, snp.VerifiedSnpReport):
        measurement = result.report.measurement
        snp.validate_report(result, policy.sev_snp, checks=checks)
    else:
        measurement = result.quote.mr_td
        tdx.validate_quote(result, policy.tdx, checks=checks)
    checks.require(
        measurement not in policy.revoked_measurements,
        "policy.revoked_measurements",
        PolicyError,
        f"measurement {measurement.hex()} is revoked by the policy",
        actual=measurement,
    )


def _verify_tee(
    doc: EvidenceDocument,
    expected_report_data: bytes,
    *,
    now: datetime,
    checks: Checks,
) -> tuple[TeeResult | None, bytes | None]:
    """Verify the TEE part. Returns the result and, for Azure, the HCL-bound AK (SPKI DER)."""
    simulated = doc.platform in SIMULATED_PLATFORMS
    base = doc.platform.removeprefix("sim-")
    hcl = parse_hcl_report(doc.tee["hcl_report"]) if "hcl_report" in doc.tee else None
    if hcl is not None:
        checks.equal(
            "evidence.hcl.platform",
            base,
            hcl.platform,
            BindingError,
            "HCL report platform differs from the evidence platform",
        )
    result: TeeResult
    if base == "sev-snp":
        result = verify_snp(
            hcl.tee_report if hcl is not None else doc.tee["report"],
            vcek=doc.tee["vcek"],
            cert_chain=doc.tee.get("cert_chain"),
            crl=doc.tee.get("crl"),
            simulated=simulated,
            now=now,
            checks=checks,
        )
        report_data = result.report.report_data
    elif base == "tdx":
        if "quote" not in doc.tee:
            raise MalformedError("evidence.tee: missing 'quote'")
        result = verify_tdx(
            doc.tee["quote"],
            collateral=tdx.Collateral.from_json(doc.tee["collateral"])
            if "collateral" in doc.tee
            else None,
            simulated=simulated,
            now=now,
            checks=checks,
        )
        report_data = result.quote.report_data
    else:
        return None, None
    if hcl is not None:
        # Azure: the HCL owns REPORT_DATA; it commits to the runtime data holding the vTPM AK,
        # and our binding rides on the vTPM quote made with that AK.
        verify_hcl_binding(hcl, report_data, checks=checks)
        return result, tpm.public_key_der(hcl.ak_public)
    checks.require(
        hmac.compare_digest(report_data, expected_report_data),
        "evidence.binding.report_data",
        BindingError,
        "REPORT_DATA does not commit to this nonce and these claims",
        expected=expected_report_data,
        actual=report_data,
    )
    return result, None


def _sim_snp() -> SimulatedSnp:
    from attestation.sim import SimulatedSnp

    return SimulatedSnp()


def _sim_tdx() -> SimulatedTdx:
    from attestation.sim import SimulatedTdx

    return SimulatedTdx()


def verify_evidence(
    data: bytes | EvidenceDocument,
    *,
    nonce: bytes,
    policy: Policy,
    now: datetime,
    checks: Checks | None = None,
) -> VerifiedEvidence:
    """Verify a ``cube-evidence/1`` document against the nonce you chose and a policy."""
    checks = checks if checks is not None else Checks()
    # A short nonce would make freshness guessable: refuse it whoever chose it.
    _check_nonce_length(nonce, what="nonce")
    doc = data if isinstance(data, EvidenceDocument) else parse_evidence(data)
    checks.ok("evidence.format", expected=EVIDENCE_FORMAT, actual=EVIDENCE_FORMAT)

    check_platform_allowed(doc.platform, policy, checks=checks)
    checks.require(
        hmac.compare_digest(doc.nonce, nonce),
        "evidence.nonce",
        BindingError,
        "evidence answers a different nonce than the one sent",
        expected=nonce,
        actual=doc.nonce,
    )
    claims = Claims.parse(doc.claims_raw)
    checks.ok("evidence.claims", detail=f"claims SHA-256 {hashlib.sha256(claims.raw).hexdigest()}")

    tee_result, hcl_ak = _verify_tee(
        doc, report_data_for(nonce, claims.raw), now=now, checks=checks
    )

    tpm_result = None
    # The ``tpm`` member is not covered by REPORT_DATA: whoever relays the document can delete
    # it. So whatever asks for a quote (the policy's require_tpm, a PCR pin or a required event
    # log, Azure's HCL binding, a vTPM-only platform) requires it, never "check it if present".
    needs_tpm = _why_tpm_needed(policy, doc.platform, hcl_ak)
    if needs_tpm:
        checks.require(
            doc.tpm is not None,
            "evidence.tpm.present",
            PolicyError if doc.tpm is None and hcl_ak is None else BindingError,
            f"a vTPM quote is required ({needs_tpm}) but the evidence has none",
        )
    if doc.tpm is not None:
        tpm_result = _verify_tpm(doc.tpm, claims, nonce, hcl_ak, checks=checks)

    _validate(policy, doc.platform, claims, tee_result, tpm_result, now=now, checks=checks)
    return VerifiedEvidence(doc.platform, doc.nonce, claims, tee_result, tpm_result, checks.items)


def _why_tpm_needed(policy: Policy, platform: str, hcl_ak: bytes | None) -> str:
    """Why this evidence must carry a vTPM quote ("" when it need not)."""
    reasons = []
    if policy.require_tpm:
        reasons.append("policy.require_tpm")
    if any(policy.vtpm.pcrs.values()):
        reasons.append("policy.vtpm.pcrs pins PCRs")
    if policy.vtpm.require_event_log:
        reasons.append("policy.vtpm.require_event_log")
    if hcl_ak is not None:
        reasons.append("the Azure HCL report binds the evidence through the vTPM AK")
    if platform == "vtpm":
        reasons.append("platform 'vtpm'")
    return "; ".join(reasons)


def _verify_tpm(
    part: TpmPart,
    claims: Claims,
    nonce: bytes,
    hcl_ak: bytes | None,
    *,
    checks: Checks,
) -> tpm.VerifiedTpmQuote:
    ak = tpm.parse_public(part.ak_public)
    ak_hash = hashlib.sha256(part.ak_public).digest()
    if hcl_ak is not None:
        checks.require(
            tpm.public_key_der(ak.public_key()) == hcl_ak,
            "evidence.tpm.ak_bound_to_tee",
            BindingError,
            "the vTPM AK is not the one the TEE report commits to (HCL runtime data)",
        )
    else:
        checks.require(
            claims.tpm_ak_sha256 is not None and hmac.compare_digest(claims.tpm_ak_sha256, ak_hash),
            "evidence.tpm.ak_bound_to_claims",
            BindingError,
            "the vTPM AK is not the one named in the claims",
            expected=claims.tpm_ak_sha256,
            actual=ak_hash,
        )
    return tpm.verify_quote(
        attest=part.quote,
        signature=part.signature,
        ak=ak,
        pcrs=part.pcrs,
        qualifying_data=tpm_qualifying_data_for(nonce, claims.raw),
        event_log=part.event_log,
        checks=checks,
    )


def _validate(
    policy: Policy,
    platform: str,
    claims: Claims,
    tee_result: TeeResult | None,
    tpm_result: tpm.VerifiedTpmQuote | None,
    *,
    now: datetime,
    checks: Checks,
) -> None:
    age = now - claims.issued_at
    checks.require(
        age <= timedelta(seconds=policy.max_evidence_age_seconds),
        "policy.evidence_age",
        StaleEvidenceError,
        f"evidence issued {int(age.total_seconds())} s ago; the policy allows "
        f"{policy.max_evidence_age_seconds} s",
        expected=f"<= {policy.max_evidence_age_seconds} s",
        actual=f"{int(age.total_seconds())} s",
    )
    checks.require(
        -age <= timedelta(seconds=policy.max_clock_skew_seconds),
        "policy.evidence_not_future",
        StaleEvidenceError,
        f"evidence claims to be issued in the future ({claims.issued_at.isoformat()})",
    )
    for name, allowed, actual in (
        ("model_digest", policy.model_digests, claims.model_digest),
        ("config_digest", policy.config_digests, claims.config_digest),
        ("agent_version", policy.agent_versions, claims.agent_version),
    ):
        if allowed is None:
            continue
        checks.require(
            actual in allowed,
            f"policy.{name}",
            PolicyError,
            f"{name} {actual} is not one the policy accepts",
            expected=" | ".join(sorted(allowed)),
            actual=actual,
        )
    if tee_result is not None:
        validate_tee(policy, tee_result, checks=checks)
    if tpm_result is not None:
        tpm.validate_quote(tpm_result, policy.vtpm, checks=checks)
    checks.ok("policy.platform", actual=platform)


# --- guest side -------------------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class EvidenceCollector:
    """Builds ``cube-evidence/1`` documents inside the guest.

    One document at a time (configfs-tsm allows one report at a time; a TPM session is not
    shared): :meth:`collect` is serialised by a lock and blocking; :meth:`acollect` runs it off
    the event loop.
    """

    def __init__(
        self,
        *,
        tee: TeeDevice | None,
        tpm_quoter: TpmQuoter | None = None,
        tpm_selection: Mapping[str, Sequence[int]] | None = None,
        tdx_collateral: bytes | None = None,
    ) -> None:
        if tee is None and tpm_quoter is None:
            raise CollectionError("no TEE and no vTPM: nothing can produce evidence")
        self._tee = tee
        self._tpm = tpm_quoter
        self._tpm_selection = tpm_selection or {"sha256": tuple(range(24))}
        self._tdx_collateral = tdx_collateral
        self._lock = threading.Lock()

    @property
    def platform(self) -> str:
        return self._tee.platform if self._tee is not None else "vtpm"

    def tpm_ak_sha256(self) -> bytes | None:
        """The value the claims must carry as ``tpm_ak_sha256`` (None without a vTPM)."""
        if self._tpm is None:
            return None
        with self._lock:
            return hashlib.sha256(self._tpm.ak_public()).digest()

    def collect(self, nonce: bytes, claims: bytes) -> bytes:
        """Produce the evidence document for ``nonce`` and these exact claims bytes."""
        if not NONCE_MIN_BYTES <= len(nonce) <= NONCE_MAX_BYTES:
            raise MalformedError(f"nonce must be {NONCE_MIN_BYTES} to {NONCE_MAX_BYTES} bytes")
        doc: dict[str, object] = {
            "format": EVIDENCE_FORMAT,
            "platform": self.platform,
            "nonce": nonce.hex(),
            "claims": b64(claims),
        }
        with self._lock:
            if self._tee is not None:
                got = self._tee.get_evidence(report_data_for(nonce, claims))
                tee: dict[str, str] = {}
                if got.kind == "snp-report":
                    vcek = got.endorsement_key
                    if vcek is None:
                        raise CollectionError(
                            "the host supplied no VCEK/VLEK with the SNP report; configure the "
                            "host's certificate table (snphost / SNP_SET_EXT_CONFIG)"
                        )
                    tee["report"] = b64(got.report)
                    tee["vcek"] = b64(vcek)
                    chain = [got.certificates[k] for k in ("ask", "ark") if k in got.certificates]
                    if len(chain) == 2:
                        tee["cert_chain"] = b64(b"".join(pem_certificate(c) for c in chain))
                    if "crl" in got.certificates:
                        tee["crl"] = b64(got.certificates["crl"])
                elif got.kind == "tdx-quote":
                    tee["quote"] = b64(got.report)
                    if self._tdx_collateral is not None:
                        tee["collateral"] = b64(self._tdx_collateral)
                else:
                    raise CollectionError(
                        f"{got.kind} cannot be verified remotely; a TDX quote needs configfs-tsm"
                    )
                doc["tee"] = tee
            if self._tpm is not None:
                ev = self._tpm.quote(tpm_qualifying_data_for(nonce, claims), self._tpm_selection)
                tpm_doc: dict[str, object] = {
                    "quote": b64(ev.attest),
                    "signature": b64(ev.signature),
                    "ak_public": b64(ev.ak_public),
                    "pcrs": {
                        bank: {str(i): v.hex() for i, v in sorted(values.items())}
                        for bank, values in ev.pcrs.items()
                    },
                }
                if ev.event_log is not None:
                    tpm_doc["event_log"] = b64(ev.event_log)
                doc["tpm"] = tpm_doc
        return json.dumps(doc, sort_keys=True).encode()

    async def acollect(self, nonce: bytes, claims: bytes) -> bytes:
        return await asyncio.to_thread(self.collect, nonce, claims)
