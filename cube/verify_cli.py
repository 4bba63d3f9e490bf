"""``cube verify URL``: fetch an agent's evidence with a fresh nonce, verify it, print a report.

``URL`` is an agent (``https://host:8443``) or a proxy domain (``https://proxy/{domain}``). The
fetch, the verification and the TLS binding are :func:`cube_client.verify_endpoint`'s; this module
turns its result, or its error, into a report a person can read (or ``--json``) and an exit code.

Exit codes are those of ``cube attest verify`` plus one::

    0 accept   2 usage   3 malformed   4 signature/binding (a certificate that is not the
    attested one included)   5 policy (the message names the field)   6 stale   7 unreachable

Every flag is also read from ``CUBE_VERIFY_<FLAG>`` (``CUBE_VERIFY_POLICY``, ...); the credential
for a proxy domain from ``CUBE_VERIFY_API_KEY`` or ``CUBE_API_KEY``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from attestation._checks import Check, Checks
from attestation.cli import Outcome, echo_checks
from attestation.errors import AttestationError, InvalidPolicyError, MalformedError
from attestation.policy import Policy, load_policy

if TYPE_CHECKING:
    from cube_client import AttestedEndpoint

__all__ = ["EXIT_UNREACHABLE", "load_reference", "reference_source", "ssl_context", "verify"]

#: The endpoint could not be reached or did not answer with evidence (no verdict at all).
EXIT_UNREACHABLE = 7
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def load_reference(path: Path) -> Policy:
    """A ``cube-policy/1`` file, or a release's reference document that carries one under
    ``"policy"`` (``cube measure`` writes the policy beside its measurements)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict) and "format" not in document:
        embedded = document.get("policy")
        if isinstance(embedded, dict):
            return Policy.from_json(embedded)
    if isinstance(document, dict) and document.get("format") == "cube-measurements/1":
        raise InvalidPolicyError(
            f"{path} is a cube-measurements/1 document (what was measured and how); give the "
            "cube-policy/1 that `cube measure` writes beside it (its --out)"
        )
    return load_policy(raw)


@dataclass
class Report:
    """What ``cube verify`` found: the attestation outcome plus the connection's facts."""

    url: str
    via_proxy: bool
    policy_source: str
    #: None: the policy could not be loaded (nothing was judged against any policy).
    policy: Policy | None
    outcome: Outcome
    endpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def judged_by(self) -> Policy:
        """The policy, for showing its reference values (an empty one when none loaded)."""
        return self.policy if self.policy is not None else Policy()

    def to_json(self) -> dict[str, Any]:
        out = {"url": self.url, "via_proxy": self.via_proxy, **self.outcome.to_json()}
        out["simulated"] = self.outcome.platform.startswith("sim-")
        # None: the policy could not be loaded (nothing was judged against a default).
        out["policy"] = (
            None if self.policy is None else {"source": self.policy_source, **self.policy.to_json()}
        )
        out["endpoint"] = self.endpoint
        return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _endpoint_facts(found: AttestedEndpoint) -> dict[str, Any]:
    claims = found.evidence.claims
    age = (found.verified_at - claims.issued_at).total_seconds()
    return {
        "nonce": found.nonce.hex(),
        "peer_cert_sha256": hashlib.sha256(found.peer_cert_der).hexdigest()
        if found.peer_cert_der
        else None,
        "attested_cert_sha256": claims.tls_cert_sha256.hex(),
        "tls_bound": found.tls_bound,
        "hpke_public_key": base64.b64encode(found.hpke_public_key).decode(),
        "issued_at": _iso(claims.issued_at),
        "verified_at": _iso(found.verified_at),
        "expires_at": _iso(found.expires_at),
        "age_seconds": round(age, 1),
        "evidence_digest": found.evidence.digest,
    }


