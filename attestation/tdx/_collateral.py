"""Intel DCAP collateral for TDX: TCB info, QE identity, CRLs and their issuer chains.

Two encodings are read:

* the dcap-qvl / Phala JSON (``QuoteCollateralV3``): ``tcb_info`` and ``qe_identity`` are JSON
  *strings* holding the exact signed JSON text, signatures and CRLs are hex, chains are PEM;
* raw Intel PCS responses: the TCB info body ``{"tcbInfo": {...}, "signature": "..."}``, the QE
  identity body ``{"enclaveIdentity": {...}, "signature": "..."}``, CRLs in DER (or PEM / hex),
  and the TCB Signing chain (which PCS sends in a response header) defaulting to the one shipped
  in ``attestation/tdx/trust/``.

The signed bytes are always the exact bytes of the JSON value as received, never re-serialised:
for PCS bodies that is the raw substring of the ``tcbInfo`` / ``enclaveIdentity`` value.
Parsing is strict (duplicate keys, unknown keys, wrong types and lengths are MalformedError) and
does no crypto; :func:`attestation.tdx.verify_quote` verifies. Parsed collateral is cached by its
exact input bytes (parsing is deterministic).
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Self

from attestation import _der
from attestation._json import lone_surrogate
from attestation._x509 import (
    MAX_CRL_SIZE,
    Certificate,
    Name,
    SignatureAlgorithm,
    load_certificate,
)
from attestation.errors import MalformedError
from attestation.tdx._util import format_time, load_pem_chain, parse_hex, parse_time

__all__ = [
    "MODULE_TCB_STATUSES",
    "TCB_STATUSES",
    "Collateral",
    "Crl",
    "IsvTcbLevel",
    "QeIdentity",
    "SignedJson",
    "TcbInfo",
    "TcbLevel",
    "TdxModule",
    "TdxModuleIdentity",
    "embedded_root",
    "embedded_tcb_signing_chain",
    "parse_crl",
]

#: The statuses a TCB info level may carry (Intel PCS API v4).
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
#: The statuses a TDX module identity or QE identity level may carry.
MODULE_TCB_STATUSES = ("UpToDate", "OutOfDate", "Revoked")

_MAX_INPUT = 4 * 1024 * 1024
_MODULE_ID = re.compile(r"TDX_[0-9A-Fa-f]{2}")
_JSON_WS = " \t\n\r"
_SIGNATURE_SIZE = 64
_ECDSA_ALGORITHMS = {
    "1.2.840.10045.4.3.2": SignatureAlgorithm("1.2.840.10045.4.3.2", "ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": SignatureAlgorithm("1.2.840.10045.4.3.3", "ecdsa", "sha384"),
}
_COLLATERAL_JSON_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


# --------------------------------------------------------------------------------------------
# Embedded trust material
# --------------------------------------------------------------------------------------------


def _trust_file(name: str) -> bytes:
    return resources.files("attestation.tdx.trust").joinpath(name).read_bytes()


@lru_cache(maxsize=1)
def embedded_root() -> Certificate:
    """The Intel SGX Root CA shipped with the package (the trust anchor)."""
    return load_certificate(_trust_file("intel-sgx-root-ca.pem"))


@lru_cache(maxsize=1)
def embedded_tcb_signing_chain() -> tuple[Certificate, ...]:
    """Intel SGX TCB Signing certificate + Intel SGX Root CA, shipped with the package."""
    return load_pem_chain(
        _trust_file("intel-sgx-tcb-signing-chain.pem"), what="embedded TCB Signing chain"
    )


# --------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _text(data: bytes, what: str) -> str:
    if len(data) > _MAX_INPUT:
        raise MalformedError(f"{what}: larger than {_MAX_INPUT} bytes")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"{what}: not UTF-8") from exc


def _loads(text: str, what: str) -> object:
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedError(f"{what}: not valid JSON ({exc})") from exc
    # The signed texts are re-encoded as UTF-8 to check their signatures.
    surrogate = lone_surrogate(value, text=text)
    if surrogate is not None:
        raise MalformedError(f"{what}: {surrogate}: a lone UTF-16 surrogate escape is not text")
    return value


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _raw_members(text: str, what: str) -> dict[str, tuple[object, str]]:
    """The members of a top-level JSON object with the exact source text of each value."""
    out: dict[str, tuple[object, str]] = {}
    try:
        pos = _skip_ws(text, 0)
        if text[pos : pos + 1] != "{":
            raise MalformedError(f"{what}: expected a JSON object")
        pos = _skip_ws(text, pos + 1)
        if text[pos : pos + 1] == "}":
            pos += 1
        else:
            while True:
                if text[pos : pos + 1] != '"':
                    raise MalformedError(f"{what}: expected a member name at offset {pos}")
                key, pos = _DECODER.raw_decode(text, pos)
                assert isinstance(key, str)
                pos = _skip_ws(text, pos)
                if text[pos : pos + 1] != ":":
                    raise MalformedError(f"{what}: expected ':' at offset {pos}")
                start = _skip_ws(text, pos + 1)
                value, end = _DECODER.raw_decode(text, start)
                if key in out:
                    raise MalformedError(f"{what}: duplicate key {key!r}")
                out[key] = (value, text[start:end])
                pos = _skip_ws(text, end)
                if text[pos : pos + 1] == ",":
                    pos = _skip_ws(text, pos + 1)
                    continue
                if text[pos : pos + 1] == "}":
                    pos += 1
                    break
                raise MalformedError(f"{what}: expected ',' or '}}' at offset {pos}")
        if _skip_ws(text, pos) != len(text):
            raise MalformedError(f"{what}: trailing data after the JSON object")
    except (ValueError, RecursionError) as exc:
        raise MalformedError(f"{what}: not valid JSON ({exc})") from exc
    return out


class _Obj:
    """Typed access to one JSON object; unknown keys are an error (Intel versions its formats)."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, Mapping):
            raise MalformedError(f"{what}: expected a JSON object")
        self.value: Mapping[str, object] = value
        self.what = what
        self.seen: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.value

    def get(self, key: str) -> object:
        self.seen.add(key)
        if key not in self.value:
            raise MalformedError(f"{self.what}: missing {key!r}")
        return self.value[key]

    def optional(self, key: str) -> object:
        self.seen.add(key)
        return self.value.get(key)

    def string(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise MalformedError(f"{self.what}.{key}: expected a string")
        return value

    def integer(self, key: str, maximum: int) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
            raise MalformedError(f"{self.what}.{key}: expected an integer in 0..{maximum}")
        return value

    def hex(self, key: str, length: int) -> bytes:
        return parse_hex(self.get(key), what=f"{self.what}.{key}", length=length)

    def time(self, key: str) -> datetime:
        return parse_time(self.get(key), what=f"{self.what}.{key}")

    def items(self, key: str, *, optional: bool = False) -> list[object]:
        value = self.optional(key) if optional else self.get(key)
        if value is None and optional:
            return []
        if not isinstance(value, list):
            raise MalformedError(f"{self.what}.{key}: expected a list")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise MalformedError(f"{self.what}: unknown key(s) {', '.join(map(repr, unknown))}")


# --------------------------------------------------------------------------------------------
# TCB info and QE identity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcbLevel:
    """One TCB info level: the platform TCB it describes and that TCB's status."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IsvTcbLevel:
    """A level keyed by one ISV SVN (TDX module identity, QE identity)."""

    isvsvn: int
    tcb_date: datetime
    tcb_status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModule:
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    """A TDX TCB info (id "TDX", version 3)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModule
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]

    def fields(self) -> dict[str, object]:
        return {
            "id": self.id,
            "version": self.version,
            "fmspc": self.fmspc.hex(),
            "issue_date": format_time(self.issue_date),
            "next_update": format_time(self.next_update),
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
        }


