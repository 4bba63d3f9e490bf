"""Intel TDX DCAP quotes, versions 4 and 5: bytes to frozen structures (no crypto, no I/O).

Layout (little-endian; Intel TDX DCAP Quote Generation Library, appendix A)::

    v4: header (48) | TD report body (584)                         | sig_data_len (4) | sig data
    v5: header (48) | body type (2) | body size (4) | body (584/648) | sig_data_len (4) | sig data

    sig data:  quote signature (64, r||s) | attestation key (64, x||y)
               | certification data: type (2) = 6, size (4), then
                   QE report (384) | QE report signature (64) | QE auth data: size (2), data
                   | certification data: type (2) = 5, size (4), PCK certificate chain (PEM)

The quote signature covers everything before ``sig_data_len``. Real quotes carry bytes after the
signature data (zero padding, ASCII text): the quote is parsed by structure and those bytes are
kept as :attr:`TdxQuote.trailing`, never interpreted. Inside the signature data every length must
be consistent and every byte accounted for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from attestation._x509 import Certificate
from attestation.errors import MalformedError
from attestation.tdx._pck import PckExtensions, parse_pck_extensions
from attestation.tdx._util import load_pem_chain

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "CERT_TYPE_PCK_CHAIN",
    "CERT_TYPE_QE_REPORT",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "QE_REPORT_SIZE",
    "TD10_REPORT_SIZE",
    "TD15_REPORT_SIZE",
    "TEE_TYPE_TDX",
    "EnclaveReport",
    "QeReportCertification",
    "QuoteHeader",
    "QuoteSignatureData",
    "TdReport",
    "TdxQuote",
    "parse_quote",
]

HEADER_SIZE = 48
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
QE_REPORT_SIZE = 384
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x00000081
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_BODY_SIZES = {BODY_TYPE_TD10: TD10_REPORT_SIZE, BODY_TYPE_TD15: TD15_REPORT_SIZE}
_SUPPORTED_VERSIONS = (4, 5)
_SIGNATURE_SIZE = 64
_ATTEST_KEY_SIZE = 64
# A PCK chain is three certificates of well under 2 KiB each; anything near this is not a quote.
_MAX_CERT_DATA = 64 * 1024

_HEADER = struct.Struct("<HHIHH16s20s")
assert _HEADER.size == HEADER_SIZE


def _bit(value: bytes, bit: int) -> bool:
    return bool(int.from_bytes(value, "little") >> bit & 1)


class _Reader:
    """Bounds-checked cursor over a bytes object; every overrun is a MalformedError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise MalformedError(
                f"{self.what}: {field} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header (signed)."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    raw: bytes

    def fields(self) -> dict[str, object]:
        return {
            "version": self.version,
            "att_key_type": self.att_key_type,
            "tee_type": f"0x{self.tee_type:08x}",
            "qe_svn": self.qe_svn,
            "pce_svn": self.pce_svn,
            "qe_vendor_id": self.qe_vendor_id.hex(),
            "user_data": self.user_data.hex(),
        }


def _parse_header(raw: bytes) -> QuoteHeader:
    version, key_type, tee_type, qe_svn, pce_svn, vendor, user = _HEADER.unpack(raw)
    if version not in _SUPPORTED_VERSIONS:
        raise MalformedError(f"TDX quote: unsupported version {version} (supported: 4, 5)")
    if key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise MalformedError(f"TDX quote: attestation key type {key_type} is not 2 (ECDSA P-256)")
    if tee_type != TEE_TYPE_TDX:
        raise MalformedError(f"TDX quote: TEE type 0x{tee_type:08x} is not TDX (0x00000081)")
    return QuoteHeader(version, key_type, tee_type, qe_svn, pce_svn, vendor, user, raw)


# TD report body: name and size, in order (TDX module ABI, TDREPORT_STRUCT / TD_INFO).
_TD10_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_FIELDS: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mr_service_td", 48))
assert sum(n for _, n in _TD10_FIELDS) == TD10_REPORT_SIZE
assert sum(n for _, n in _TD10_FIELDS + _TD15_FIELDS) == TD15_REPORT_SIZE


@dataclass(frozen=True)
class TdReport:
    """The TD report body: TD 1.0 (584 bytes) or TD 1.5 (648 bytes, two more fields)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    raw: bytes
    #: TD 1.5 only: the TEE TCB SVN of the current TDX module (after TD-preserving updates).
    tee_tcb_svn2: bytes | None = None
    #: TD 1.5 only: measurement of the service TD bound to this TD (zero when none).
    mr_service_td: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.TUD.DEBUG (bit 0): the host can read and write the TD's state."""
        return _bit(self.td_attributes, 0)

    @property
    def sept_ve_disable(self) -> bool:
        """TD_ATTRIBUTES.SEPT_VE_DISABLE (bit 28)."""
        return _bit(self.td_attributes, 28)

    @property
    def module_svn(self) -> int:
        """The TDX module's SVN (TEE_TCB_SVN byte 0)."""
        return self.tee_tcb_svn[0]

    @property
    def module_major(self) -> int:
        """The TDX module's major version (TEE_TCB_SVN byte 1); 0 on the first TDX modules."""
        return self.tee_tcb_svn[1]

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name).hex() for name, _ in _TD10_FIELDS}
        if self.tee_tcb_svn2 is not None and self.mr_service_td is not None:
            out["tee_tcb_svn2"] = self.tee_tcb_svn2.hex()
            out["mr_service_td"] = self.mr_service_td.hex()
        return out


