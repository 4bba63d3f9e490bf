"""Parsing Intel collateral: the dcap-qvl JSON, raw PCS bodies, CRLs; strictness."""

from __future__ import annotations

import base64
import builtins
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from attestation import _der, tdx
from attestation._x509 import MAX_CRL_SIZE
from attestation.errors import MalformedError
from tests import vectors
from tests.tdx._util import der_tlv, synthetic_crl

PHALA = vectors.vector("tdx-v4-phala-uptodate")
PHALA_JSON = vectors.read(PHALA["files"]["collateral_phala"]["path"])
GO = vectors.vector("tdx-v4-go-tdx-guest-spr-e4")["files"]["collateral_pcs"]
TCB_BODY = vectors.read(GO["tcb_info"]["path"])
QE_BODY = vectors.read(GO["qe_identity"]["path"])
PCK_CRL = vectors.read(GO["pck_crl"]["path"])
ROOT_CRL = vectors.read(GO["root_crl"]["path"])


def _doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(PHALA_JSON)
    return data


def _from_doc(doc: dict[str, Any]) -> tdx.Collateral:
    return tdx.Collateral.from_json(json.dumps(doc).encode())


def test_from_json_parses_every_part() -> None:
    c = tdx.Collateral.from_json(PHALA_JSON)
    assert c.source == "dcap-qvl-json"
    assert c.tcb_info.id == "TDX" and c.tcb_info.version == 3
    assert c.tcb_info.fmspc == bytes.fromhex("b0c06f000000")
    assert c.tcb_info.pce_id == b"\x00\x00"
    assert [m.id for m in c.tcb_info.tdx_module_identities] == ["TDX_03", "TDX_01"]
    assert len(c.tcb_info.tcb_levels) == 2
    assert c.tcb_info.tcb_levels[1].advisory_ids[0] == "INTEL-SA-00106"
    assert c.qe_identity.id == "TD_QE" and c.qe_identity.isvprodid == 2
    assert c.tcb_info_signed.body == _doc()["tcb_info"].encode()
    assert c.qe_identity_signed.body == _doc()["qe_identity"].encode()
    assert not c.tcb_info_signed.embedded_chain
    assert [x.describe() for x in c.tcb_info_signed.issuer_chain] == [
        "Intel SGX TCB Signing",
        "Intel SGX Root CA",
    ]
    assert c.pck_crl is not None and len(c.pck_crl.revoked_serials) == 44
    assert c.root_crl is not None and len(c.root_crl.revoked_serials) == 0
    assert c.pck_crl_issuer_chain is not None
    assert c.tcb_info.issue_date == datetime(2025, 6, 19, 10, 16, 3, tzinfo=UTC)
    json.dumps(c.fields())


def test_from_json_is_cached_by_bytes() -> None:
    assert tdx.Collateral.from_json(PHALA_JSON) is tdx.Collateral.from_json(bytes(PHALA_JSON))


def test_from_pcs_parses_and_defaults_to_the_shipped_chain() -> None:
    c = tdx.Collateral.from_pcs(TCB_BODY, QE_BODY, PCK_CRL, ROOT_CRL)
    assert c.source == "pcs"
    assert c.tcb_info_signed.embedded_chain and c.qe_identity_signed.embedded_chain
    assert c.tcb_info_signed.issuer_chain == tdx.embedded_tcb_signing_chain()
    raw = TCB_BODY.decode()
    assert c.tcb_info_signed.body.decode() in raw
    assert c.tcb_info_signed.body.startswith(b'{"id":"TDX"')
    assert c.tcb_info_signed.body.endswith(b"}")
    assert c.tcb_info_signed.signature.hex() == json.loads(TCB_BODY)["signature"]
    assert c.pck_crl is not None and c.pck_crl.issuer.get("CN") == "Intel SGX PCK Platform CA"
    assert c.root_crl is not None and c.root_crl.issuer.get("CN") == "Intel SGX Root CA"