def reference_source(policy_path: Path | None, reference_path: Path | None) -> Path:
    """The one file of reference values given (``--policy`` or ``--reference``)."""
    if policy_path is not None and reference_path is not None:
        raise click.UsageError("give --policy or --reference, not both")
    source = policy_path or reference_path
    if source is None:
        raise click.UsageError(
            "give --policy FILE (or --reference FILE): verifying without reference values "
            "would accept anything genuine"
        )
    return source


def ssl_context(ca: Path | None) -> ssl.SSLContext | None:
    """``--ca``: the CA bundle a proxy's TLS certificate is verified with (None: the system's)."""
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"--ca {ca}: not a usable CA bundle ({exc})") from exc


def _platform_seen(checks: Iterable[Check]) -> str | None:
    """The evidence's platform when verification stopped early (the platform check records it),
    so a rejected SIMULATED endpoint is still labelled as such."""
    for check in checks:
        if check.name == "policy.platform" and check.actual:
            return check.actual
    return None


def _exit_code(error: AttestationError | None) -> int:
    # cube_client.ClientError (unreachable, no verdict) carries its own code: EXIT_UNREACHABLE.
    return 0 if error is None else error.exit_code


# -- the human report ------------------------------------------------------------------------------
# Everything the endpoint or its evidence supplied (error messages, claims, check values) goes
# through _shown: a server must not be able to move the cursor or paint a line of the report.


def _shown(value: object) -> str:
    from cube_client._text import printable

    return printable(str(value))


def _line(label: str, value: str) -> None:
    click.echo(f"  {label:<12} {_shown(value)}")


def _shown_check(check: Check) -> Check:
    return replace(
        check,
        name=_shown(check.name),
        detail=_shown(check.detail),
        expected=None if check.expected is None else _shown(check.expected),
        actual=None if check.actual is None else _shown(check.actual),
    )


def _hexes(values: Iterable[bytes] | None) -> str:
    if values is None:
        return "(not pinned by the policy)"
    shown = [v.hex() for v in values]
    return " | ".join(shown) if shown else "(none accepted)"


def _digests(values: frozenset[str] | None) -> str:
    return "(not pinned by the policy)" if values is None else " | ".join(sorted(values))


def _check_mark(checks: Iterable[Check], name: str) -> str:
    found = [c for c in checks if c.name == name]
    if not found:
        return ""
    return "  ✓" if all(c.passed for c in found) else "  ✗"


def _measured(report: Report, fields: dict[str, Any]) -> None:
    """What was measured, and the reference values it was compared against."""
    policy = report.judged_by
    checks = list(report.outcome.checks)
    platform = report.outcome.platform.removeprefix("sim-")
    if "measurement" in fields:
        _line("measured", f"SEV-SNP MEASUREMENT {fields['measurement']}")
        _line("reference", _hexes(policy.sev_snp.measurements))
        tcb = fields.get("reported_tcb")
        _line("TCB", f"reported {json.dumps(tcb) if tcb is not None else '?'}")
        minimum = policy.sev_snp.min_tcb.items()
        _line("", "policy minimum " + (", ".join(f"{n}>={v}" for n, v in minimum) or "(none)"))
    elif "mr_td" in fields:
        _line("measured", f"TDX MRTD {fields['mr_td']}")
        _line("reference", _hexes(policy.tdx.mr_td))
        for rtmr in ("rtmr0", "rtmr1", "rtmr2", "rtmr3"):
            if rtmr in fields:
                _line("", f"{rtmr.upper()} {fields[rtmr]}")
        _line("TCB", f"status {fields.get('tcb_status', '(not evaluated)')}")
    elif platform != "vtpm":
        _line("measured", "(no TEE report in the evidence)")
    tpm = fields.get("tpm")
    if isinstance(tpm, dict) and isinstance(tpm.get("pcrs"), dict):
        pinned = policy.vtpm.pcrs
        for bank, values in tpm["pcrs"].items():
            for index, value in values.items():
                want = pinned.get(bank, {}).get(int(index))
                if want is not None:
                    ok = value in (w.hex() for w in want)
                    _line("", f"PCR {bank}:{index} {value} {'✓' if ok else '✗'} (pinned)")
        if not pinned:
            _line("vTPM", "quote verified; no PCR values pinned by the policy")
    if checks and _check_mark(checks, "policy.revoked_measurements"):
        _line("revoked", "not revoked" + _check_mark(checks, "policy.revoked_measurements"))


