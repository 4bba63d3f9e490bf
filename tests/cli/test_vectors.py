"""``cube attest verify`` / ``show`` over every SEV-SNP and TDX vector in MANIFEST.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import vectors
from tests.cli import _util as u


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-vectors")


def test_every_platform_vector_is_covered() -> None:
    # Guards the parametrisation below against an empty or shrunken manifest.
    assert len(u.SNP_VECTORS) >= 11
    assert len(u.TDX_VECTORS) >= 8
    assert {v["check"] for v in u.SNP_VECTORS} == {"snp", "snp_azure"}


def _assert_common(out: dict[str, Any], *, platform: str, exit_code: int) -> None:
    assert out["platform"] == platform
    assert out["verdict"] == ("accept" if exit_code == 0 else "reject")
    assert isinstance(out["checks"], list) and out["checks"]
    for check in out["checks"]:
        assert isinstance(check["name"], str) and isinstance(check["passed"], bool)
    if exit_code == 0:
        assert "error" not in out
        assert all(c["passed"] for c in out["checks"])
    else:
        assert (
            out["error"]["class"]
            == {3: "malformed", 4: "signature", 5: "policy", 6: "validity"}[exit_code]
        )
        # The failed check is recorded, last, under the name the error gives.
        assert out["checks"][-1]["passed"] is False
        assert out["checks"][-1]["name"] == out["error"]["check"]


# -- SEV-SNP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("v", u.SNP_VECTORS, ids=u.SNP_IDS)
def test_snp_vector_verdict_and_fields(v: dict[str, Any], workdir: Path) -> None:
    run = u.verify(*u.snp_args(v, workdir), *u.at(vectors.time_inside(v)), "--json")
    expected_exit = u.snp_expected_exit(v)
    assert run.exit_code == expected_exit, run.stdout
    out = run.json()
    _assert_common(out, platform="sev-snp", exit_code=expected_exit)
    fields = out["fields"]
    for key, value in u.snp_expected_fields(v).items():
        assert fields[key] == value, key
    assert fields["verified_signing_key"] == ("vlek" if v["parsed"]["signing_key"] == 1 else "vcek")
    if expected_exit == 5:
        assert out["error"]["check"] == "snp.policy.debug"
    if v["check"] == "snp_azure":
        assert any("Azure HCL report" in note for note in out["notes"])
        binding = [c for c in out["checks"] if c["name"] == "hcl.runtime_data_binding"]
        assert len(binding) == 1 and binding[0]["passed"]
        assert binding[0]["actual"] == fields["report_data"][:64]


@pytest.mark.parametrize(
    "v", [v for v in u.SNP_VECTORS if u.snp_debug(v)], ids=lambda v: str(v["id"])
)
def test_snp_debug_guest_accepted_by_a_policy_allowing_debug(
    v: dict[str, Any], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "cube-policy/1", "sev_snp": {"allow_debug": True}}))
    run = u.verify(
        *u.snp_args(v, tmp_path), *u.at(vectors.time_inside(v)), "--policy", policy, "--json"
    )
    assert run.exit_code == 0, run.stdout
    assert run.json()["verdict"] == "accept"


def test_vcek_bundle_is_accepted_as_vcek(tmp_path: Path) -> None:
    # Azure serves "VCEK, ASK, ARK" as one PEM file; --vcek takes it as it is.
    v = vectors.vector("snp-milan-v2-azure-trustee")
    bundle = vectors.path(v["files"]["vcek"]["path"])
    args: list[str | Path] = [
        "--platform",
        "sev-snp",
        "--hcl-report",
        vectors.path(v["files"]["hcl"]["path"]),
    ]
    run = u.verify(*args, "--vcek", bundle, *u.at(vectors.time_inside(v)), "--json")
    assert run.exit_code == 0, run.stdout
    assert run.json()["fields"]["measurement"] == v["parsed"]["measurement"]
    # ... but not together with a second chain: which one would count?
    twice = u.verify(*args, "--vcek", bundle, "--cert-chain", bundle, *u.at(vectors.time_inside(v)))
    assert twice.exit_code == 3


def test_the_debug_vector_exists() -> None:
    debug = [v["id"] for v in u.SNP_VECTORS if u.snp_debug(v)]
    assert "snp-milan-v2-go-sev-guest" in debug


@pytest.mark.parametrize("v", u.SNP_VECTORS, ids=u.SNP_IDS)
def test_snp_show_prints_fields_without_verdict(v: dict[str, Any], workdir: Path) -> None:
    args = u.snp_args(v, workdir)
    run = u.show(*args, "--json")
    assert run.exit_code == 0, run.stdout
    out = run.json()
    assert "verdict" not in out and "error" not in out
    assert out["platform"] == "sev-snp"
    expected = u.snp_expected_fields(v)
    for key, value in expected.items():
        if key == "product" and v["parsed"]["version"] < 3:
            # A v2 report names no product; `verify` learns it from the VCEK, `show` cannot.
            assert out["fields"][key] is None
            continue
        assert out["fields"][key] == value, key
    if v["check"] == "snp_azure":
        assert "hcl" in out["fields"]
    human = u.show(*args)
    assert human.exit_code == 0
    assert "ACCEPT" not in human.stdout and "REJECT" not in human.stdout
    assert f"measurement: {expected['measurement']}" in human.stdout


# -- TDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", u.TDX_VECTORS, ids=u.TDX_IDS)
def test_tdx_vector_verdict_and_fields(v: dict[str, Any], workdir: Path) -> None:
    run = u.verify(*u.tdx_args(v, workdir), *u.at(vectors.time_inside(v)), "--json")
    expected_exit = u.tdx_expected_exit(v)
    assert run.exit_code == expected_exit, run.stdout
    out = run.json()
    _assert_common(out, platform="tdx", exit_code=expected_exit)
    fields = out["fields"]
    for key, value in u.tdx_expected_fields(v).items():
        assert fields[key] == value, key
    status = u.tdx_status(v)
    assert fields["tcb_status"] == status
    if v["check"] == "tdx_azure":
        assert any("Azure HCL report" in note for note in out["notes"])
        binding = [c for c in out["checks"] if c["name"] == "hcl.runtime_data_binding"]
        assert len(binding) == 1 and binding[0]["passed"]
        assert binding[0]["actual"] == fields["report_data"][:64]
    if status is None:
        assert any("TCB status was NOT evaluated" in note for note in out["notes"])
    elif status != "UpToDate":
        assert out["error"]["type"] == "TcbStatusError"
    elif expected_exit == 5:
        assert out["error"]["check"] == "tdx.policy.debug"


def test_tdx_vectors_cover_each_collateral_form(workdir: Path) -> None:
    flags = {flag for v in u.TDX_VECTORS for flag in u.tdx_args(v, workdir) if flag[:2] == "--"}
    assert {"--collateral", "--tcb-info", "--qe-identity", "--pck-crl", "--root-crl"} <= flags


def test_tdx_mixed_collateral_vector_has_its_crls(workdir: Path) -> None:
    # tdx-v5-go-tdx-guest takes its TCB info from a PCS response and everything else from a
    # dcap-qvl document; the composed --collateral keeps the CRLs, so revocation is checked.
    v = vectors.vector("tdx-v5-go-tdx-guest")
    args = u.tdx_args(v, workdir)
    assert "--collateral" in args
    out = u.verify(*args, *u.at(vectors.time_inside(v)), "--json").json()
    assert out["fields"]["tcb_status"] == "UpToDate"
    assert out["fields"]["revocation_checked"] is True


def test_tdx_out_of_date_accepted_only_when_asked(workdir: Path) -> None:
    v = vectors.vector("tdx-v4-trustee-6-module3")
    args = [*u.tdx_args(v, workdir), *u.at(vectors.time_inside(v)), "--json"]
    strict = u.verify(*args)
    assert strict.exit_code == 5
    assert strict.json()["error"]["type"] == "TcbStatusError"
    relaxed = u.verify(*args, "--accept-tcb-status", "UpToDate", "--accept-tcb-status", "OutOfDate")
    assert relaxed.exit_code == 0, relaxed.stdout
    assert relaxed.json()["fields"]["tcb_status"] == "OutOfDate"
    # Only the statuses named count: OutOfDate alone still accepts this OutOfDate platform.
    assert u.verify(*args, "--accept-tcb-status", "OutOfDate").exit_code == 0
    assert u.verify(*args, "--accept-tcb-status", "SWHardeningNeeded").exit_code == 5


@pytest.mark.parametrize(
    "v",
    [v for v in u.TDX_VECTORS if u.tdx_status(v) in u.NEVER_ACCEPTED],
    ids=lambda v: str(v["id"]),
)
def test_tdx_tcb_not_supported_is_never_accepted(v: dict[str, Any], workdir: Path) -> None:
    args = [*u.tdx_args(v, workdir), *u.at(vectors.time_inside(v)), "--json"]
    assert u.verify(*args).exit_code == 5
    # Naming the status does not help: a policy cannot accept it.
    run = u.verify(*args, "--accept-tcb-status", u.tdx_status(v) or "")
    assert run.exit_code != 0
    assert run.json()["verdict"] == "reject"


def test_tdx_debug_td_accepted_by_a_policy_allowing_debug(tmp_path: Path) -> None:
    v = vectors.vector("tdx-v4-trustee-4")
    assert u.tdx_debug(v)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "cube-policy/1", "tdx": {"allow_debug": True}}))
    args = [*u.tdx_args(v, tmp_path), *u.at(vectors.time_inside(v)), "--json"]
    assert u.verify(*args).exit_code == 5
    run = u.verify(*args, "--policy", policy)
    assert run.exit_code == 0, run.stdout
    assert run.json()["fields"]["tcb_status"] == "UpToDate"


@pytest.mark.parametrize("v", u.TDX_VECTORS, ids=u.TDX_IDS)
def test_tdx_show_prints_fields_without_verdict(v: dict[str, Any], workdir: Path) -> None:
    run = u.show(*u.tdx_args(v, workdir), "--json")
    assert run.exit_code == 0, run.stdout
    out = run.json()
    assert "verdict" not in out and "error" not in out
    assert out["platform"] == "tdx"
    for key, value in u.tdx_expected_fields(v).items():
        assert out["fields"][key] == value, key
    assert "tcb_status" not in out["fields"]  # nothing was evaluated
    assert ("hcl" in out["fields"]) == (v["check"] == "tdx_azure")


# -- validity windows --------------------------------------------------------------------------


ALL_VECTORS = [*u.SNP_VECTORS, *u.TDX_VECTORS]
ALL_IDS = [*u.SNP_IDS, *u.TDX_IDS]


@pytest.mark.parametrize("v", ALL_VECTORS, ids=ALL_IDS)
def test_after_the_validity_window_exits_6(v: dict[str, Any], workdir: Path) -> None:
    run = u.verify(*u.vector_args(v, workdir), *u.at(vectors.time_after(v)), "--json")
    assert run.exit_code == 6, run.stdout
    out = run.json()
    assert out["verdict"] == "reject"
    assert out["error"]["class"] == "validity"


@pytest.mark.parametrize("v", ALL_VECTORS, ids=ALL_IDS)
def test_before_the_validity_window_exits_6(v: dict[str, Any], workdir: Path) -> None:
    run = u.verify(*u.vector_args(v, workdir), *u.at(vectors.time_before(v)), "--json")
    assert run.exit_code == 6, run.stdout
    assert run.json()["error"]["class"] == "validity"


def test_at_accepts_z_suffix_and_naive_times(workdir: Path) -> None:
    v = vectors.vector("snp-milan-v2-trustee")
    args = u.snp_args(v, workdir)
    inside = vectors.time_inside(v)
    assert u.verify(*args, "--at", inside.strftime("%Y-%m-%dT%H:%M:%SZ")).exit_code == 0
    assert u.verify(*args, "--at", inside.strftime("%Y-%m-%dT%H:%M:%S")).exit_code == 0
    bad = u.verify(*args, "--at", "yesterday")
    assert bad.exit_code == 2
