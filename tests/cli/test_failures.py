"""``cube attest``: tampered, malformed and mismatched inputs, usage errors, and ``--explain``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from attestation import tdx
from attestation.azure import parse_hcl_report
from tests import vectors
from tests.cli import _util as u

SNP_OFFSETS = {"report_data": 0x50, "measurement": 0x90, "host_data": 0xC0, "chip_id": 0x1A0}
# TD report body offsets, after the 48-byte quote header.
TDX_OFFSETS = {"mr_td": 48 + 136, "rtmr0": 48 + 328, "report_data": 48 + 520}
SNP_SIGNED_END = 0x2A0

SNP_TEMPLATE = vectors.vector("snp-milan-v2-trustee")
TDX_TEMPLATE = vectors.vector("tdx-v4-phala-uptodate")
HCL_TEMPLATE = vectors.vector("snp-genoa-v3-azure-trustee")


def _replace(args: list[str], flag: str, path: Path) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = str(path)
    return out


def _run_with(v: dict[str, Any], flag: str, data: bytes, tmp_path: Path, *extra: str) -> u.CliRun:
    target = tmp_path / f"input{flag}"
    target.write_bytes(data)
    args = _replace(u.vector_args(v, tmp_path), flag, target)
    return u.verify(*args, *u.at(vectors.time_inside(v)), "--json", *extra)


def _assert_reject(run: u.CliRun, exit_code: int) -> dict[str, Any]:
    assert run.exit_code == exit_code, run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    out = run.json()
    assert out["verdict"] == "reject"
    assert (
        out["error"]["class"]
        == {3: "malformed", 4: "signature", 5: "policy", 6: "validity"}[exit_code]
    )
    return out


# -- tampering ---------------------------------------------------------------------------------


ACCEPTED_SNP = [v for v in u.SNP_VECTORS if v["check"] == "snp" and u.snp_expected_exit(v) == 0]


@pytest.mark.parametrize("v", ACCEPTED_SNP, ids=lambda v: str(v["id"]))
@pytest.mark.parametrize("field", sorted(SNP_OFFSETS))
def test_snp_flipped_field_byte_is_a_signature_failure(
    v: dict[str, Any], field: str, tmp_path: Path
) -> None:
    bad = u.flip(vectors.file_of(v, "report"), SNP_OFFSETS[field] + 5)
    out = _assert_reject(_run_with(v, "--report", bad, tmp_path), 4)
    # CHIP_ID is also compared with the VCEK's hwID; either check may be the one that fails.
    assert out["error"]["check"] in ("snp.report.signature", "snp.chip_id")


def test_snp_sweep_of_signed_bytes_never_accepts(tmp_path: Path) -> None:
    report = vectors.file_of(SNP_TEMPLATE, "report")
    codes = set()
    for index in [*range(0, SNP_SIGNED_END, 7), SNP_SIGNED_END + 3, len(report) - 80]:
        run = _run_with(SNP_TEMPLATE, "--report", u.flip(report, index), tmp_path)
        assert run.exit_code in (3, 4), (index, run.stdout)
        codes.add(run.exit_code)
    assert 4 in codes


def test_snp_flipped_signature_byte_is_a_signature_failure(tmp_path: Path) -> None:
    report = vectors.file_of(SNP_TEMPLATE, "report")
    out = _assert_reject(_run_with(SNP_TEMPLATE, "--report", u.flip(report, 0x2A0), tmp_path), 4)
    assert out["error"]["check"] == "snp.report.signature"


@pytest.mark.parametrize("v", u.TDX_VECTORS, ids=u.TDX_IDS)
@pytest.mark.parametrize("field", sorted(TDX_OFFSETS))
def test_tdx_flipped_body_byte_is_a_signature_failure(
    v: dict[str, Any], field: str, tmp_path: Path
) -> None:
    bad = u.flip(vectors.file_of(v, "quote"), TDX_OFFSETS[field] + 3)
    out = _assert_reject(_run_with(v, "--quote", bad, tmp_path), 4)
    assert out["error"]["type"] == "SignatureError"


def test_tdx_sweep_of_signed_bytes_never_accepts(tmp_path: Path) -> None:
    quote = vectors.file_of(TDX_TEMPLATE, "quote")
    signed = len(tdx.parse_quote(quote).signed_data)
    codes = set()
    # The header and TD report, then the start of the signature data (quote signature,
    # attestation key, QE report).
    for index in [*range(0, signed, 11), *range(signed + 4, signed + 4 + 64 + 64 + 384, 29)]:
        run = _run_with(TDX_TEMPLATE, "--quote", u.flip(quote, index), tmp_path)
        assert run.exit_code in (3, 4), (index, run.stdout)
        codes.add(run.exit_code)
    assert 4 in codes


def test_azure_tampered_snp_report_inside_hcl(tmp_path: Path) -> None:
    hcl = vectors.file_of(HCL_TEMPLATE, "hcl")
    start = hcl.find(parse_hcl_report(hcl).tee_report)
    assert start > 0
    bad = u.flip(hcl, start + SNP_OFFSETS["measurement"])
    out = _assert_reject(_run_with(HCL_TEMPLATE, "--hcl-report", bad, tmp_path), 4)
    assert out["error"]["check"] == "snp.report.signature"


def test_azure_tdx_quote_with_an_snp_hcl_report(tmp_path: Path) -> None:
    v = vectors.vector("tdx-v4-azure-trustee")
    out = _assert_reject(
        _run_with(v, "--hcl-report", vectors.file_of(HCL_TEMPLATE, "hcl"), tmp_path), 4
    )
    assert out["error"]["check"] == "evidence.hcl.platform"


def test_azure_tdx_hcl_runtime_data_tampered(tmp_path: Path) -> None:
    v = vectors.vector("tdx-v4-azure-trustee")
    hcl = vectors.file_of(v, "hcl")
    runtime = parse_hcl_report(hcl).runtime_data
    index = hcl.find(runtime) + runtime.find(b'"n":"') + 5
    while not chr(hcl[index]).isalpha():
        index += 1
    bad = bytearray(hcl)
    bad[index] = ord(chr(hcl[index]).swapcase())
    out = _assert_reject(_run_with(v, "--hcl-report", bytes(bad), tmp_path), 4)
    assert out["error"]["check"] == "hcl.runtime_data_binding"


def test_azure_tampered_runtime_data_breaks_the_binding(tmp_path: Path) -> None:
    hcl = vectors.file_of(HCL_TEMPLATE, "hcl")
    runtime = parse_hcl_report(hcl).runtime_data
    # Change one base64url letter of the AK modulus: still valid JSON and a valid key, but no
    # longer what REPORT_DATA commits to.
    index = hcl.find(runtime) + runtime.find(b'"n":"') + 5
    while not chr(hcl[index]).isalpha():
        index += 1
    bad = bytearray(hcl)
    bad[index] = ord(chr(hcl[index]).swapcase())
    out = _assert_reject(_run_with(HCL_TEMPLATE, "--hcl-report", bytes(bad), tmp_path), 4)
    assert out["error"]["type"] == "BindingError"
    assert out["error"]["check"] == "hcl.runtime_data_binding"


# -- malformed inputs --------------------------------------------------------------------------


def _garbage(kind: str, original: bytes) -> bytes:
    rng = random.Random(f"{kind}/{len(original)}")
    return {
        "empty": b"",
        "truncated": original[: len(original) // 2],
        "truncated-by-one": original[:-1],
        "random": rng.randbytes(len(original)),
        "random-short": rng.randbytes(37),
    }[kind]


GARBAGE = ["empty", "truncated", "truncated-by-one", "random", "random-short"]
GARBAGE_INPUTS = [
    ("snp-milan-v2-trustee", "--report", "report"),
    ("snp-milan-v2-trustee", "--vcek", "vcek"),
    ("snp-milan-v2-trustee", "--cert-chain", "chain"),
    ("snp-genoa-v3-azure-trustee", "--hcl-report", "hcl"),
    ("tdx-v4-trustee-4", "--quote", "quote"),
    ("tdx-v4-phala-uptodate", "--collateral", "collateral_phala"),
]
# Quotes and HCL reports end in padding (parsed by structure, not file length), and a PEM file
# without its final newline holds the same certificates: dropping their last byte is harmless.
_HARMLESS = {("--quote", "truncated-by-one"), ("--hcl-report", "truncated-by-one")}
_HARMLESS |= {("--cert-chain", "truncated-by-one")}


@pytest.mark.parametrize(
    ("vector_id", "flag", "role", "kind"),
    [
        (*case, kind)
        for case in GARBAGE_INPUTS
        for kind in GARBAGE
        if (case[1], kind) not in _HARMLESS
    ],
)
def test_malformed_inputs_exit_3(
    vector_id: str, flag: str, role: str, kind: str, tmp_path: Path
) -> None:
    v = vectors.vector(vector_id)
    original = vectors.file_of(v, role)
    out = _assert_reject(_run_with(v, flag, _garbage(kind, original), tmp_path), 3)
    assert out["error"]["message"]


@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
def test_malformed_pcs_collateral_exits_3(kind: str, tmp_path: Path) -> None:
    v = vectors.vector("tdx-v4-trustee-4")
    pcs = v["files"]["collateral_pcs"]
    for flag, role in (("--tcb-info", "tcb_info"), ("--qe-identity", "qe_identity")):
        original = vectors.read(pcs[role]["path"])
        _assert_reject(_run_with(v, flag, _garbage(kind, original), tmp_path), 3)


def test_show_exits_3_on_malformed_input(tmp_path: Path) -> None:
    for name, flag, platform in (
        ("report.bin", "--report", "sev-snp"),
        ("quote.bin", "--quote", "tdx"),
        ("hcl.bin", "--hcl-report", "sev-snp"),
    ):
        bad = tmp_path / name
        bad.write_bytes(b"\x01" * 100)
        run = u.show("--platform", platform, flag, bad, "--json")
        assert run.exit_code == 3, run.stdout
        out = run.json()
        assert "verdict" not in out
        assert out["error"]["class"] == "malformed"
        human = u.show("--platform", platform, flag, bad)
        assert human.exit_code == 3
        assert "error:" in human.stderr
        assert "Traceback" not in human.stdout + human.stderr


def test_show_evidence_exits_3_on_malformed_document(tmp_path: Path) -> None:
    doc = tmp_path / "evidence.json"
    doc.write_bytes(b'{"format": "cube-evidence/1"}')
    run = u.show("--evidence", doc, "--json")
    assert run.exit_code == 3
    assert run.json()["error"]["class"] == "malformed"


# -- mismatched inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector_id", "chain"),
    [
        ("snp-milan-v2-trustee", "roots/amd/ask_ark_genoa.pem"),
        ("snp-genoa-v5-oak", "roots/amd/ask_ark_milan.pem"),
        ("snp-turin-v5-oak", "roots/amd/ask_ark_genoa.pem"),
        ("snp-milan-v3-oak", "roots/amd/ask_ark_turin.pem"),
    ],
)
def test_wrong_product_chain_exits_4(vector_id: str, chain: str, tmp_path: Path) -> None:
    v = vectors.vector(vector_id)
    out = _assert_reject(_run_with(v, "--cert-chain", vectors.read(chain), tmp_path), 4)
    assert out["error"]["type"] == "CertificateChainError"


def test_vcek_of_another_chip_exits_4(tmp_path: Path) -> None:
    other = vectors.file_of(vectors.vector("snp-milan-v2-virtee"), "vcek")
    out = _assert_reject(_run_with(SNP_TEMPLATE, "--vcek", other, tmp_path), 4)
    assert out["error"]["check"] in ("snp.report.signature", "snp.chip_id")


def test_collateral_of_another_platform_exits_4(tmp_path: Path) -> None:
    # Phala's collateral is for FMSPC 90c06f000000; trustee-4's PCK names 50806f000000.
    v = vectors.vector("tdx-v4-trustee-4")
    phala = vectors.vector("tdx-v4-phala-uptodate")
    coll = tmp_path / "coll.json"
    coll.write_bytes(vectors.file_of(phala, "collateral_phala"))
    run = u.verify(
        "--platform", "tdx", "--quote", vectors.path(v["files"]["quote"]["path"]),
        "--collateral", coll, *u.at(vectors.time_inside(phala)), "--json",
    )  # fmt: skip
    assert run.exit_code in (4, 6), run.stdout
    assert run.json()["verdict"] == "reject"


def test_sim_platform_refuses_real_evidence_and_real_platform_refuses_sim(tmp_path: Path) -> None:
    # Real AMD evidence checked against the simulator's roots fails the chain ...
    args = u.snp_args(SNP_TEMPLATE, tmp_path)
    args[args.index("sev-snp")] = "sim-sev-snp"
    at = u.at(vectors.time_inside(SNP_TEMPLATE))
    refused = u.verify(*args, *at, "--json")
    assert refused.exit_code == 5  # ... but first: simulated evidence is not allowed by default
    assert refused.json()["error"]["type"] == "SimulatedEvidenceError"
    allowed = u.verify(*args, *at, "--json", "--allow-simulated")
    assert allowed.exit_code == 4, allowed.stdout
    assert allowed.json()["error"]["class"] == "signature"


# -- usage errors ------------------------------------------------------------------------------


def _usage(*args: str | Path) -> u.CliRun:
    run = u.verify(*args)
    assert run.exit_code == 2, (args, run.stdout)
    assert "Traceback" not in run.stdout + run.stderr
    assert "Usage:" in run.stderr or "Error:" in run.stderr
    return run


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    snp = vectors.path(SNP_TEMPLATE["files"]["report"]["path"])
    vcek = vectors.path(SNP_TEMPLATE["files"]["vcek"]["path"])
    quote = vectors.path(TDX_TEMPLATE["files"]["quote"]["path"])
    coll = vectors.path(TDX_TEMPLATE["files"]["collateral_phala"]["path"])
    pcs = vectors.vector("tdx-v4-trustee-4")["files"]["collateral_pcs"]
    tcb_info = vectors.path(pcs["tcb_info"]["path"])
    qe_identity = vectors.path(pcs["qe_identity"]["path"])
    doc = tmp_path / "doc.json"
    doc.write_text("{}")

    run = _usage("--platform", "sev-snp", "--report", snp)
    assert "--vcek" in run.stderr
    _usage("--platform", "sev-snp", "--vcek", vcek)  # no report
    hcl = vectors.path(HCL_TEMPLATE["files"]["hcl"]["path"])
    run = _usage("--platform", "sev-snp", "--report", snp, "--hcl-report", hcl, "--vcek", vcek)
    assert "not both" in run.stderr
    run = _usage("--evidence", doc)
    assert "--nonce" in run.stderr
    _usage("--evidence", doc, "--nonce", "00" * 32, "--platform", "sev-snp")
    run = _usage(
        "--platform", "tdx", "--quote", quote, "--collateral", coll,
        "--tcb-info", tcb_info, "--qe-identity", qe_identity,
    )  # fmt: skip
    assert "not both" in run.stderr
    _usage("--platform", "tdx", "--quote", quote, "--tcb-info", tcb_info)  # no QE identity
    # Empty files are still given: "not both" must not depend on their content.
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    _usage(
        "--platform", "tdx", "--quote", quote, "--collateral", coll,
        "--tcb-info", empty, "--qe-identity", empty,
    )  # fmt: skip
    # CRLs without PCS collateral would be silently ignored.
    pck_crl = vectors.path(pcs["pck_crl"]["path"])
    run = _usage("--platform", "tdx", "--quote", quote, "--collateral", coll, "--pck-crl", pck_crl)
    assert "--pck-crl" in run.stderr
    _usage("--platform", "tdx", "--quote", quote, "--root-crl", pck_crl)
    _usage("--platform", "tdx", "--collateral", coll)  # no quote
    _usage("--platform", "sev-snp", "--report", tmp_path / "missing.bin", "--vcek", vcek)
    _usage("--platform", "tdx", "--quote", quote, "--collateral", tmp_path / "missing.json")
    _usage("--report", snp, "--vcek", vcek)  # no platform
    _usage("--platform", "vtpm")
    _usage("--platform", "sgx", "--report", snp, "--vcek", vcek)
    _usage("--platform", "sev-snp", "--report", snp, "--vcek", vcek, "--at", "not-a-time")
    _usage("--platform", "sev-snp", "--report", snp, "--vcek", vcek, "--no-such-flag")
    _usage("--platform", "sev-snp", "--report", tmp_path, "--vcek", vcek)  # a directory


def test_show_usage_errors_exit_2() -> None:
    run = u.show("--platform", "tdx")
    assert run.exit_code == 2
    # `show` needs no VCEK: it verifies nothing.
    snp = vectors.path(SNP_TEMPLATE["files"]["report"]["path"])
    assert u.show("--platform", "sev-snp", "--report", snp).exit_code == 0
    # Nor does it take what decides a verdict (it was accepted and ignored, --at unparsed).
    for flag in (("--policy", snp), ("--explain",), ("--at", "garbage"), ("--allow-simulated",)):
        refused = u.show("--platform", "sev-snp", "--report", snp, *flag)
        assert refused.exit_code == 2, flag
        assert "No such option" in refused.stderr + refused.stdout


def test_invalid_policy_file_is_malformed(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "cube-policy/1", "surprise": True}))
    args = u.snp_args(SNP_TEMPLATE, tmp_path)
    run = u.verify(*args, *u.at(vectors.time_inside(SNP_TEMPLATE)), "--policy", policy, "--json")
    out = _assert_reject(run, 3)
    assert out["error"]["type"] == "InvalidPolicyError"
    assert "surprise" in out["error"]["message"]


def test_policy_refusing_the_platform_exits_5(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "cube-policy/1", "platforms": ["tdx"]}))
    args = u.snp_args(SNP_TEMPLATE, tmp_path)
    run = u.verify(*args, *u.at(vectors.time_inside(SNP_TEMPLATE)), "--policy", policy, "--json")
    out = _assert_reject(run, 5)
    assert out["error"]["check"] == "policy.platform"


def test_policy_pinning_another_measurement_exits_5(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps({"format": "cube-policy/1", "sev_snp": {"measurements": ["ab" * 48]}})
    )
    args = u.snp_args(SNP_TEMPLATE, tmp_path)
    at = u.at(vectors.time_inside(SNP_TEMPLATE))
    out = _assert_reject(u.verify(*args, *at, "--policy", policy, "--json"), 5)
    assert out["error"]["check"] == "snp.policy.measurement"
    policy.write_text(
        json.dumps(
            {
                "format": "cube-policy/1",
                "sev_snp": {"measurements": ["ab" * 48, SNP_TEMPLATE["parsed"]["measurement"]]},
            }
        )
    )
    assert u.verify(*args, *at, "--policy", policy).exit_code == 0
    # ... unless it is revoked.
    policy.write_text(
        json.dumps(
            {
                "format": "cube-policy/1",
                "revoked_measurements": [SNP_TEMPLATE["parsed"]["measurement"]],
            }
        )
    )
    out = _assert_reject(u.verify(*args, *at, "--policy", policy, "--json"), 5)
    assert out["error"]["check"] == "policy.revoked_measurements"


# -- --explain and the human output ------------------------------------------------------------


@pytest.mark.parametrize(
    "v",
    [SNP_TEMPLATE, TDX_TEMPLATE, vectors.vector("snp-milan-v2-go-sev-guest")],
    ids=lambda v: str(v["id"]),
)
def test_explain_prints_every_check_with_expected_and_actual(
    v: dict[str, Any], tmp_path: Path
) -> None:
    args = [*u.vector_args(v, tmp_path), *u.at(vectors.time_inside(v))]
    checks = u.verify(*args, "--json").json()["checks"]
    run = u.verify(*args, "--explain")
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ACCEPT: " if run.exit_code == 0 else "REJECT: ")
    start = lines.index("checks:") + 1
    marks = [i for i in range(start, len(lines)) if lines[i].lstrip().startswith(("✓", "✗"))]
    assert len(marks) == len(checks)
    for i, check in zip(marks, checks, strict=True):
        head = lines[i].strip()
        assert head.startswith(("✓ " if check["passed"] else "✗ ") + check["name"])
        block = lines[i + 1 : [*marks, len(lines)][marks.index(i) + 1]]
        if "expected" in check:
            assert f"      expected: {check['expected']}" in block
        if "actual" in check:
            assert f"      actual:   {check['actual']}" in block
    assert any(c.get("expected") is not None for c in checks)
    assert any(c.get("actual") is not None for c in checks)
    without = u.verify(*args)
    assert without.exit_code == run.exit_code
    assert "checks:" not in without.stdout


def test_human_output_names_the_failure_class(tmp_path: Path) -> None:
    v = vectors.vector("snp-milan-v2-go-sev-guest")
    run = u.verify(*u.snp_args(v, tmp_path), *u.at(vectors.time_inside(v)))
    assert run.exit_code == 5
    assert run.stdout.startswith("REJECT: sev-snp")
    assert "policy error:" in run.stdout
    assert "measurement: " + v["parsed"]["measurement"] in run.stdout
