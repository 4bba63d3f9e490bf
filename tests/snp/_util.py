"""Helpers shared by the SNP tests: vector access and freshly signed test reports."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from attestation.azure import parse_hcl_report
from attestation.snp import SnpTrustRoots, parse_report
from tests import vectors
from tests.snp.fakepki import INSIDE, fake_amd, patch, sign_report

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.DOTALL)


def snp_vectors() -> list[dict[str, Any]]:
    return vectors.vectors(kind="sev-snp")


def ids(vs: list[dict[str, Any]]) -> list[str]:
    return [v["id"] for v in vs]


def report_bytes(v: dict[str, Any]) -> bytes:
    """The raw SNP report of a vector (extracted from the HCL report for Azure vectors)."""
    if "report" in v["files"]:
        return vectors.file_of(v, "report")
    return parse_hcl_report(vectors.file_of(v, "hcl")).tee_report


def vcek_and_chain(v: dict[str, Any]) -> tuple[bytes, bytes]:
    """(VCEK, chain) of a vector; a single bundle file (VCEK, ASK, ARK) is split."""
    vcek = vectors.file_of(v, "vcek")
    chain = vectors.file_of(v, "chain")
    if v["files"]["vcek"]["path"] == v["files"]["chain"]["path"]:
        blocks = _PEM_BLOCK.findall(vcek)
        return blocks[0], b"".join(blocks[1:])
    return vcek, chain


@dataclass(frozen=True)
class Signed:
    """A report signed by the fake AMD PKI, with what verifying it needs."""

    report: bytes
    vcek: bytes
    chain: bytes
    roots: SnpTrustRoots
    now: datetime


TEMPLATE_ID = "snp-milan-v3-oak"  # Milan, report v3 (CPUID names the product)


def signed_report(
    *,
    policy: int | None = None,
    vlek: bool = False,
    mask_chip_key: bool = False,
    author_key_en: bool = False,
    vmpl: int | None = None,
    chip_id: bytes | None = None,
    leaf_tcb: dict[str, int] | None = None,
    hwid: bytes | None = None,
    omit_hwid: bool = False,
    **leaf_kwargs: Any,
) -> Signed:
    """Re-sign the template vector's report with the fake PKI after patching fields."""
    body = vectors.file_of(vectors.vector(TEMPLATE_ID), "report")
    if policy is not None:
        body = patch(body, 0x08, struct.pack("<Q", policy))
    if vmpl is not None:
        body = patch(body, 0x30, struct.pack("<I", vmpl))
    flags = int(author_key_en) | int(mask_chip_key) << 1 | int(vlek) << 2
    body = patch(body, 0x48, struct.pack("<I", flags))
    if chip_id is not None:
        body = patch(body, 0x1A0, chip_id)
    elif mask_chip_key or vlek:
        body = patch(body, 0x1A0, bytes(64))
    parsed = parse_report(body)
    tcb = leaf_tcb or parsed.reported_tcb.components()
    if omit_hwid or vlek:
        leaf_hwid = None
    else:
        leaf_hwid = hwid if hwid is not None else parse_report(body).chip_id
    pki = fake_amd("Milan")
    key, vcek = pki.leaf(tcb=tcb, hwid=leaf_hwid, vlek=vlek, **leaf_kwargs)
    return Signed(
        report=sign_report(body, key),
        vcek=vcek,
        chain=pki.chain_pem(vlek=vlek),
        roots=pki.roots(),
        now=INSIDE,
    )
