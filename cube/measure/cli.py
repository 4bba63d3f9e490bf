"""``cube measure BUILD_DIR``: reference values and a policy from an image build.

The outputs (``--measurements``, ``--out`` and the SEV-SNP policy beside it,
``<out stem>-sev-snp.json``, written or removed as stale) must be distinct files and none an
input (the build's files, ``--ovmf``): a usage error otherwise, before anything is read.

Exit codes: 0 written, 2 usage, 3 the build directory cannot be measured (missing, malformed or
inconsistent input; the message says which). No input produces a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cube.measure._compute import (
    CONFIG_NAME,
    DEFAULT_PCRS,
    UKI_NAME,
    VOLUME_NAME,
    MeasureError,
    MeasureOptions,
    measure_build,
)
from cube.measure._snp import find_sev_snp_measure

EXIT_UNMEASURABLE = 3
_VCPU_TYPES = ("EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa")


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers") from None
    if not values:
        raise click.BadParameter(f"{what}: empty list")
    return values


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through ``..``, symbolic or hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): different files
        return False


def _check_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuse outputs that name one file, or an input: one would overwrite another (the SNP
    policy's sibling is written or removed as stale), and an input overwritten is lost."""
    named = list(outputs.items())
    for index, (what, path) in enumerate(named):
        for other, other_path in named[index + 1 :]:
            if _same_file(path, other_path):
                raise click.UsageError(f"{what} and {other} are one file ({path})")
        for other, input_path in inputs.items():
            if _same_file(path, input_path):
                raise click.UsageError(f"{what} ({path}) is an input: {other}")


def _write_all(files: dict[Path, str | None]) -> None:
    """Write every file (None: remove it) or none: all are written beside their targets first,
    then moved into place, so a failure never leaves measurements and policy disagreeing."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            if text is not None:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(text)
                staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
        for path, text in files.items():
            if text is None:
                path.unlink(missing_ok=True)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        click.echo(f"cube measure: cannot write {exc.filename}: {exc.strerror}", err=True)
        sys.exit(EXIT_UNMEASURABLE)


@click.command("measure")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="policy file to write (default BUILD_DIR/policy.json)",
)
@click.option(
    "--measurements",
    "measurements_out",
    envvar="CUBE_MEASURE_MEASUREMENTS",
    type=click.Path(dir_okay=False, path_type=Path),
    help="measurements file to write (default BUILD_DIR/measurements.json)",
)
@click.option(
    "--pcrs",
    default=",".join(str(p) for p in DEFAULT_PCRS),
    show_default=True,
    help="vTPM PCRs (sha256 bank) to pin in the policy",
    # What weakens the policy written is said on the command line only (as cube attest's).
    allow_from_autoenv=False,
)
@click.option(
    "--kernel-load-measured/--kernel-load-not-measured",
    default=True,
    show_default=True,
    help="PCR 4 also holds the embedded kernel's Authenticode hash (systemd-stub 257 loads it "
    "through LoadImage; newer stubs with Secure Boot off do not)",
    allow_from_autoenv=False,
)
@click.option(
    "--require-event-log/--no-require-event-log",
    default=True,
    show_default=True,
    help="policy.vtpm.require_event_log: the quote's PCRs must replay from the firmware event log",
    allow_from_autoenv=False,
)
@click.option(
    "--pcr11-phases",
    default="",
    help="systemd-pcrphase strings the image extends into PCR 11 before the agent quotes, "
    "colon-separated (e.g. enter-initrd:leave-initrd:sysinit:ready); default none",
    allow_from_autoenv=False,
)
@click.option(
    "--ovmf",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="SEV-SNP capable OVMF (scripts/build-ovmf); without it SNP is not computed",
)
@click.option("--vcpus", default="1,2,4", show_default=True, help="SNP: vCPU counts")
@click.option(
    "--vcpu-type",
    "vcpu_types",
    envvar="CUBE_MEASURE_VCPU_TYPE",
    default="EPYC-v4,EPYC-Milan,EPYC-Genoa",
    show_default=True,
    help="SNP: vCPU types (sev-snp-measure names)",
)
@click.option(
    "--sev-snp-measure",
    "sev_snp_measure",
    default=None,
    help="path of sev-snp-measure (default: the scripts/setup-sev-snp-measure venv, then PATH)",
)
def measure(
    *,
    build_dir: Path,
    out: Path | None,
    measurements_out: Path | None,
    pcrs: str,
    kernel_load_measured: bool,
    require_event_log: bool,
    pcr11_phases: str,
    ovmf: Path | None,
    vcpus: str,
    vcpu_types: str,
    sev_snp_measure: str | None,
) -> None:
    """Compute the reference values of an image build (cube.efi, agent-config.json,
    model-volume.json in BUILD_DIR) and write measurements.json and a cube-policy/1 policy
    (plus policy-sev-snp.json when SEV-SNP measurements are computed)."""
    types = tuple(t.strip() for t in vcpu_types.split(",") if t.strip())
    bad = [t for t in types if t not in _VCPU_TYPES]
    if bad or not types:
        raise click.BadParameter(f"unknown vCPU type(s) {bad}; known: {', '.join(_VCPU_TYPES)}")
    options = MeasureOptions(
        pcrs=_int_list(pcrs, "--pcrs"),
        kernel_load_measured=kernel_load_measured,
        pcr11_phases=tuple(p for p in pcr11_phases.split(":") if p),
        require_event_log=require_event_log,
        ovmf=ovmf,
        sev_snp_measure=find_sev_snp_measure(sev_snp_measure) if ovmf is not None else None,
        vcpus=_int_list(vcpus, "--vcpus"),
        vcpu_types=types,
    )
    policy_path = out or build_dir / "policy.json"
    measurements_path = measurements_out or build_dir / "measurements.json"
    snp_path = policy_path.with_name(policy_path.stem + "-sev-snp.json")
    inputs = {
        f"the build's {name}": build_dir / name for name in (UKI_NAME, CONFIG_NAME, VOLUME_NAME)
    }
    if ovmf is not None:
        inputs["--ovmf"] = ovmf
    if options.sev_snp_measure is not None:
        inputs["sev-snp-measure"] = Path(options.sev_snp_measure)
    _check_outputs(
        {
            "--measurements": measurements_path,
            "--out": policy_path,
            f"the SEV-SNP policy beside --out ({snp_path.name}, written or removed)": snp_path,
        },
        inputs,
    )
    try:
        result = measure_build(build_dir, options)
    except MeasureError as exc:
        click.echo(f"cube measure: {exc}", err=True)
        sys.exit(EXIT_UNMEASURABLE)
    # An SNP policy of an earlier build must not stay beside this build's policy.
    snp_text = None if result.snp_policy is None else result.snp_policy.dumps()
    _write_all(
        {measurements_path: result.dumps(), policy_path: result.policy.dumps(), snp_path: snp_text}
    )
    click.echo(f"measurements: {measurements_path}")
    click.echo(f"policy:       {policy_path}")
    if snp_text is not None:
        click.echo(f"SEV-SNP:      {snp_path}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