def test_shipped_trust_anchors_are_the_vector_roots() -> None:
    assert tdx.embedded_root().der == tdx.embedded_tcb_signing_chain()[1].der
    assert (
        tdx.embedded_root().sha256.hex()
        == "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )
    shipped = vectors.read("roots/intel/intel-sgx-root-ca.pem")
    assert (
        tdx.embedded_root().der
        == tdx.parse_quote(vectors.file_of(PHALA, "quote")).pck_chain[-1].der
    )
    assert b"BEGIN CERTIFICATE" in shipped


def test_pcs_trustee_bodies() -> None:
    pcs = vectors.vector("tdx-v4-trustee-6-module3")["files"]["collateral_pcs"]
    c = tdx.Collateral.from_pcs(
        vectors.read(pcs["tcb_info"]["path"]), vectors.read(pcs["qe_identity"]["path"])
    )
    assert c.pck_crl is None and c.root_crl is None
    assert c.tcb_info.fmspc.hex() == "00a06d080000"


@pytest.mark.parametrize("form", ["der", "pem", "hex"])
def test_crl_encodings(form: str) -> None:
    der = PCK_CRL
    data = {
        "der": der,
        "pem": b"-----BEGIN X509 CRL-----\n"
        + base64.encodebytes(der)
        + b"-----END X509 CRL-----\n",
        "hex": der.hex().encode(),
    }[form]
    crl = tdx.parse_crl(data)
    assert crl.der == der
    assert crl.this_update == datetime(2023, 6, 8, 7, 27, 52, tzinfo=UTC)
    assert len(crl.revoked_serials) == 44


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x00", b"zz", b"-----BEGIN X509 CRL-----\n!!\n-----END X509 CRL-----"],
)
def test_bad_crls(data: bytes) -> None:
    with pytest.raises(MalformedError):
        tdx.parse_crl(data)


def test_crl_truncations() -> None:
    for cut in range(0, len(ROOT_CRL), 11):
        with pytest.raises(MalformedError):
            tdx.parse_crl(ROOT_CRL[:cut])


# ---------------------------------------------------------------------------------------------
# Strictness: the JSON document
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(_doc()))
def test_missing_json_key(key: str) -> None:
    doc = _doc()
    del doc[key]
    with pytest.raises(MalformedError):
        _from_doc(doc)


def test_unknown_json_key() -> None:
    doc = _doc()
    doc["extra"] = "x"
    with pytest.raises(MalformedError, match="unknown"):
        _from_doc(doc)


def test_pck_certificate_chain_key() -> None:
    doc = _doc()
    doc["pck_certificate_chain"] = None
    assert _from_doc(doc).tcb_info.fmspc.hex() == "b0c06f000000"
    doc["pck_certificate_chain"] = "-----BEGIN CERTIFICATE-----"
    with pytest.raises(MalformedError, match="pck_certificate_chain"):
        _from_doc(doc)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"a":1,"a":2}',
        b"{" * 100000,
        b'{"tcb_info": NaN}',
    ],
)
def test_not_a_collateral_document(data: bytes) -> None:
    with pytest.raises(MalformedError):
        tdx.Collateral.from_json(data)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tcb_info_signature", "00"),
        ("tcb_info_signature", "zz" * 64),
        ("qe_identity_signature", 5),
        ("pck_crl", "3082"),
        ("root_ca_crl", "not hex"),
        ("tcb_info_issuer_chain", "no pem here"),
        ("qe_identity_issuer_chain", ""),
        ("tcb_info", "{}"),
        ("tcb_info", "[]"),
        ("qe_identity", '{"id":"QE","version":2}'),
    ],
)
def test_bad_json_values(key: str, value: object) -> None:
    doc = _doc()
    doc[key] = value
    with pytest.raises(MalformedError):
        _from_doc(doc)


def _edit_tcb(edit: Any) -> None:
    doc = _doc()
    info = json.loads(doc["tcb_info"])
    edit(info)
    doc["tcb_info"] = json.dumps(info, separators=(",", ":"))
    _from_doc(doc)


