"""The vTPM vectors of MANIFEST.json as ready-to-verify quote cases."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.serialization import load_der_public_key

from attestation.azure import parse_hcl_report
from attestation.tpm import AkKey, TpmtSignature, parse_public, signature_from_raw
from tests import vectors
from tests.tpm._protobuf import parse_gotpm_attestation

BANK_NAMES = {4: "sha1", 11: "sha256", 12: "sha384", 13: "sha512"}


@dataclass(frozen=True)
class QuoteCase:
    id: str  # vector id, with "#n" for the n-th quote of a multi-quote vector
    vector: dict[str, Any] = field(repr=False)
    attest: bytes = field(repr=False)
    signature: bytes | TpmtSignature = field(repr=False)
    ak: AkKey = field(repr=False)
    pcrs: Mapping[str, Mapping[int, bytes]] = field(repr=False)
    qualifying_data: bytes
    expected: dict[str, Any] = field(repr=False)  # the manifest entry for this quote
    event_log: bytes | None = field(default=None, repr=False)


def _azure_case(
    case_id: str, v: dict[str, Any], quote: dict[str, Any], hcl: bytes, expected: dict[str, Any]
) -> QuoteCase:
    def as_bytes(x: object) -> bytes:
        return bytes(x) if isinstance(x, list) else bytes.fromhex(str(x))

    pcrs = {i: as_bytes(p) for i, p in enumerate(quote["pcrs"])}
    attest = as_bytes(quote["message"])
    return QuoteCase(
        id=case_id,
        vector=v,
        attest=attest,
        signature=signature_from_raw(as_bytes(quote["signature"])),  # bare RSASSA-SHA256
        ak=parse_hcl_report(hcl).ak_public,
        pcrs={"sha256": pcrs},
        qualifying_data=bytes.fromhex(expected["attest"]["extra_data"]),
        expected=expected,
    )


@cache
def cases() -> tuple[QuoteCase, ...]:
    out: list[QuoteCase] = []

    v = vectors.vector("tpm-azure-snp-genoa-vtpm")
    doc = json.loads(vectors.file_of(v, "evidence_json"))
    out.append(_azure_case(v["id"], v, doc["quote"], bytes(doc["report"]), v))

    v = vectors.vector("tpm-azure-snp-milan-vtpm")
    quote = json.loads(vectors.file_of(v, "tpm_quote_json"))
    out.append(_azure_case(v["id"], v, quote, vectors.file_of(v, "hcl"), v))

    v = vectors.vector("tdx-v4-azure-trustee")
    quote = json.loads(vectors.file_of(v, "tpm_quote_json"))
    out.append(_azure_case(v["id"] + "/tpm", v, quote, vectors.file_of(v, "hcl"), v["tpm"]))

    for vid, nonce in (("tpm-gce-cos85-nonce", b"\x90\x09"), ("tpm-gce-cos85-no-nonce", b"")):
        v = vectors.vector(vid)
        att = parse_gotpm_attestation(vectors.file_of(v, "pb"))
        ak = parse_public(att.ak_pub)
        assert len(att.quotes) == len(v["quotes"])
        for n, (q, expected) in enumerate(zip(att.quotes, v["quotes"], strict=True)):
            out.append(
                QuoteCase(
                    id=f"{vid}#{n}",
                    vector=v,
                    attest=q.attest,
                    signature=q.signature,
                    ak=ak,
                    pcrs={BANK_NAMES[q.bank_alg]: q.pcrs},
                    qualifying_data=nonce,
                    expected=expected,
                    event_log=att.event_log,
                )
            )

    v = vectors.vector("tpm-swtpm-trustee")
    doc = json.loads(vectors.file_of(v, "evidence_json"))
    out.append(
        QuoteCase(
            id=v["id"],
            vector=v,
            attest=base64.b64decode(doc["tpm_quote"]["message"]),
            signature=base64.b64decode(doc["tpm_quote"]["signature"]),  # a TPMT_SIGNATURE
            ak=load_der_public_key(base64.b64decode(doc["ak_public"])),  # type: ignore[arg-type]
            pcrs={"sha256": {i: bytes.fromhex(p) for i, p in enumerate(doc["tpm_quote"]["pcrs"])}},
            qualifying_data=bytes.fromhex(v["attest"]["extra_data"]),
            expected=v,
        )
    )
    return tuple(out)


def case(case_id: str) -> QuoteCase:
    for c in cases():
        if c.id == case_id:
            return c
    raise KeyError(case_id)


def tpm_vector_ids() -> list[str]:
    return [v["id"] for v in vectors.vectors(kind="tpm")]