def _echo_report(report: Report, *, explain: bool) -> None:
    outcome = report.outcome
    simulated = outcome.platform.startswith("sim-")
    verdict = "ACCEPT" if outcome.accepted else "REJECT"
    where = "through a proxy domain" if report.via_proxy else "direct to the agent"
    click.echo(f"{verdict}  {_shown(report.url)}  ({where})")
    if simulated:
        click.secho(
            f"  !! SIMULATED: {_shown(outcome.platform)} evidence comes from Cube's simulator, "
            "NOT a real TEE. It proves nothing about confidentiality; use it for development only.",
            fg="yellow",
            bold=True,
        )
    if outcome.error is not None:
        click.echo(f"  {outcome.error.failure_class} error: {_shown(outcome.error.message)}")
        if outcome.error.check == "tls.certificate":
            click.echo(
                "  the certificate this connection presented is not the attested one: something "
                "between you and the agent terminates TLS (an interceptor, a TLS-inspecting "
                "middlebox), or this is not the agent the evidence came from"
            )
        failed = [c for c in outcome.checks if not c.passed]
        for check in failed:
            if check.expected is not None:
                click.echo(f"      expected: {_shown(check.expected)}")
            if check.actual is not None:
                click.echo(f"      actual:   {_shown(check.actual)}")
    _line("policy", report.policy_source)
    label = f"{outcome.platform} (SIMULATED — not a real TEE)" if simulated else outcome.platform
    _line("platform", label)
    fields = outcome.fields
    if fields:
        _measured(report, fields)
        claims = fields.get("claims") or {}
        model = claims.get("model") or {}
        checks = list(outcome.checks)
        _line(
            "model",
            f"{model.get('name', '?')}  {model.get('digest', '?')}"
            + _check_mark(checks, "policy.model_digest"),
        )
        _line("", f"accepted: {_digests(report.judged_by.model_digests)}")
        _line(
            "config",
            f"{claims.get('config_digest', '?')}" + _check_mark(checks, "policy.config_digest"),
        )
        _line("", f"accepted: {_digests(report.judged_by.config_digests)}")
        _line("agent", str(claims.get("agent_version", "?")))
    facts = report.endpoint
    if facts:
        click.echo("  keys")
        attested = facts["attested_cert_sha256"]
        if facts["tls_bound"]:
            presented = "presented by THIS connection ✓"
        elif report.via_proxy:
            presented = (
                "not comparable: TLS ends at the proxy; the attested HPKE key is the channel "
                "bound to the TEE (use end-to-end encryption)"
            )
        else:
            presented = "NOT the certificate this connection presented ✗"
        _line("TLS cert", f"sha256 {attested}")
        _line("", presented)
        if facts.get("peer_cert_sha256") and not facts["tls_bound"]:
            _line("", f"this connection: sha256 {facts['peer_cert_sha256']}")
        _line("HPKE key", f"X25519 {facts['hpke_public_key']}")
        click.echo("  freshness")
        _line("nonce", str(facts["nonce"]))
        _line(
            "issued",
            f"{facts['issued_at']}, {max(facts['age_seconds'], 0):.0f} s old when verified "
            f"(max {report.judged_by.max_evidence_age_seconds} s)",
        )
        _line("valid until", str(facts["expires_at"]))
    for note in outcome.notes:
        click.echo(f"  note: {_shown(note)}")
    click.echo("  checks")
    echo_checks([_shown_check(c) for c in outcome.checks], indent="    ", values=explain)