@pytest.mark.parametrize(
    "edit",
    [
        lambda i: i.update(id="SGX"),
        lambda i: i.update(version=2),
        lambda i: i.update(tcbType=1),
        lambda i: i.update(fmspc="B0C06F"),
        lambda i: i.update(pceId=0),
        lambda i: i.update(issueDate="2025-06-19 10:16:03"),
        lambda i: i.update(nextUpdate="2020-01-01T00:00:00Z"),
        lambda i: i.update(extra=1),
        lambda i: i.pop("tdxModule"),
        lambda i: i.update(tcbLevels=[]),
        lambda i: i["tcbLevels"][0]["tcb"]["sgxtcbcomponents"].pop(),
        lambda i: i["tcbLevels"][0]["tcb"]["tdxtcbcomponents"].append({"svn": 0}),
        lambda i: i["tcbLevels"][0]["tcb"].update(pcesvn=-1),
        lambda i: i["tcbLevels"][0]["tcb"].update(pcesvn=True),
        lambda i: i["tcbLevels"][0].update(tcbStatus="Great"),
        lambda i: i["tcbLevels"][0].update(advisoryIDs=[1]),
        lambda i: i["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][0].update(svn=256),
        lambda i: i["tdxModuleIdentities"][0].update(id="TDX_3"),
        lambda i: i["tdxModuleIdentities"][0]["tcbLevels"][0].update(tcbStatus="SWHardeningNeeded"),
        lambda i: i["tdxModuleIdentities"].append(i["tdxModuleIdentities"][0]),
        lambda i: i["tdxModule"].update(mrsigner="00"),
    ],
)
def test_bad_tcb_info(edit: Any) -> None:
    with pytest.raises(MalformedError):
        _edit_tcb(edit)


def test_tcb_info_without_module_identities_is_fine() -> None:
    _edit_tcb(lambda i: i.pop("tdxModuleIdentities"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda q: q.update(id="TD_QE2"),
        lambda q: q.update(version=3),
        lambda q: q.update(miscselect="000000"),
        lambda q: q.update(attributesMask="FF"),
        lambda q: q.update(mrsigner="DC9E"),
        lambda q: q.update(isvprodid="2"),
        lambda q: q.update(tcbLevels=[]),
        lambda q: q["tcbLevels"][0].update(tcbStatus="ConfigurationNeeded"),
        lambda q: q["tcbLevels"][0]["tcb"].update(isvsvn=None),
        lambda q: q.update(unknown=None),
    ],
)
def test_bad_qe_identity(edit: Any) -> None:
    doc = _doc()
    identity = json.loads(doc["qe_identity"])
    edit(identity)
    doc["qe_identity"] = json.dumps(identity)
    with pytest.raises(MalformedError):
        _from_doc(doc)


# ---------------------------------------------------------------------------------------------
# Strictness: PCS bodies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b"[]",
        b'{"tcbInfo":{}}',
        b'{"signature":"00"}',
        TCB_BODY + b"{}",
        TCB_BODY.replace(b'{"tcbInfo":', b'{"tcbInfo":{"x":1},"tcbInfo":', 1),
        TCB_BODY.replace(b'"signature":', b'"extra":1,"signature":', 1),
        TCB_BODY.replace(b'{"tcbInfo":', b"{tcbInfo:", 1),
        TCB_BODY.replace(b'{"tcbInfo":', b'{"tcbInfo"', 1),
        TCB_BODY.replace(b',"signature"', b' "signature"', 1),
        TCB_BODY[:-3],
        b"\xff" + TCB_BODY,
    ],
)
def test_bad_pcs_tcb_info_bodies(body: bytes) -> None:
    with pytest.raises(MalformedError):
        tdx.Collateral.from_pcs(body, QE_BODY)


def test_pcs_qe_identity_with_tcb_info_key_is_rejected() -> None:
    with pytest.raises(MalformedError):
        tdx.Collateral.from_pcs(TCB_BODY, TCB_BODY)
    with pytest.raises(MalformedError):
        tdx.Collateral.from_pcs(QE_BODY, QE_BODY)


def test_pcs_bad_issuer_chain() -> None:
    with pytest.raises(MalformedError):
        tdx.Collateral.from_pcs(TCB_BODY, QE_BODY, issuer_chain=b"not a chain")


