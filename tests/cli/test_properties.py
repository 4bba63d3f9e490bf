"""Property tests: no input, however broken, makes ``cube attest`` print a traceback or accept."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import vectors
from tests.cli import _util as u

SNP = vectors.vector("snp-milan-v2-trustee")
TDX = vectors.vector("tdx-v4-phala-uptodate")
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cube-cli-props-") as name:
        yield Path(name)


def _run(args: list[str], target: Path, data: bytes) -> u.CliRun:
    target.write_bytes(data)
    run = u.verify(*args, "--json")  # an exception here fails the test (not caught)
    assert "Traceback" not in run.stdout + run.stderr
    assert run.exit_code in (3, 4, 5, 6), run.stdout
    out = run.json()
    assert out["verdict"] == "reject"
    assert out["error"]["class"] in ("malformed", "signature", "policy", "validity")
    return run


def _args(v: dict[str, Any], flag: str, target: Path, scratch: Path) -> list[str]:
    args = u.vector_args(v, scratch)
    args[args.index(flag) + 1] = str(target)
    return [*args, *u.at(vectors.time_inside(v))]


@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_report(scratch: Path, data: bytes) -> None:
    target = scratch / "report.bin"
    _run(_args(SNP, "--report", target, scratch), target, data)


@SETTINGS
@given(data=st.binary(min_size=1184, max_size=1184))
def test_random_report_of_the_right_size(scratch: Path, data: bytes) -> None:
    target = scratch / "report.bin"
    _run(_args(SNP, "--report", target, scratch), target, data)


@SETTINGS
@given(data=st.binary(max_size=6000))
def test_random_quote(scratch: Path, data: bytes) -> None:
    target = scratch / "quote.bin"
    _run(_args(TDX, "--quote", target, scratch), target, data)


@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_hcl_report(scratch: Path, data: bytes) -> None:
    v = vectors.vector("snp-genoa-v3-azure-trustee")
    target = scratch / "hcl.bin"
    _run(_args(v, "--hcl-report", target, scratch), target, data)


@SETTINGS
@given(data=st.binary(max_size=3000) | st.text(max_size=500).map(str.encode))
def test_random_evidence(scratch: Path, data: bytes) -> None:
    target = scratch / "evidence.json"
    target.write_bytes(data)
    _run(["--evidence", str(target), "--nonce", "00" * 32], target, data)


@SETTINGS
@given(
    positions=st.lists(st.integers(0, 0x2A0 - 1), min_size=1, max_size=4, unique=True),
    mask=st.integers(1, 255),
)
def test_flipped_snp_bytes_never_accept(scratch: Path, positions: list[int], mask: int) -> None:
    report = bytearray(vectors.file_of(SNP, "report"))
    for index in positions:
        report[index] ^= mask
    target = scratch / "flipped-report.bin"
    run = _run(_args(SNP, "--report", target, scratch), target, bytes(report))
    assert run.exit_code in (3, 4)


@SETTINGS
@given(position=st.integers(0, 631), mask=st.integers(1, 255))
def test_flipped_tdx_bytes_never_accept(scratch: Path, position: int, mask: int) -> None:
    quote = bytearray(vectors.file_of(TDX, "quote"))
    quote[position] ^= mask  # header (48) + TD 1.0 report body (584): the signed bytes
    target = scratch / "flipped-quote.bin"
    run = _run(_args(TDX, "--quote", target, scratch), target, bytes(quote))
    assert run.exit_code in (3, 4)


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_random_show_input(scratch: Path, data: bytes) -> None:
    target = scratch / "show.bin"
    target.write_bytes(data)
    for platform, flag in (("sev-snp", "--report"), ("tdx", "--quote")):
        run = u.show("--platform", platform, flag, target, "--json")
        assert run.exit_code in (0, 3)
        assert "Traceback" not in run.stdout + run.stderr