def _parse_td_report(raw: bytes) -> TdReport:
    reader = _Reader(raw, "TD report body")
    values = {name: reader.take(size, name) for name, size in _TD10_FIELDS}
    if len(raw) == TD15_REPORT_SIZE:
        values.update({name: reader.take(size, name) for name, size in _TD15_FIELDS})
    assert reader.remaining == 0
    return TdReport(raw=raw, **values)


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX enclave report body (384 bytes): here, the Quoting Enclave's report."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG (bit 1)."""
        return bool(self.attributes[0] & 0x02)

    def fields(self) -> dict[str, object]:
        return {
            "cpu_svn": self.cpu_svn.hex(),
            "misc_select": f"0x{self.misc_select:08x}",
            "attributes": self.attributes.hex(),
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "report_data": self.report_data.hex(),
        }


def _zero(value: bytes, what: str) -> None:
    if any(value):
        raise MalformedError(f"{what}: reserved bytes are not zero")


def parse_enclave_report(raw: bytes) -> EnclaveReport:
    """Parse a 384-byte SGX report body; reserved bytes must be zero."""
    if len(raw) != QE_REPORT_SIZE:
        raise MalformedError(f"enclave report: expected {QE_REPORT_SIZE} bytes, got {len(raw)}")
    r = _Reader(raw, "QE report")
    cpu_svn = r.take(16, "cpu_svn")
    misc_select = r.u32("misc_select")
    _zero(r.take(12, "reserved1"), "QE report reserved1")
    isv_ext_prod_id = r.take(16, "isv_ext_prod_id")
    attributes = r.take(16, "attributes")
    mr_enclave = r.take(32, "mr_enclave")
    _zero(r.take(32, "reserved2"), "QE report reserved2")
    mr_signer = r.take(32, "mr_signer")
    _zero(r.take(32, "reserved3"), "QE report reserved3")
    config_id = r.take(64, "config_id")
    isv_prod_id = r.u16("isv_prod_id")
    isv_svn = r.u16("isv_svn")
    config_svn = r.u16("config_svn")
    _zero(r.take(42, "reserved4"), "QE report reserved4")
    isv_family_id = r.take(16, "isv_family_id")
    report_data = r.take(64, "report_data")
    assert r.remaining == 0
    return EnclaveReport(
        cpu_svn=cpu_svn,
        misc_select=misc_select,
        isv_ext_prod_id=isv_ext_prod_id,
        attributes=attributes,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        config_id=config_id,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=config_svn,
        isv_family_id=isv_family_id,
        report_data=report_data,
        raw=raw,
    )