# ---------------------------------------------------------------------------------------------
# Lone surrogates: "\ud800" is valid JSON but no text; the signed strings are encoded as UTF-8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(_doc()))
def test_lone_surrogate_in_a_json_string_is_malformed_and_named(key: str) -> None:
    doc = _doc()
    doc[key] += "\ud800"
    with pytest.raises(MalformedError, match=f"{key}: a lone UTF-16 surrogate"):
        _from_doc(doc)


def test_lone_surrogate_inside_a_pcs_body_is_named_by_its_path() -> None:
    body = TCB_BODY.replace(b'"INTEL-SA-', b'"\\udc00INTEL-SA-', 1)
    with pytest.raises(MalformedError, match=r"tcbLevels\[\d+\]\.advisoryIDs\[0\]"):
        tdx.Collateral.from_pcs(body, QE_BODY)


def test_escaped_surrogate_pairs_are_text() -> None:
    doc = json.loads(TCB_BODY)
    doc["tcbInfo"]["tcbLevels"][0]["advisoryIDs"] = ["\U0001f600"]
    body = json.dumps(doc, separators=(",", ":")).encode()  # ASCII: "\ud83d\ude00"
    assert b"\\ud83d\\ude00" in body
    c = tdx.Collateral.from_pcs(body, QE_BODY)
    assert c.tcb_info.tcb_levels[0].advisory_ids == ("\U0001f600",)


# ---------------------------------------------------------------------------------------------
# Large CRLs: parsed in work linear in their size, and capped
# ---------------------------------------------------------------------------------------------


def test_a_50000_entry_crl_is_parsed_in_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the bytes the DER reader copies: re-slicing the rest of a SEQUENCE per element
    (the old reader) copies ~25 GB for this CRL; walking by offset copies a few times its size."""
    der = synthetic_crl(50_000)
    assert len(der) <= MAX_CRL_SIZE
    copied = 0
    make_node = _der.Node

    def counting_node(tag: int, raw: bytes, content: bytes) -> _der.Node:
        nonlocal copied
        copied += len(raw) + len(content)
        return make_node(tag, raw, content)

    def counting_bytes(data: bytes = b"") -> bytes:
        nonlocal copied
        copied += len(data)
        return builtins.bytes(data)

    monkeypatch.setattr(_der, "Node", counting_node)
    monkeypatch.setattr(_der, "bytes", counting_bytes, raising=False)
    crl = tdx.parse_crl(der)
    assert len(crl.revoked_serials) == 128
    assert copied < 32 * len(der), f"{copied} bytes copied for a {len(der)}-byte CRL"


def test_a_crl_larger_than_the_cap_is_refused_before_parsing() -> None:
    der = synthetic_crl(MAX_CRL_SIZE // 20 + 100)
    for form in (der, der.hex().encode()):
        with pytest.raises(MalformedError, match="larger than"):
            tdx.parse_crl(form)


@pytest.mark.parametrize(
    ("tag", "text", "expected"),
    [
        (_der.UTC_TIME, b"491231235959Z", datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
        (_der.UTC_TIME, b"500101000000Z", datetime(1950, 1, 1, tzinfo=UTC)),
        (_der.GENERALIZED_TIME, b"20500101000000Z", datetime(2050, 1, 1, tzinfo=UTC)),
    ],
)
def test_der_times(tag: int, text: bytes, expected: datetime) -> None:
    assert _der.decode_time(_der.Node(tag, der_tlv(tag, text), text)) == expected


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        (_der.UTC_TIME, b"5001010000Z"),  # no seconds
        (_der.UTC_TIME, b" 50101000000Z"),
        (_der.UTC_TIME, b"250101000000+"),
        (_der.UTC_TIME, b"251301000000Z"),  # month 13
        (_der.UTC_TIME, b"250101240000Z"),
        (_der.UTC_TIME, "25010100000\u0661Z".encode()),  # a non-ASCII digit
        (_der.GENERALIZED_TIME, b"00000101000000Z"),  # year 0
        (_der.GENERALIZED_TIME, b"20250101000000.5Z"),
        (_der.INTEGER, b"250101000000Z"),
    ],
)
def test_bad_der_times(tag: int, text: bytes) -> None:
    with pytest.raises(MalformedError):
        _der.decode_time(_der.Node(tag, der_tlv(tag, text), text))
