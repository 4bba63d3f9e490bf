"""What ``cube attest verify`` and ``cube attest show`` do, apart from argument handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from attestation import snp, tdx
from attestation._checks import Checks
from attestation._json import decode_hex
from attestation._x509 import load_certificates, pem_certificate
from attestation.azure import parse_hcl_report, verify_hcl_binding
from attestation.cli import Inputs, Outcome
from attestation.errors import AttestationError, BindingError, MalformedError
from attestation.evidence import (
    Claims,
    EvidenceDocument,
    check_platform_allowed,
    parse_evidence,
    parse_nonce,
    validate_tee,
    verify_evidence,
    verify_snp,
    verify_tdx,
)
from attestation.policy import Policy, load_policy


def _policy(
    path: Path | None,
    *,
    accept_tcb_status: tuple[str, ...],
    allow_simulated: bool,
    has_collateral: bool,
    outcome: Outcome,
) -> Policy:
    if path is not None:
        policy = load_policy(path)
    else:
        policy = Policy()
        if not has_collateral:
            # Offline verification of a bare quote: the user gave no collateral to judge the
            # TCB with. Say so loudly instead of pretending the TCB was evaluated.
            policy = dataclasses.replace(
                policy, tdx=dataclasses.replace(policy.tdx, require_collateral=False)
            )
    if accept_tcb_status:
        policy = dataclasses.replace(
            policy,
            tdx=tdx.TdxPolicy.from_json(
                {**policy.tdx.to_json(), "accepted_tcb_statuses": list(accept_tcb_status)}
            ),
        )
    if allow_simulated:
        policy = policy.with_simulated()
    return policy


def _collateral(inp: Inputs) -> tdx.Collateral | None:
    if inp.collateral is not None:
        return tdx.Collateral.from_json(inp.collateral)
    if inp.tcb_info is not None and inp.qe_identity is not None:
        return tdx.Collateral.from_pcs(
            inp.tcb_info, inp.qe_identity, pck_crl=inp.pck_crl, root_crl=inp.root_crl
        )
    return None


def _snp_report_bytes(inp: Inputs, checks: Checks | None) -> tuple[bytes, bytes | None]:
    """The SNP report, from --report or out of an Azure HCL report (and its runtime data)."""
    if inp.hcl_report is not None:
        hcl = parse_hcl_report(inp.hcl_report)
        return hcl.tee_report, inp.hcl_report
    assert inp.report is not None
    return inp.report, None


def _split_vcek_bundle(vcek: bytes, cert_chain: bytes | None) -> tuple[bytes, bytes | None]:
    """--vcek may be a PEM bundle "VCEK, ASK, ARK" (as Azure serves it): split it."""
    certs = load_certificates(vcek)
    if len(certs) == 1:
        return vcek, cert_chain
    if cert_chain is not None:
        raise MalformedError("--vcek holds several certificates and --cert-chain was given too")
    return certs[0].der, b"".join(pem_certificate(c.der) for c in certs[1:])


def run_verify(
    inp: Inputs,
    *,
    mode: str,
    now: datetime,
    policy_path: Path | None,
    accept_tcb_status: tuple[str, ...],
    allow_simulated: bool,
    checks: Checks,
    outcome: Outcome,
) -> None:
    has_collateral = inp.collateral is not None or inp.tcb_info is not None
    policy = _policy(
        policy_path,
        accept_tcb_status=accept_tcb_status,
        allow_simulated=allow_simulated,
        has_collateral=has_collateral or mode != "tdx",
        outcome=outcome,
    )
    if mode == "evidence":
        assert inp.evidence is not None and inp.nonce is not None
        nonce = parse_nonce(inp.nonce)
        doc = parse_evidence(inp.evidence)
        outcome.platform = doc.platform
        # As in raw mode: a rejected document still shows what it says (what parses of it).
        outcome.fields = _document_fields(doc, lenient=True)
        if policy_path is None:
            # (cube verify refuses this outright; here it may be a first look at a document.)
            outcome.notes.append(
                "no --policy: the default policy pins no measurement, model or configuration, "
                "so any genuine, fresh evidence is accepted"
            )
        verified = verify_evidence(doc, nonce=nonce, policy=policy, now=now, checks=checks)
        outcome.fields = verified.fields()
        return

    simulated = mode.startswith("sim-")
    check_platform_allowed(mode, policy, checks=checks)
    result: snp.VerifiedSnpReport | tdx.VerifiedTdxQuote
    if mode.removeprefix("sim-") == "sev-snp":
        report, hcl_bytes = _snp_report_bytes(inp, checks)
        outcome.fields = snp.parse_report(report).fields()
        assert inp.vcek is not None
        vcek, cert_chain = _split_vcek_bundle(inp.vcek, inp.cert_chain)
        result = verify_snp(
            report,
            vcek=vcek,
            cert_chain=cert_chain,
            crl=inp.crl,
            simulated=simulated,
            now=now,
            checks=checks,
        )
        if hcl_bytes is not None:
            hcl = parse_hcl_report(hcl_bytes)
            verify_hcl_binding(hcl, result.report.report_data, checks=checks)
            outcome.notes.append(
                "Azure HCL report: REPORT_DATA commits to the HCL runtime data (vTPM AK "
                f"{hcl.runtime_data_digest().hex()[:16]}...); verify the vTPM quote for freshness"
            )
    else:
        assert inp.quote is not None
        outcome.fields = tdx.parse_quote(inp.quote).fields()
        result = verify_tdx(
            inp.quote, collateral=_collateral(inp), simulated=simulated, now=now, checks=checks
        )
        if inp.hcl_report is not None:
            # Azure TDX: the quote's REPORTDATA commits to the HCL runtime data (vTPM AK).
            hcl = parse_hcl_report(inp.hcl_report)
            checks.equal(
                "evidence.hcl.platform", "tdx", hcl.platform, BindingError, "HCL report platform"
            )
            verify_hcl_binding(hcl, result.quote.report_data, checks=checks)
            outcome.notes.append(
                "Azure HCL report: REPORTDATA commits to the HCL runtime data (vTPM AK "
                f"{hcl.runtime_data_digest().hex()[:16]}...); verify the vTPM quote for freshness"
            )
        if result.tcb_status is None:
            outcome.notes.append(
                "no collateral given: signatures and the PCK chain were verified, the TCB status "
                "was NOT evaluated (pass --collateral or --tcb-info/--qe-identity)"
            )
    outcome.fields = result.fields()
    validate_tee(policy, result, checks=checks)


def _document_fields(doc: EvidenceDocument, *, lenient: bool) -> dict[str, object]:
    """The fields of an evidence document, parsed but not verified. ``lenient``: leave out a
    part that does not parse (verification then says why), instead of raising."""
    fields: dict[str, object] = {"nonce": doc.nonce.hex()}
    parts: list[Callable[[], dict[str, object]]] = []
    if "report" in doc.tee:
        parts.append(lambda: snp.parse_report(doc.tee["report"]).fields())
    elif "hcl_report" in doc.tee and doc.platform.removeprefix("sim-") == "sev-snp":
        hcl = doc.tee["hcl_report"]  # Azure: the SNP report rides in the HCL report
        parts.append(lambda: snp.parse_report(parse_hcl_report(hcl).tee_report).fields())
    if "quote" in doc.tee:
        parts.append(lambda: tdx.parse_quote(doc.tee["quote"]).fields())
    parts.append(lambda: {"claims": Claims.parse(doc.claims_raw).to_json()})
    for part in parts:
        try:
            fields.update(part())
        except AttestationError:
            if not lenient:
                raise
    return fields


def run_show(inp: Inputs, *, mode: str, outcome: Outcome) -> None:
    if mode == "evidence":
        assert inp.evidence is not None
        doc = parse_evidence(inp.evidence)
        outcome.platform = doc.platform
        outcome.fields = _document_fields(doc, lenient=False)
        return
    if mode.removeprefix("sim-") == "sev-snp":
        report, hcl_bytes = _snp_report_bytes(inp, None)
        outcome.fields = snp.parse_report(report).fields()
        if hcl_bytes is not None:
            outcome.fields["hcl"] = parse_hcl_report(hcl_bytes).fields()
    else:
        assert inp.quote is not None
        outcome.fields = tdx.parse_quote(inp.quote).fields()
        if inp.hcl_report is not None:
            outcome.fields["hcl"] = parse_hcl_report(inp.hcl_report).fields()


def run_simulate(
    *,
    platform: str,
    nonce: str,
    out: Path,
    policy_out: Path | None,
    measurement: str | None,
    model_digest: str,
    config_digest: str,
    outcome: Outcome,
) -> None:
    import hashlib
    import json
    from datetime import UTC

    from attestation.evidence import EvidenceCollector, encode_claims
    from attestation.guest import ConfigfsTsm
    from attestation.sim import EmulatedConfigfsTsm

    raw_nonce = parse_nonce(nonce)
    measured = (
        decode_hex(measurement, what="--measurement", length=48)
        if measurement is not None
        else hashlib.sha384(b"cube-simulator measurement").digest()
    )
    emulation = (
        EmulatedConfigfsTsm.snp(measurement=measured)
        if platform == "sim-sev-snp"
        else EmulatedConfigfsTsm.tdx(mr_td=measured)
    )
    claims = encode_claims(
        {
            "tls_cert_sha256": hashlib.sha256(b"simulated agent certificate").hexdigest(),
            "model": {"name": "simulated-model", "digest": model_digest},
            "config_digest": config_digest,
            "agent_version": _version(),
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
    )
    Claims.parse(claims)  # refuse malformed digests before writing anything
    document = EvidenceCollector(tee=ConfigfsTsm(fs=emulation)).collect(raw_nonce, claims)
    out.write_bytes(document)
    outcome.notes.append(f"wrote SIMULATED {platform} evidence to {out}")
    if policy_out is not None:
        section = (
            {"sev_snp": {"measurements": [measured.hex()]}}
            if platform == "sim-sev-snp"
            else {"tdx": {"mr_td": [measured.hex()]}}
        )
        policy = {
            "format": "cube-policy/1",
            "description": "pins a SIMULATED guest: for development only",
            "allow_simulated": True,
            "model_digests": [model_digest],
            "config_digests": [config_digest],
            **section,
        }
        Policy.from_json(policy)
        policy_out.write_text(json.dumps(policy, indent=2) + "\n")
        outcome.notes.append(f"wrote a policy for it to {policy_out}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cube")
    except PackageNotFoundError:
        return "0+unknown"
