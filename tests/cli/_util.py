"""Helpers for the ``cube attest`` tests: invoking the CLI and turning manifest vectors into
command lines and expectations."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from attestation import tdx
from cube.cli import cube
from tests import vectors

SNP_VECTORS = vectors.vectors(kind="sev-snp")
TDX_VECTORS = vectors.vectors(kind="tdx")
SNP_IDS = [v["id"] for v in SNP_VECTORS]
TDX_IDS = [v["id"] for v in TDX_VECTORS]

#: Fields ``--json`` must carry, with the manifest's representation (issue: CLI).
SNP_REQUIRED = (
    "version",
    "policy",
    "vmpl",
    "measurement",
    "report_data",
    "host_data",
    "chip_id",
    "reported_tcb",
    "product",
)
TDX_REQUIRED = (
    "mr_td",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "report_data",
    "mr_seam",
    "td_attributes",
    "xfam",
)
#: TCB statuses no policy may accept.
NEVER_ACCEPTED = ("TcbNotSupported", "Revoked")

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.DOTALL)


@dataclass(frozen=True)
class CliRun:
    """One finished ``cube`` invocation."""

    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


def invoke(*args: str | Path) -> CliRun:
    """Run ``cube ARGS`` in-process (click's runner); exceptions are not swallowed."""
    runner = CliRunner()
    result: Result = runner.invoke(cube, [str(a) for a in args], catch_exceptions=False)
    return CliRun(result.exit_code, result.stdout, result.stderr)


def verify(*args: str | Path) -> CliRun:
    return invoke("attest", "verify", *args)


def show(*args: str | Path) -> CliRun:
    return invoke("attest", "show", *args)


def at(when: datetime) -> list[str]:
    return ["--at", when.isoformat()]


def _path(rel: str) -> Path:
    return vectors.path(rel)


# -- SEV-SNP -----------------------------------------------------------------------------------


def snp_args(v: dict[str, Any], workdir: Path) -> list[str]:
    """``--platform sev-snp`` inputs for a vector: the report (or the Azure HCL report), the
    VCEK and the manifest's chain file. A single VCEK+ASK+ARK bundle is split, since ``--vcek``
    takes exactly one certificate."""
    files = v["files"]
    args = ["--platform", "sev-snp"]
    if v["check"] == "snp_azure":
        args += ["--hcl-report", str(_path(files["hcl"]["path"]))]
    else:
        args += ["--report", str(_path(files["report"]["path"]))]
    if files["vcek"]["path"] == files["chain"]["path"]:
        blocks = _PEM_BLOCK.findall(vectors.file_of(v, "vcek"))
        assert len(blocks) == 3, "expected a VCEK, ASK, ARK bundle"
        vcek = workdir / f"{v['id']}-vcek.pem"
        chain = workdir / f"{v['id']}-chain.pem"
        vcek.write_bytes(blocks[0])
        chain.write_bytes(b"".join(blocks[1:]))
        args += ["--vcek", str(vcek), "--cert-chain", str(chain)]
    else:
        args += ["--vcek", str(_path(files["vcek"]["path"]))]
        args += ["--cert-chain", str(_path(files["chain"]["path"]))]
    return args


def snp_debug(v: dict[str, Any]) -> bool:
    """Guest policy bit 19 (DEBUG)."""
    return bool(int(v["parsed"]["policy"], 16) >> 19 & 1)


def snp_expected_exit(v: dict[str, Any]) -> int:
    """The default policy refuses debug guests (policy, exit 5); everything else verifies."""
    assert v["expected_verdict"] == "accept"
    return 5 if snp_debug(v) else 0


def snp_expected_fields(v: dict[str, Any]) -> dict[str, Any]:
    parsed = v["parsed"]
    return {key: parsed[key] for key in SNP_REQUIRED}


# -- TDX ---------------------------------------------------------------------------------------


def _pcs_qe_identity_body(signed: tdx.SignedJson) -> bytes:
    return (
        b'{"enclaveIdentity":'
        + signed.body
        + b',"signature":"'
        + signed.signature.hex().encode()
        + b'"}'
    )


def _mixed_collateral_json(v: dict[str, Any]) -> bytes:
    """tdx-v5-go-tdx-guest: TCB info from a PCS response; QE identity, CRLs and chains from a
    dcap-qvl JSON (MANIFEST ``collateral_pcs.from_phala``). Written as one dcap-qvl JSON document
    carrying the PCS TCB info's exact signed text and signature, so ``--collateral`` takes it."""
    pcs = v["files"]["collateral_pcs"]
    donor_raw = vectors.read(pcs["from_phala"]["path"])
    donor = tdx.Collateral.from_json(donor_raw)
    own = tdx.Collateral.from_pcs(
        vectors.read(pcs["tcb_info"]["path"]), _pcs_qe_identity_body(donor.qe_identity_signed)
    )
    document: dict[str, Any] = json.loads(donor_raw)
    document["tcb_info"] = own.tcb_info_signed.body.decode()
    document["tcb_info_signature"] = own.tcb_info_signed.signature.hex()
    return json.dumps(document).encode()


def tdx_args(v: dict[str, Any], workdir: Path) -> list[str]:
    """``--platform tdx`` inputs: the quote plus the vector's collateral in the form its
    ``files`` map names (dcap-qvl JSON via ``--collateral``, PCS bodies via ``--tcb-info`` ...)."""
    files = v["files"]
    args = ["--platform", "tdx", "--quote", str(_path(files["quote"]["path"]))]
    if "hcl" in files:  # Azure: REPORTDATA commits to the HCL runtime data
        args += ["--hcl-report", str(_path(files["hcl"]["path"]))]
    if "collateral_phala" in files:
        args += ["--collateral", str(_path(files["collateral_phala"]["path"]))]
    elif "collateral_pcs" in files:
        pcs = files["collateral_pcs"]
        if "from_phala" in pcs:
            mixed = workdir / f"{v['id']}-collateral.json"
            mixed.write_bytes(_mixed_collateral_json(v))
            args += ["--collateral", str(mixed)]
        else:
            for role, flag in (
                ("tcb_info", "--tcb-info"),
                ("qe_identity", "--qe-identity"),
                ("pck_crl", "--pck-crl"),
                ("root_crl", "--root-crl"),
            ):
                if role in pcs:
                    args += [flag, str(_path(pcs[role]["path"]))]
    return args


def tdx_status(v: dict[str, Any]) -> str | None:
    """The TCB status the manifest expects (None: no collateral, TCB not evaluated)."""
    if "collateral" not in v:
        return None
    c = v["collateral"]
    status: str = c.get("expected_overall_status") or c["tcb_status"]["platform_status"]
    return status


def tdx_debug(v: dict[str, Any]) -> bool:
    """TD_ATTRIBUTES bit 0 (DEBUG); the manifest shows TD_ATTRIBUTES little-endian as hex."""
    return bool(bytes.fromhex(v["parsed"]["td_report"]["td_attributes"])[0] & 1)


def tdx_expected_exit(v: dict[str, Any]) -> int:
    """Under the default policy: only UpToDate (or no collateral offline) and no debug TD."""
    status = tdx_status(v)
    if status is not None and status != "UpToDate":
        return 5
    return 5 if tdx_debug(v) else 0


def tdx_expected_fields(v: dict[str, Any]) -> dict[str, Any]:
    td = v["parsed"]["td_report"]
    return {key: td[key] for key in TDX_REQUIRED}


def vector_args(v: dict[str, Any], workdir: Path) -> list[str]:
    return snp_args(v, workdir) if v["kind"] == "sev-snp" else tdx_args(v, workdir)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)