@dataclass(frozen=True)
class QeReportCertification:
    """Certification data type 6: the QE report, its PCK signature and the PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    #: Type of the nested certification data (always 5, PCK certificate chain in PEM).
    cert_data_type: int
    pck_chain_pem: bytes
    #: Leaf (PCK certificate) first, as it appears in the quote.
    pck_chain: tuple[Certificate, ...]
    pck_extensions: PckExtensions


@lru_cache(maxsize=256)
def _parse_pck_chain_pem(pem: bytes) -> tuple[tuple[Certificate, ...], PckExtensions]:
    # Parsing is deterministic, so parsed chains are cached by their exact bytes.
    certs = load_pem_chain(pem, what="TDX quote PCK certificate chain", minimum=2)
    return certs, parse_pck_extensions(certs[0])


def _parse_certification(data: bytes) -> QeReportCertification:
    r = _Reader(data, "QE report certification data")
    qe_report = parse_enclave_report(r.take(QE_REPORT_SIZE, "QE report"))
    qe_report_signature = r.take(_SIGNATURE_SIZE, "QE report signature")
    auth_size = r.u16("QE auth data size")
    qe_auth_data = r.take(auth_size, "QE auth data")
    inner_type = r.u16("certification data type")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise MalformedError(
            f"TDX quote: nested certification data type {inner_type} is not 5 (PCK chain)"
        )
    inner_size = r.u32("certification data size")
    if inner_size != r.remaining:
        raise MalformedError(
            f"TDX quote: PCK chain size {inner_size} does not match the {r.remaining} bytes left "
            "in the QE report certification data"
        )
    pem = r.take(inner_size, "PCK certificate chain")
    chain, extensions = _parse_pck_chain_pem(bytes(pem))
    return QeReportCertification(
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        cert_data_type=inner_type,
        pck_chain_pem=pem,
        pck_chain=chain,
        pck_extensions=extensions,
    )


@dataclass(frozen=True)
class QuoteSignatureData:
    """The ECDSA quote signature data (not signed by the attestation key itself)."""

    signature: bytes
    attest_key: bytes
    certification_type: int
    certification: QeReportCertification
    raw: bytes


def _parse_signature_data(data: bytes) -> QuoteSignatureData:
    r = _Reader(data, "TDX quote signature data")
    signature = r.take(_SIGNATURE_SIZE, "quote signature")
    attest_key = r.take(_ATTEST_KEY_SIZE, "attestation key")
    cert_type = r.u16("certification data type")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise MalformedError(
            f"TDX quote: certification data type {cert_type} is not 6 (QE report certification)"
        )
    cert_size = r.u32("certification data size")
    if cert_size != r.remaining:
        raise MalformedError(
            f"TDX quote: certification data size {cert_size} does not match the {r.remaining} "
            "bytes left in the signature data"
        )
    certification = _parse_certification(r.take(cert_size, "certification data"))
    return QuoteSignatureData(signature, attest_key, cert_type, certification, data)


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote. Nothing in it is verified by parsing."""

    header: QuoteHeader
    #: 2 (TD 1.0 report) or 3 (TD 1.5 report); a v4 quote always carries a TD 1.0 report.
    body_type: int
    td_report: TdReport
    #: The bytes the attestation key signs: header, v5 body descriptor, body.
    signed_data: bytes
    sig_data_len: int
    signature_data: QuoteSignatureData
    #: Bytes after the signature data (padding on real quotes); not covered by any signature.
    trailing: bytes

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def report_data(self) -> bytes:
        return self.td_report.report_data

    @property
    def mr_td(self) -> bytes:
        return self.td_report.mr_td

    @property
    def qe_report(self) -> EnclaveReport:
        return self.signature_data.certification.qe_report

    @property
    def pck_chain(self) -> tuple[Certificate, ...]:
        return self.signature_data.certification.pck_chain

    @property
    def pck_extensions(self) -> PckExtensions:
        return self.signature_data.certification.pck_extensions

    def fields(self) -> dict[str, object]:
        """The parsed fields in the test-vector manifest's representation, plus flat keys.

        Nested ``header``, ``td_report`` and ``qe_report`` as in MANIFEST.json; the TD report
        fields are repeated at top level (``mr_td``, ``rtmr0`` ... ``report_data``) for the CLI.
        """
        certification = self.signature_data.certification
        td = self.td_report.fields()
        out: dict[str, object] = {
            "header": self.header.fields(),
            "body_type": self.body_type,
            "sig_data_len": self.sig_data_len,
            "trailing_bytes": len(self.trailing),
            "cert_data_type": certification.cert_data_type,
            "td_report": td,
            "attest_key": self.signature_data.attest_key.hex(),
            "qe_report": self.qe_report.fields(),
            "pck_extensions": self.pck_extensions.fields(),
            "debug": self.td_report.debug,
        }
        out.update(td)
        return out


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote (v4, or v5 with a TD 1.0 or TD 1.5 body).

    Raises :class:`~attestation.errors.MalformedError` for anything that is not a well-formed
    quote; bytes after the signature data are kept in :attr:`TdxQuote.trailing`.
    """
    data = bytes(data)
    r = _Reader(data, "TDX quote")
    header = _parse_header(r.take(HEADER_SIZE, "header"))
    if header.version == 4:
        body_type = BODY_TYPE_TD10
        body = r.take(TD10_REPORT_SIZE, "TD report body")
    else:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        if body_type not in _BODY_SIZES:
            raise MalformedError(
                f"TDX quote v5: body type {body_type} is not a TD report (2 = TD 1.0, 3 = TD 1.5)"
            )
        if body_size != _BODY_SIZES[body_type]:
            raise MalformedError(
                f"TDX quote v5: body type {body_type} must be {_BODY_SIZES[body_type]} bytes, "
                f"header says {body_size}"
            )
        body = r.take(body_size, "TD report body")
    signed_end = r.pos
    sig_data_len = r.u32("signature data length")
    if sig_data_len > _MAX_CERT_DATA:
        raise MalformedError(f"TDX quote: signature data length {sig_data_len} is implausible")
    signature_data = _parse_signature_data(r.take(sig_data_len, "signature data"))
    return TdxQuote(
        header=header,
        body_type=body_type,
        td_report=_parse_td_report(body),
        signed_data=data[:signed_end],
        sig_data_len=sig_data_len,
        signature_data=signature_data,
        trailing=data[r.pos :],
    )
