"""``cube attest``: offline verification and inspection of attestation evidence.

Exit codes (stable; scripts and acceptance checks rely on them)::

    0 accept   2 usage   3 malformed input   4 signature/chain/collateral
    5 policy (TCB status included)   6 outside a validity window

No input, however broken, produces a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import click

from attestation._checks import Check, Checks
from attestation.errors import AttestationError, MalformedError

EXIT_ACCEPT = 0
EXIT_USAGE = 2
EXIT_MALFORMED = 3

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
PLATFORM_CHOICES = ("sev-snp", "tdx", "vtpm", "sim-sev-snp", "sim-tdx")
_SUMMARY_FIELDS = (
    # SEV-SNP
    "product", "version", "policy", "vmpl", "measurement", "host_data", "chip_id",
    "reported_tcb", "verified_signing_key",
    # TDX
    "mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "td_attributes", "xfam",
    "tcb_status", "advisory_ids",
    # both, and Cube evidence
    "report_data", "claims",
)  # fmt: skip


@dataclass
class Outcome:
    """What one verification found, however it ended."""

    platform: str
    fields: dict[str, Any] = field(default_factory=dict)
    checks: Iterable[Check] = ()
    error: AttestationError | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.error is None

    def to_json(self, *, verdict: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if verdict:
            out["verdict"] = "accept" if self.accepted else "reject"
        out["platform"] = self.platform
        out["fields"] = self.fields
        out["checks"] = [c.to_dict() for c in self.checks]
        if self.notes:
            out["notes"] = self.notes
        if self.error is not None:
            out["error"] = {
                "class": self.error.failure_class,
                "type": type(self.error).__name__,
                "message": self.error.message,
            }
            if self.error.check:
                out["error"]["check"] = self.error.check
        return out


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from exc


def _parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint="--at") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _emit(outcome: Outcome, *, as_json: bool, explain: bool, verdict: bool = True) -> None:
    if as_json:
        click.echo(json.dumps(outcome.to_json(verdict=verdict), indent=2, sort_keys=False))
        return
    simulated = outcome.platform.startswith("sim-")
    banner = " (SIMULATED — not a real TEE)" if simulated else ""
    if verdict:
        state = "ACCEPT" if outcome.accepted else "REJECT"
        click.echo(f"{state}: {outcome.platform}{banner}")
    else:
        click.echo(f"{outcome.platform}{banner}")
    if outcome.error is not None:
        click.echo(f"  {outcome.error.failure_class} error: {outcome.error.message}")
    for note in outcome.notes:
        click.echo(f"  note: {note}")
    if outcome.fields:
        # A person gets the fields that decide trust; --json has all of them.
        click.echo("fields:")
        for key in _SUMMARY_FIELDS:
            if key in outcome.fields:
                value = outcome.fields[key]
                click.echo(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")
    if explain:
        click.echo("checks:")
        echo_checks(outcome.checks)


def echo_checks(checks: Iterable[Check], *, indent: str = "  ", values: bool = True) -> None:
    """Print every check, ✓ or ✗, with its detail and (``values``) expected/actual values
    (``--explain``; ``cube verify`` prints its checks with this too)."""
    for check in checks:
        mark = "✓" if check.passed else "✗"
        line = f"{indent}{mark} {check.name}"
        if check.detail:
            line += f": {check.detail}"
        click.echo(line)
        if values and check.expected is not None:
            click.echo(f"{indent}    expected: {check.expected}")
        if values and check.actual is not None:
            click.echo(f"{indent}    actual:   {check.actual}")


def _finish(outcome: Outcome, *, as_json: bool, explain: bool) -> NoReturn:
    _emit(outcome, as_json=as_json, explain=explain)
    sys.exit(EXIT_ACCEPT if outcome.error is None else outcome.error.exit_code)


def _guard(platform: str, run: Callable[[Checks, Outcome], None]) -> Outcome:
    """Run one verification; every failure becomes part of the outcome, never a traceback."""
    checks = Checks()
    outcome = Outcome(platform=platform, checks=checks)
    try:
        run(checks, outcome)
    except AttestationError as exc:
        outcome.error = exc
    except Exception as exc:
        outcome.error = MalformedError(f"input could not be processed ({type(exc).__name__})")
    return outcome


_common_inputs = [
    click.option("--platform", type=click.Choice(PLATFORM_CHOICES), help="Raw-evidence platform."),
    click.option("--report", type=_FILE, help="SEV-SNP attestation report (binary)."),
    click.option("--hcl-report", type=_FILE, help="Azure HCL report holding an SNP report/TD."),
    click.option("--vcek", type=_FILE, help="VCEK or VLEK certificate (PEM or DER)."),
    click.option(
        "--cert-chain", type=_FILE, help="ASK/ASVK and ARK (PEM); default: embedded roots."
    ),
    click.option("--crl", type=_FILE, help="AMD CRL for the product (optional)."),
    click.option("--quote", type=_FILE, help="TDX quote (binary)."),
    click.option("--collateral", type=_FILE, help="TDX collateral JSON (dcap-qvl form)."),
    click.option("--tcb-info", type=_FILE, help="Intel PCS TCB info response body."),
    click.option("--qe-identity", type=_FILE, help="Intel PCS QE identity response body."),
    click.option("--pck-crl", type=_FILE, help="Intel PCK CRL (DER or PEM)."),
    click.option("--root-crl", type=_FILE, help="Intel SGX Root CA CRL (DER or PEM)."),
    click.option("--evidence", type=_FILE, help="A cube-evidence/1 document (JSON)."),
    click.option("--nonce", help="Hex nonce the evidence must answer (with --evidence)."),
]
_json_flag = click.option("--json", is_flag=True, help="Print one JSON object.")
#: What decides and explains a verdict: ``verify`` only (``show`` gives none).
_verdict_flags = [
    click.option("--policy", type=_FILE, help="A cube-policy/1 file."),
    click.option(
        "--accept-tcb-status",
        multiple=True,
        metavar="STATUS",
        help="TDX TCB status to accept (repeatable); default UpToDate only.",
        allow_from_autoenv=False,
    ),
    # What loosens a verdict is said on the command line only, never picked up from an
    # environment variable nobody sees (`cube` reads CUBE_<COMMAND>_<OPTION> for the rest).
    click.option(
        "--allow-simulated",
        is_flag=True,
        help="Accept simulator evidence.",
        allow_from_autoenv=False,
    ),
    click.option(
        "--at",
        "at",
        metavar="ISO8601",
        help="Verify as of this time (default: now).",
        allow_from_autoenv=False,
    ),
    click.option("--explain", is_flag=True, help="List every check with expected and actual."),
]


def _apply(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorator(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


@click.group()
def attest() -> None:
    """Verify or show SEV-SNP reports, TDX quotes, vTPM quotes and Cube evidence."""


@dataclass(frozen=True)
class Inputs:
    platform: str | None
    report: bytes | None
    hcl_report: bytes | None
    vcek: bytes | None
    cert_chain: bytes | None
    crl: bytes | None
    quote: bytes | None
    collateral: bytes | None
    tcb_info: bytes | None
    qe_identity: bytes | None
    pck_crl: bytes | None
    root_crl: bytes | None
    evidence: bytes | None
    nonce: str | None


def _inputs(kwargs: dict[str, Any]) -> Inputs:
    names = Inputs.__dataclass_fields__.keys()
    values = {n: kwargs.pop(n) for n in names}
    for key, value in list(values.items()):
        if isinstance(value, Path):
            values[key] = _read(value)
    return Inputs(**values)


#: Inputs of one kind of evidence only: given with another, they would be silently ignored
#: (and a user would think, say, a CRL was checked).
_SNP_ONLY: Final = ("report", "vcek", "cert_chain", "crl")
_TDX_ONLY: Final = ("quote", "collateral", "tcb_info", "qe_identity", "pck_crl", "root_crl")
_RAW: Final = (*_SNP_ONLY, *_TDX_ONLY, "hcl_report")


def _refuse_unused(inp: Inputs, names: tuple[str, ...], where: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(inp, n) is not None]
    if given:
        raise click.UsageError(
            f"{', '.join(given)} are not inputs of {where}: they would be ignored"
        )


def _check_usage(inp: Inputs, *, need_nonce: bool) -> str:
    """Validate the combination of inputs; return the platform to verify."""
    if inp.evidence is not None:
        if inp.platform is not None:
            raise click.UsageError("--evidence carries its own platform; omit --platform")
        _refuse_unused(inp, _RAW, "--evidence (the document carries its own)")
        if need_nonce and inp.nonce is None:
            raise click.UsageError("--evidence needs --nonce (the nonce you sent)")
        return "evidence"
    if inp.platform is None:
        raise click.UsageError("give --platform with raw evidence, or --evidence")
    base = inp.platform.removeprefix("sim-")
    if inp.nonce is not None:
        raise click.UsageError("--nonce goes with --evidence (raw reports carry no cube nonce)")
    _refuse_unused(inp, _TDX_ONLY if base == "sev-snp" else _SNP_ONLY, f"--platform {base}")
    if base == "sev-snp":
        if inp.report is None and inp.hcl_report is None:
            raise click.UsageError("--platform sev-snp needs --report (or --hcl-report)")
        if inp.report is not None and inp.hcl_report is not None:
            # The HCL report carries its own SNP report; the other one would be ignored.
            raise click.UsageError("give --report or --hcl-report, not both")
        if need_nonce and inp.vcek is None:
            raise click.UsageError("--platform sev-snp needs --vcek")
    elif base == "tdx":
        if inp.quote is None:
            raise click.UsageError("--platform tdx needs --quote")
        if inp.collateral is not None and (inp.tcb_info is not None or inp.qe_identity is not None):
            raise click.UsageError("give --collateral or --tcb-info/--qe-identity, not both")
        if (inp.tcb_info is None) != (inp.qe_identity is None):
            raise click.UsageError("--tcb-info and --qe-identity go together")
        if inp.tcb_info is None and (inp.pck_crl is not None or inp.root_crl is not None):
            # They would be ignored, and the user would think revocation was checked.
            raise click.UsageError("--pck-crl/--root-crl go with --tcb-info/--qe-identity")
    else:
        raise click.UsageError("raw vTPM quotes are verified inside --evidence documents")
    return inp.platform


@attest.command()
@_apply(_common_inputs)
@_apply(_verdict_flags)
@_json_flag
def verify(**kwargs: Any) -> None:
    """Verify evidence; exit 0 only on accept.

    \b
    cube attest verify --platform sev-snp --report FILE --vcek FILE [--cert-chain FILE]
    cube attest verify --platform tdx --quote FILE [--collateral FILE |
                       --tcb-info F --qe-identity F [--pck-crl F] [--root-crl F]]
    cube attest verify --evidence DOC.json --nonce HEX --policy POLICY.json
    """
    from attestation import _verify_cli as impl

    inp = _inputs(kwargs)
    mode = _check_usage(inp, need_nonce=True)  # click.UsageError exits 2
    now = _parse_time(kwargs["at"])
    outcome = _guard(
        mode,
        lambda checks, outcome: impl.run_verify(
            inp,
            mode=mode,
            now=now,
            policy_path=kwargs["policy"],
            accept_tcb_status=tuple(kwargs["accept_tcb_status"]),
            allow_simulated=kwargs["allow_simulated"],
            checks=checks,
            outcome=outcome,
        ),
    )
    _finish(outcome, as_json=kwargs["json"], explain=kwargs["explain"])


@attest.command()
@_apply(_common_inputs)
@_json_flag
def show(**kwargs: Any) -> None:
    """Parse and print evidence, with no verdict (exit 3 if it does not parse)."""
    from attestation import _verify_cli as impl

    inp = _inputs(kwargs)
    mode = _check_usage(inp, need_nonce=False)
    outcome = _guard(mode, lambda checks, outcome: impl.run_show(inp, mode=mode, outcome=outcome))
    _emit(outcome, as_json=kwargs["json"], explain=False, verdict=False)
    if outcome.error is not None:
        if not kwargs["json"]:
            click.echo(f"error: {outcome.error.message}", err=True)
        sys.exit(outcome.error.exit_code)


__all__ = ["Outcome", "attest", "echo_checks"]


@attest.command()
@click.option(
    "--platform",
    type=click.Choice(("sim-sev-snp", "sim-tdx")),
    default="sim-sev-snp",
    show_default=True,
)
@click.option("--nonce", required=True, help="Hex nonce (32 to 64 bytes) to bind.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--policy-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a cube-policy/1 that pins this simulated guest's reference values.",
)
@click.option("--measurement", help="SNP MEASUREMENT / TDX MRTD to report (96 hex digits).")
@click.option("--model-digest", default="sha256:" + "00" * 32, show_default=True)
@click.option("--config-digest", default="sha256:" + "00" * 32, show_default=True)
def simulate(**kwargs: Any) -> None:
    """Produce SIMULATED evidence through the production collection path (for development).

    The simulator's report or quote is read through an emulated configfs-tsm by the same code
    that runs in a confidential VM. Verifiers refuse it unless told --allow-simulated.
    """
    from attestation import _verify_cli as impl

    for flag, path in (("--out", kwargs["out"]), ("--policy-out", kwargs["policy_out"])):
        if path is not None and not path.parent.is_dir():
            raise click.BadParameter(f"{path.parent} is not a directory", param_hint=flag)
    outcome = _guard(
        kwargs["platform"], lambda checks, outcome: impl.run_simulate(**kwargs, outcome=outcome)
    )
    if outcome.error is not None:
        click.echo(f"error: {outcome.error.message}", err=True)
        sys.exit(outcome.error.exit_code)
    for note in outcome.notes:
        click.echo(note)
