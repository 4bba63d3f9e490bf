"""``cube`` as a real process (the installed console script): exit codes and no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import vectors
from tests.cli import _util as u

pytestmark = pytest.mark.slow

CUBE = Path(sys.executable).parent / "cube"


def cube(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not CUBE.exists():
        pytest.skip(f"{CUBE} is not installed (run scripts/bootstrap)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_")}
    proc = subprocess.run(
        [str(CUBE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def test_accept(tmp_path: Path) -> None:
    v = vectors.vector("snp-turin-v5-oak")
    proc = cube(
        "attest", "verify", *u.snp_args(v, tmp_path), *u.at(vectors.time_inside(v)), "--json"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "accept"
    assert out["fields"]["product"] == "Turin"


def test_tdx_accept_and_policy_reject(tmp_path: Path) -> None:
    v = vectors.vector("tdx-v4-trustee-6-module3")
    args = ["attest", "verify", *u.tdx_args(v, tmp_path), *u.at(vectors.time_inside(v))]
    assert cube(*args).returncode == 5
    assert cube(*args, "--accept-tcb-status", "OutOfDate").returncode == 0


def test_signature_failure(tmp_path: Path) -> None:
    v = vectors.vector("snp-milan-v2-trustee")
    bad = tmp_path / "report.bin"
    bad.write_bytes(u.flip(vectors.file_of(v, "report"), 0x90))
    args = u.snp_args(v, tmp_path)
    args[args.index("--report") + 1] = str(bad)
    proc = cube("attest", "verify", *args, *u.at(vectors.time_inside(v)))
    assert proc.returncode == 4
    assert proc.stdout.startswith("REJECT: sev-snp")


def test_malformed_and_expired(tmp_path: Path) -> None:
    garbage = tmp_path / "quote.bin"
    garbage.write_bytes(os.urandom(700))
    assert cube("attest", "verify", "--platform", "tdx", "--quote", garbage).returncode == 3
    assert cube("attest", "show", "--platform", "tdx", "--quote", garbage).returncode == 3
    v = vectors.vector("tdx-v4-phala-uptodate")
    proc = cube("attest", "verify", *u.tdx_args(v, tmp_path), *u.at(vectors.time_after(v)))
    assert proc.returncode == 6


def test_usage_errors(tmp_path: Path) -> None:
    proc = cube("attest", "verify", "--platform", "sev-snp", "--report", tmp_path / "nope.bin")
    assert proc.returncode == 2
    assert "Usage:" in proc.stderr
    assert cube("attest", "verify", "--evidence", __file__).returncode == 2
    assert cube("attest", "--help").returncode == 0