@dataclass(frozen=True)
class QeIdentity:
    """The TD Quoting Enclave identity (id "TD_QE", version 2)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IsvTcbLevel, ...]

    def fields(self) -> dict[str, object]:
        return {
            "id": self.id,
            "version": self.version,
            "issue_date": format_time(self.issue_date),
            "next_update": format_time(self.next_update),
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
        }


def _status(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise MalformedError(f"{what}: unknown TCB status {value!r}")
    return value


def _advisories(obj: _Obj) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(obj.items("advisoryIDs", optional=True)):
        if not isinstance(item, str) or not item:
            raise MalformedError(f"{obj.what}.advisoryIDs[{i}]: expected a string")
        out.append(item)
    return tuple(out)


def _components(obj: _Obj, key: str) -> tuple[int, ...]:
    items = obj.items(key)
    if len(items) != 16:
        raise MalformedError(f"{obj.what}.{key}: expected 16 components, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        component = _Obj(item, f"{obj.what}.{key}[{i}]")
        out.append(component.integer("svn", 255))
        for optional in ("category", "type"):
            if component.optional(optional) is not None and not isinstance(
                component.value[optional], str
            ):
                raise MalformedError(f"{component.what}.{optional}: expected a string")
        component.finish()
    return tuple(out)


def _tcb_level(value: object, what: str) -> TcbLevel:
    obj = _Obj(value, what)
    tcb = _Obj(obj.get("tcb"), f"{what}.tcb")
    level = TcbLevel(
        sgx_components=_components(tcb, "sgxtcbcomponents"),
        pcesvn=tcb.integer("pcesvn", 0xFFFF),
        tdx_components=_components(tcb, "tdxtcbcomponents"),
        tcb_date=obj.time("tcbDate"),
        tcb_status=_status(obj.string("tcbStatus"), TCB_STATUSES, f"{what}.tcbStatus"),
        advisory_ids=_advisories(obj),
    )
    tcb.finish()
    obj.finish()
    return level


def _isv_level(value: object, what: str) -> IsvTcbLevel:
    obj = _Obj(value, what)
    tcb = _Obj(obj.get("tcb"), f"{what}.tcb")
    level = IsvTcbLevel(
        isvsvn=tcb.integer("isvsvn", 0xFFFF),
        tcb_date=obj.time("tcbDate"),
        tcb_status=_status(obj.string("tcbStatus"), MODULE_TCB_STATUSES, f"{what}.tcbStatus"),
        advisory_ids=_advisories(obj),
    )
    tcb.finish()
    obj.finish()
    return level


def _isv_levels(obj: _Obj) -> tuple[IsvTcbLevel, ...]:
    levels = tuple(
        _isv_level(item, f"{obj.what}.tcbLevels[{i}]")
        for i, item in enumerate(obj.items("tcbLevels"))
    )
    if not levels:
        raise MalformedError(f"{obj.what}.tcbLevels: empty")
    return levels


def _module_identity(value: object, what: str) -> TdxModuleIdentity:
    obj = _Obj(value, what)
    ident = obj.string("id")
    if not _MODULE_ID.fullmatch(ident):
        raise MalformedError(f"{what}.id: {ident!r} is not TDX_<2 hex digits>")
    identity = TdxModuleIdentity(
        id=ident.upper(),
        mrsigner=obj.hex("mrsigner", 48),
        attributes=obj.hex("attributes", 8),
        attributes_mask=obj.hex("attributesMask", 8),
        tcb_levels=_isv_levels(obj),
    )
    obj.finish()
    return identity


def parse_tcb_info(text: str) -> TcbInfo:
    """Parse the signed TCB info JSON text (the value of ``tcbInfo``)."""
    obj = _Obj(_loads(text, "TCB info"), "tcbInfo")
    ident = obj.string("id")
    version = obj.integer("version", 0xFFFF)
    if ident != "TDX" or version != 3:
        raise MalformedError(f"tcbInfo: id {ident!r} version {version} is not TDX TCB info v3")
    module = _Obj(obj.get("tdxModule"), "tcbInfo.tdxModule")
    tdx_module = TdxModule(
        mrsigner=module.hex("mrsigner", 48),
        attributes=module.hex("attributes", 8),
        attributes_mask=module.hex("attributesMask", 8),
    )
    module.finish()
    identities = tuple(
        _module_identity(item, f"tcbInfo.tdxModuleIdentities[{i}]")
        for i, item in enumerate(obj.items("tdxModuleIdentities", optional=True))
    )
    if len({m.id for m in identities}) != len(identities):
        raise MalformedError("tcbInfo.tdxModuleIdentities: duplicate id")
    levels = tuple(
        _tcb_level(item, f"tcbInfo.tcbLevels[{i}]") for i, item in enumerate(obj.items("tcbLevels"))
    )
    if not levels:
        raise MalformedError("tcbInfo.tcbLevels: empty")
    info = TcbInfo(
        id=ident,
        version=version,
        issue_date=obj.time("issueDate"),
        next_update=obj.time("nextUpdate"),
        fmspc=obj.hex("fmspc", 6),
        pce_id=obj.hex("pceId", 2),
        tcb_type=obj.integer("tcbType", 0xFFFF),
        tcb_evaluation_data_number=obj.integer("tcbEvaluationDataNumber", 0xFFFFFFFF),
        tdx_module=tdx_module,
        tdx_module_identities=identities,
        tcb_levels=levels,
    )
    obj.finish()
    if info.tcb_type != 0:
        raise MalformedError(f"tcbInfo.tcbType: {info.tcb_type} is not supported (only 0)")
    if info.next_update < info.issue_date:
        raise MalformedError("tcbInfo: nextUpdate is before issueDate")
    return info


def parse_qe_identity(text: str) -> QeIdentity:
    """Parse the signed QE identity JSON text (the value of ``enclaveIdentity``)."""
    obj = _Obj(_loads(text, "QE identity"), "enclaveIdentity")
    ident = obj.string("id")
    version = obj.integer("version", 0xFFFF)
    if ident != "TD_QE" or version != 2:
        raise MalformedError(
            f"enclaveIdentity: id {ident!r} version {version} is not TD_QE identity v2"
        )
    identity = QeIdentity(
        id=ident,
        version=version,
        issue_date=obj.time("issueDate"),
        next_update=obj.time("nextUpdate"),
        tcb_evaluation_data_number=obj.integer("tcbEvaluationDataNumber", 0xFFFFFFFF),
        miscselect=obj.hex("miscselect", 4),
        miscselect_mask=obj.hex("miscselectMask", 4),
        attributes=obj.hex("attributes", 16),
        attributes_mask=obj.hex("attributesMask", 16),
        mrsigner=obj.hex("mrsigner", 32),
        isvprodid=obj.integer("isvprodid", 0xFFFF),
        tcb_levels=_isv_levels(obj),
    )
    obj.finish()
    if identity.next_update < identity.issue_date:
        raise MalformedError("enclaveIdentity: nextUpdate is before issueDate")
    return identity


# --------------------------------------------------------------------------------------------
# CRLs (read with the strict DER reader: exact issuer bytes, no re-encoding)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crl:
    """A parsed X.509 v2 CRL. Its signature is *not* verified by parsing."""

    der: bytes
    tbs: bytes
    signature_algorithm: SignatureAlgorithm
    signature: bytes
    issuer: Name
    this_update: datetime
    next_update: datetime
    revoked_serials: frozenset[int]

    def revokes(self, cert: Certificate) -> bool:
        return cert.issuer.der == self.issuer.der and cert.serial in self.revoked_serials

    def describe(self) -> str:
        return f"CRL of {self.issuer.get('CN') or self.issuer}"


def _der_text_or_pem(data: bytes, what: str) -> bytes:
    """CRL bytes: DER, PEM (X509 CRL), or hex-encoded DER (as dcap-qvl JSON and PCCS use)."""
    data = bytes(data)
    if data.startswith(b"\x30"):
        return data
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN X509 CRL-----"):
        end = stripped.find(b"-----END X509 CRL-----")
        if end < 0 or stripped[end + len(b"-----END X509 CRL-----") :].strip():
            raise MalformedError(f"{what}: malformed PEM CRL")
        body = stripped[len(b"-----BEGIN X509 CRL-----") : end]
        try:
            return binascii.a2b_base64(b"".join(body.split()), strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedError(f"{what}: PEM CRL is not valid base64") from exc
    try:
        return parse_hex(stripped.decode("ascii"), what=what)
    except UnicodeDecodeError as exc:
        raise MalformedError(f"{what}: neither DER, PEM nor hex") from exc


def _lenient_serial(node: _der.Node) -> int:
    # CRL entry serials are compared by value; a non-minimal encoding in a signed CRL must not
    # make revocation checking fail open, so it is decoded rather than rejected.
    node.expect(_der.INTEGER, "serial number")
    if not node.content:
        raise MalformedError("CRL: empty serial number")
    return int.from_bytes(node.content, "big", signed=True)


def parse_crl(data: bytes, *, what: str = "CRL") -> Crl:
    """Parse a CRL given as DER, PEM or hex-encoded DER (strict DER structure)."""
    der = _der_text_or_pem(data, what)
    if len(der) > MAX_CRL_SIZE:
        raise MalformedError(f"{what}: {len(der)} bytes, larger than {MAX_CRL_SIZE}")
    try:
        return _parse_crl_der(der)
    except MalformedError as exc:
        raise MalformedError(f"{what}: {exc.message}") from exc


def _parse_crl_der(der: bytes) -> Crl:
    outer = _der.parse(der).expect(_der.SEQUENCE, "CertificateList").children()
    if len(outer) != 3:
        raise MalformedError("CertificateList must have three fields")
    tbs_node, outer_alg, sig_node = outer
    tbs = tbs_node.expect(_der.SEQUENCE, "TBSCertList").children()
    i = 0
    if tbs and tbs[0].tag == _der.INTEGER:
        if tbs[0].as_int() != 1:
            raise MalformedError("only v2 CRLs are supported")
        i = 1
    if len(tbs) < i + 4:
        raise MalformedError("TBSCertList too short (nextUpdate is required)")
    if tbs[i].raw != outer_alg.raw:
        raise MalformedError("inner and outer signature algorithms differ")
    alg_items = outer_alg.expect(_der.SEQUENCE, "AlgorithmIdentifier").children()
    if len(alg_items) != 1 or alg_items[0].as_oid() not in _ECDSA_ALGORITHMS:
        raise MalformedError("CRL signature algorithm is not ECDSA with SHA-256/384")
    algorithm = _ECDSA_ALGORITHMS[alg_items[0].as_oid()]
    issuer_node = tbs[i + 1].expect(_der.SEQUENCE, "issuer")
    issuer = Name(issuer_node.raw, _name_attributes(issuer_node))
    this_update = tbs[i + 2].as_time()
    next_update = tbs[i + 3].as_time()
    revoked: set[int] = set()
    for extra in tbs[i + 4 :]:
        if extra.tag == _der.SEQUENCE:
            for entry in extra.children():
                fields = entry.expect(_der.SEQUENCE, "revoked entry").children()
                if len(fields) not in (2, 3):
                    raise MalformedError("bad revoked certificate entry")
                revoked.add(_lenient_serial(fields[0]))
                fields[1].as_time()
        elif extra.tag != 0xA0:
            raise MalformedError(f"unexpected TBSCertList field 0x{extra.tag:02x}")
    if next_update < this_update:
        raise MalformedError("nextUpdate is before thisUpdate")
    return Crl(
        der=der,
        tbs=tbs_node.raw,
        signature_algorithm=algorithm,
        signature=sig_node.as_bits(),
        issuer=issuer,
        this_update=this_update,
        next_update=next_update,
        revoked_serials=frozenset(revoked),
    )


def _name_attributes(node: _der.Node) -> tuple[tuple[str, str], ...]:
    names = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O"}
    out = []
    for rdn in node.children():
        for atv in rdn.expect(_der.SET, "RDN").children():
            pair = atv.expect(_der.SEQUENCE, "AttributeTypeAndValue").children()
            if len(pair) != 2:
                raise MalformedError("bad AttributeTypeAndValue")
            oid = pair[0].as_oid()
            out.append((names.get(oid, oid), pair[1].content.decode("utf-8", "replace")))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Collateral
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedJson:
    """Signed collateral: the exact signed bytes, the raw r||s signature and its issuer chain."""

    body: bytes
    signature: bytes
    #: TCB Signing certificate first, then (usually) the root.
    issuer_chain: tuple[Certificate, ...]
    #: True when the chain is the one shipped with the package rather than supplied with the
    #: collateral: then it is a pinned trust anchor and its validity period is not enforced.
    embedded_chain: bool


@dataclass(frozen=True)
class Collateral:
    """Verification collateral for TDX quotes. Build with :meth:`from_json` or :meth:`from_pcs`."""

    tcb_info: TcbInfo
    tcb_info_signed: SignedJson
    qe_identity: QeIdentity
    qe_identity_signed: SignedJson
    #: CRL of the PCK Platform/Processor CA; None = PCK revocation not checked.
    pck_crl: Crl | None = None
    #: CRL of the Intel SGX Root CA; None = intermediate CA revocation not checked.
    root_crl: Crl | None = None
    #: The chain of the PCK CRL issuer, when supplied (dcap-qvl JSON).
    pck_crl_issuer_chain: tuple[Certificate, ...] | None = None
    #: "dcap-qvl-json" or "pcs".
    source: str = "pcs"

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        """The dcap-qvl / Phala ``QuoteCollateralV3`` JSON document."""
        collateral = _from_json_cached(bytes(data))
        assert isinstance(collateral, cls)
        return collateral

    @classmethod
    def from_pcs(
        cls,
        tcb_info: bytes,
        qe_identity: bytes,
        pck_crl: bytes | None = None,
        root_crl: bytes | None = None,
        issuer_chain: bytes | None = None,
    ) -> Self:
        """Raw Intel PCS responses; ``issuer_chain`` defaults to the shipped TCB Signing chain."""
        collateral = _from_pcs_cached(
            bytes(tcb_info),
            bytes(qe_identity),
            None if pck_crl is None else bytes(pck_crl),
            None if root_crl is None else bytes(root_crl),
            None if issuer_chain is None else bytes(issuer_chain),
        )
        assert isinstance(collateral, cls)
        return collateral

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "source": self.source,
            "tcb_info": self.tcb_info.fields(),
            "qe_identity": self.qe_identity.fields(),
        }
        for name, crl in (("pck_crl", self.pck_crl), ("root_ca_crl", self.root_crl)):
            if crl is not None:
                out[name] = {
                    "issuer": str(crl.issuer),
                    "this_update": crl.this_update.isoformat(),
                    "next_update": crl.next_update.isoformat(),
                    "entries": len(crl.revoked_serials),
                }
        return out


def _signature(value: object, what: str) -> bytes:
    return parse_hex(value, what=what, length=_SIGNATURE_SIZE)


@lru_cache(maxsize=64)
def _from_json_cached(data: bytes) -> Collateral:
    doc = _Obj(_loads(_text(data, "TDX collateral JSON"), "TDX collateral JSON"), "collateral")
    strings: dict[str, str] = {}
    for key in _COLLATERAL_JSON_KEYS:
        strings[key] = doc.string(key)
    # Newer dcap-qvl versions may carry the PCK chain here; only "absent" is supported.
    if doc.optional("pck_certificate_chain") is not None:
        raise MalformedError(
            "collateral.pck_certificate_chain: not supported (the quote carries its PCK chain)"
        )
    doc.finish()

    def chain(key: str) -> tuple[Certificate, ...]:
        return load_pem_chain(strings[key].encode("utf-8"), what=f"collateral.{key}")

    tcb_body = strings["tcb_info"].encode("utf-8")
    qe_body = strings["qe_identity"].encode("utf-8")
    return Collateral(
        tcb_info=parse_tcb_info(strings["tcb_info"]),
        tcb_info_signed=SignedJson(
            body=tcb_body,
            signature=_signature(strings["tcb_info_signature"], "collateral.tcb_info_signature"),
            issuer_chain=chain("tcb_info_issuer_chain"),
            embedded_chain=False,
        ),
        qe_identity=parse_qe_identity(strings["qe_identity"]),
        qe_identity_signed=SignedJson(
            body=qe_body,
            signature=_signature(
                strings["qe_identity_signature"], "collateral.qe_identity_signature"
            ),
            issuer_chain=chain("qe_identity_issuer_chain"),
            embedded_chain=False,
        ),
        pck_crl=parse_crl(strings["pck_crl"].encode("ascii", "replace"), what="pck_crl"),
        root_crl=parse_crl(strings["root_ca_crl"].encode("ascii", "replace"), what="root_ca_crl"),
        pck_crl_issuer_chain=chain("pck_crl_issuer_chain"),
        source="dcap-qvl-json",
    )


def _pcs_body(data: bytes, key: str, what: str) -> tuple[str, bytes]:
    """The exact text of the signed member and the signature of a PCS response body."""
    members = _raw_members(_text(data, what), what)
    unknown = sorted(set(members) - {key, "signature"})
    if unknown:
        raise MalformedError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}")
    if key not in members or "signature" not in members:
        raise MalformedError(f"{what}: expected {{{key!r}: ..., 'signature': ...}}")
    raw = members[key][1]
    return raw, _signature(members["signature"][0], f"{what}.signature")


@lru_cache(maxsize=64)
def _from_pcs_cached(
    tcb_info: bytes,
    qe_identity: bytes,
    pck_crl: bytes | None,
    root_crl: bytes | None,
    issuer_chain: bytes | None,
) -> Collateral:
    tcb_text, tcb_sig = _pcs_body(tcb_info, "tcbInfo", "PCS TCB info")
    qe_text, qe_sig = _pcs_body(qe_identity, "enclaveIdentity", "PCS QE identity")
    if issuer_chain is None:
        chain, embedded = embedded_tcb_signing_chain(), True
    else:
        chain, embedded = load_pem_chain(issuer_chain, what="TCB Signing issuer chain"), False
    return Collateral(
        tcb_info=parse_tcb_info(tcb_text),
        tcb_info_signed=SignedJson(tcb_text.encode("utf-8"), tcb_sig, chain, embedded),
        qe_identity=parse_qe_identity(qe_text),
        qe_identity_signed=SignedJson(qe_text.encode("utf-8"), qe_sig, chain, embedded),
        pck_crl=None if pck_crl is None else parse_crl(pck_crl, what="PCK CRL"),
        root_crl=None if root_crl is None else parse_crl(root_crl, what="root CA CRL"),
        pck_crl_issuer_chain=None,
        source="pcs",
    )
