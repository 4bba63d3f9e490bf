"""``cube attest verify --evidence`` and ``cube attest simulate``: cube-evidence/1 documents
from the command line."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cli import _util as u

NONCE = "5a" * 32


@pytest.fixture(scope="module", params=["sim-sev-snp", "sim-tdx"])
def simulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding evidence.json and policy.json from ``cube attest simulate``."""
    platform = str(request.param)
    out = tmp_path_factory.mktemp(platform)
    run = u.invoke(
        "attest", "simulate", "--platform", platform, "--nonce", NONCE,
        "--out", out / "evidence.json", "--policy-out", out / "policy.json",
        "--measurement", "ab" * 48, "--model-digest", "sha256:" + "cd" * 32,
    )  # fmt: skip
    assert run.exit_code == 0, run.stdout + run.stderr
    assert "SIMULATED" in run.stdout
    return out


def _verify(directory: Path, *extra: str | Path, nonce: str = NONCE) -> u.CliRun:
    return u.verify("--evidence", directory / "evidence.json", "--nonce", nonce, "--json", *extra)


def test_simulated_evidence_with_its_policy(simulated: Path) -> None:
    doc = json.loads((simulated / "evidence.json").read_bytes())
    assert doc["nonce"] == NONCE
    run = _verify(simulated, "--policy", simulated / "policy.json")
    assert run.exit_code == 0, run.stdout
    out = run.json()
    assert out["verdict"] == "accept"
    assert out["platform"] == doc["platform"]
    measured = out["fields"].get("measurement", out["fields"].get("mr_td"))
    assert measured == "ab" * 48
    assert out["fields"]["claims"]["model"]["digest"] == "sha256:" + "cd" * 32
    assert out["checks"] and all(c["passed"] for c in out["checks"])


def test_simulated_evidence_refused_by_default(simulated: Path) -> None:
    run = _verify(simulated)
    assert run.exit_code == 5
    assert run.json()["error"]["type"] == "SimulatedEvidenceError"
    loose = _verify(simulated, "--allow-simulated")
    assert loose.exit_code == 0
    # Without --policy nothing is pinned: the answer says so.
    assert any("no --policy" in note for note in loose.json()["notes"])
    pinned = _verify(simulated, "--policy", simulated / "policy.json")
    assert "no --policy" not in pinned.stdout


def test_policy_pinning_another_measurement(simulated: Path, tmp_path: Path) -> None:
    policy = json.loads((simulated / "policy.json").read_text())
    for section in ("sev_snp", "tdx"):
        if section in policy:
            key = "measurements" if section == "sev_snp" else "mr_td"
            policy[section][key] = ["00" * 48]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    run = _verify(simulated, "--policy", path)
    assert run.exit_code == 5
    assert run.json()["error"]["class"] == "policy"


def test_evidence_answers_only_its_nonce(simulated: Path) -> None:
    run = _verify(simulated, "--allow-simulated", nonce="5b" * 32)
    assert run.exit_code == 4
    assert run.json()["error"]["check"] == "evidence.nonce"


@pytest.mark.parametrize("nonce", ["5a" * 31, "5a" * 65, "zz" * 32, "5a" * 31 + "5"])
def test_malformed_nonce_exits_3(simulated: Path, nonce: str) -> None:
    run = _verify(simulated, "--allow-simulated", nonce=nonce)
    assert run.exit_code == 3
    assert run.json()["error"]["class"] == "malformed"


def test_stale_and_future_evidence_exit_6(simulated: Path) -> None:
    now = datetime.now(UTC)
    stale = _verify(simulated, "--allow-simulated", "--at", (now + timedelta(hours=1)).isoformat())
    assert stale.exit_code == 6
    assert stale.json()["error"]["type"] == "StaleEvidenceError"
    early = _verify(simulated, "--allow-simulated", "--at", (now - timedelta(hours=1)).isoformat())
    assert early.exit_code == 6


def test_altered_claims_exit_4(simulated: Path, tmp_path: Path) -> None:
    doc = json.loads((simulated / "evidence.json").read_bytes())
    claims = base64.b64decode(doc["claims"]).replace(b"simulated-model", b"simulated-modeL")
    doc["claims"] = base64.b64encode(claims).decode()
    (tmp_path / "evidence.json").write_text(json.dumps(doc))
    run = _verify(tmp_path, "--allow-simulated")
    assert run.exit_code == 4
    assert run.json()["error"]["type"] == "BindingError"


def test_show_evidence(simulated: Path) -> None:
    run = u.show("--evidence", simulated / "evidence.json", "--json")
    assert run.exit_code == 0
    out = run.json()
    assert "verdict" not in out
    assert out["fields"]["nonce"] == NONCE
    assert out["platform"].startswith("sim-")
    human = u.show("--evidence", simulated / "evidence.json")
    assert "SIMULATED" in human.stdout


def test_simulate_refuses_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "evidence.json"
    run = u.invoke("attest", "simulate", "--nonce", "00" * 8, "--out", out)
    assert run.exit_code == 3
    assert not out.exists()
    run = u.invoke("attest", "simulate", "--nonce", NONCE, "--out", out, "--model-digest", "md5:1")
    assert run.exit_code == 3
    assert not out.exists()
    assert u.invoke("attest", "simulate", "--out", out).exit_code == 2  # --nonce is required
    nowhere = tmp_path / "no-such-dir" / "evidence.json"
    run = u.invoke("attest", "simulate", "--nonce", NONCE, "--out", nowhere)
    assert run.exit_code == 2 and "no-such-dir" in run.stderr  # usage: a path, named