def _emit(report: Report, *, as_json: bool, explain: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _echo_report(report, explain=explain)
    sys.exit(_exit_code(report.outcome.error))


@click.command("verify")
@click.argument("url", envvar="CUBE_VERIFY_URL")
@click.option(
    "--policy",
    "policy_path",
    type=_FILE,
    envvar="CUBE_VERIFY_POLICY",
    help="A cube-policy/1 file to verify against.",
)
@click.option(
    "--reference",
    "reference_path",
    type=_FILE,
    envvar="CUBE_VERIFY_REFERENCE",
    help="A release's published reference values (a cube-policy/1, or a document with one "
    "under 'policy'); an alternative to --policy.",
)
@click.option(
    "--api-key",
    "--token",
    "api_key",
    envvar=["CUBE_VERIFY_API_KEY", "CUBE_API_KEY"],
    help="Credential for a proxy domain (a PAT); agents need none.",
)
@click.option("--json", "as_json", is_flag=True, envvar="CUBE_VERIFY_JSON", help="Print JSON.")
@click.option(
    "--explain",
    is_flag=True,
    envvar="CUBE_VERIFY_EXPLAIN",
    help="Show expected and actual values of every check.",
)
@click.option(
    "--via-proxy/--direct",
    "via_proxy",
    default=None,
    envvar="CUBE_VERIFY_VIA_PROXY",
    help="The URL is a proxy domain / the agent itself (default: a URL with a path is a proxy).",
)
@click.option(
    "--ca",
    type=_FILE,
    envvar="CUBE_VERIFY_CA",
    help="CA bundle for a proxy's TLS certificate (agents are pinned by evidence instead).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    envvar="CUBE_VERIFY_TIMEOUT",
    help="Seconds for the whole fetch.",
)
def verify(
    *,
    url: str,
    policy_path: Path | None,
    reference_path: Path | None,
    api_key: str | None,
    as_json: bool,
    explain: bool,
    via_proxy: bool | None,
    ca: Path | None,
    timeout: float,
) -> None:
    """Verify a running agent or proxy domain: fresh nonce, evidence, policy, TLS binding.

    \b
    cube verify https://127.0.0.1:8443 --policy policy.json
    cube verify https://proxy.example/acme --policy policy.json --api-key "$PAT"

    Exit codes: 0 accept, 2 usage, 3 malformed, 4 signature/binding, 5 policy, 6 stale,
    7 unreachable.
    """
    source = reference_source(policy_path, reference_path)
    from cube_client import parse_endpoint, verify_endpoint
    from cube_client._text import shown_url

    context = ssl_context(ca)
    try:
        policy = load_reference(source)
    except InvalidPolicyError as exc:
        rejected = Outcome(platform="unknown", error=exc)
        _emit(Report(shown_url(url), bool(via_proxy), str(source), None, rejected),
              as_json=as_json, explain=explain)  # fmt: skip
    checks = Checks()
    outcome = Outcome(platform="unknown", checks=checks)
    # (Shown, never the URL as given: it may carry credentials or an api_key query.)
    report = Report(shown_url(url), bool(via_proxy), str(source), policy, outcome)
    try:
        report.via_proxy = parse_endpoint(url, via_proxy).via_proxy
        found = verify_endpoint(
            url,
            policy,
            via_proxy=via_proxy,
            ca=context,
            timeout=timeout,
            api_key=api_key or None,
            checks=checks,
        )
        outcome.platform = found.evidence.platform
        # Describing what verified is part of the verdict: whatever fails here (a field that
        # cannot be shown) is reported like any other failure, never as a traceback.
        fields = found.evidence.fields()
        if found.evidence.tpm is not None:
            fields["tpm"] = found.evidence.tpm.fields()
        endpoint = _endpoint_facts(found)
    except AttestationError as exc:
        outcome.error = exc
        outcome.platform = _platform_seen(checks) or outcome.platform
    except Exception as exc:  # fail closed, never a traceback
        outcome.error = MalformedError(f"verification failed ({type(exc).__name__})")
    else:
        outcome.fields = fields
        report.endpoint = endpoint
    _emit(report, as_json=as_json, explain=explain)
