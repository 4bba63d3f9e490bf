"""Simulated Intel TDX: a seed-derived PKI shaped like Intel's, DCAP quotes, and collateral.

Everything here is SIMULATED. The PKI mirrors Intel's: a root CA (ECDSA P-256) issuing a PCK
Platform CA, which issues the PCK certificate with the SGX extensions (PPID, TCB components,
PCESVN, CPUSVN, PCE-ID, FMSPC, SGX type); the root also issues the TCB Signing certificate that
signs the TCB info and QE identity. The Quoting Enclave's report is signed by the PCK key and
binds the attestation key, which signs the quote. Names say "SIMULATED" (O=Cube Simulator,
OU=SIMULATED - not Intel); the TCB Signing certificate keeps Intel's CN because verifiers
identify it by that name. Intel's real root refuses all of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from attestation._x509 import Certificate, load_certificate
from attestation.sim import _derw as d
from attestation.sim._drbg import derive_bytes
from attestation.sim._keys import ec_key
from attestation.sim._pki import (
    EPOCH,
    NOT_AFTER,
    EcdsaSigner,
    authority_key_identifier,
    basic_constraints,
    build_certificate,
    build_crl,
    extension,
    key_usage,
    pem,
    raw_ecdsa_signature,
    subject_key_identifier,
)
from attestation.sim._snp import DEFAULT_SEED, SIM_ORGANIZATION
from attestation.tdx import Collateral

__all__ = ["SIM_FMSPC", "SimulatedTdx", "TdxPlatformTcb"]

SIM_UNIT: Final = "SIMULATED - not Intel"
#: The simulated platform's FMSPC (family-model-stepping-platform-custom SKU).
SIM_FMSPC: Final = bytes.fromhex("C0BE51000000")
_INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_SGX_OID = "1.2.840.113741.1.13.1"
_HEADER = struct.Struct("<HHIHH16s20s")
_TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
_TD_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_TD_QE_PRODID = 2


@dataclass(frozen=True)
class TdxPlatformTcb:
    """The simulated platform's TCB: what the PCK certificate and TEE_TCB_SVN say."""

    sgx_components: tuple[int, ...] = (2, 2, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
    pcesvn: int = 11
    #: TEE_TCB_SVN: byte 0 the TDX module SVN, byte 1 its major version, byte 2 the late
    #: microcode update.
    tee_tcb_svn: bytes = bytes([5, 1, 2]) + bytes(13)
    qe_isvsvn: int = 4

    def __post_init__(self) -> None:
        if len(self.sgx_components) != 16 or not all(0 <= c <= 255 for c in self.sgx_components):
            raise ValueError("sgx_components: 16 values 0..255")
        if len(self.tee_tcb_svn) != 16:
            raise ValueError("tee_tcb_svn: 16 bytes")


def _intel_name(common_name: str) -> bytes:
    # Intel's attribute order (CN, O, L, ST, C), plus an OU that says "simulated".
    return d.name(
        [
            ("CN", common_name),
            ("O", SIM_ORGANIZATION),
            ("OU", SIM_UNIT),
            ("L", "Simulation"),
            ("ST", "CA"),
            ("C", "US"),
        ]
    )


_ROOT_NAME = "SIM-SGX-Root-CA"
_PLATFORM_CA_NAME = "SIM-SGX-PCK-Platform-CA"
_PCK_NAME = "SIM-SGX-PCK-Certificate"
# Verifiers recognise the TCB info / QE identity signer by Intel's exact CN.
_TCB_SIGNING_NAME = "Intel SGX TCB Signing"


def _serial(seed: bytes, label: str) -> int:
    # Positive, 20 bytes at most, like Intel's.
    return int.from_bytes(derive_bytes(seed, f"tdx/serial/{label}", 19), "big") | 1


@dataclass(frozen=True)
class _IntelPki:
    root_der: bytes
    platform_ca_der: bytes
    tcb_signing_der: bytes


_PKI_CACHE: dict[bytes, _IntelPki] = {}
_PKI_LOCK = threading.Lock()


def _key(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    return ec_key(seed, f"tdx/{label}", ec.SECP256R1())


def _intel_pki(seed: bytes) -> _IntelPki:
    with _PKI_LOCK:
        cached = _PKI_CACHE.get(seed)
        if cached is not None:
            return cached
        root_key = _key(seed, "root")
        root_signer = EcdsaSigner(root_key, "sha256")
        root_name = _intel_name(_ROOT_NAME)
        root = build_certificate(
            serial=_serial(seed, "root"),
            issuer=root_name,
            subject=root_name,
            public_key=root_key.public_key(),
            signer=root_signer,
            extensions=[
                authority_key_identifier(root_key.public_key()),
                subject_key_identifier(root_key.public_key()),
                key_usage(cert_sign=True, crl_sign=True),
                basic_constraints(ca=True, path_length=1),
            ],
        )
        ca_key = _key(seed, "pck-platform-ca")
        platform_ca = build_certificate(
            serial=_serial(seed, "pck-platform-ca"),
            issuer=root_name,
            subject=_intel_name(_PLATFORM_CA_NAME),
            public_key=ca_key.public_key(),
            signer=root_signer,
            extensions=[
                authority_key_identifier(root_key.public_key()),
                subject_key_identifier(ca_key.public_key()),
                key_usage(cert_sign=True, crl_sign=True),
                basic_constraints(ca=True, path_length=0),
            ],
        )
        signing_key = _key(seed, "tcb-signing")
        tcb_signing = build_certificate(
            serial=_serial(seed, "tcb-signing"),
            issuer=root_name,
            subject=_intel_name(_TCB_SIGNING_NAME),
            public_key=signing_key.public_key(),
            signer=root_signer,
            extensions=[
                authority_key_identifier(root_key.public_key()),
                subject_key_identifier(signing_key.public_key()),
                key_usage(cert_sign=False, crl_sign=False, digital_signature=True),
                basic_constraints(ca=False),
            ],
        )
        pki = _IntelPki(root, platform_ca, tcb_signing)
        _PKI_CACHE[seed] = pki
        return pki


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 as Intel writes it: r || s, 32 bytes each, big-endian."""
    r, s = raw_ecdsa_signature(EcdsaSigner(key, "sha256").sign(data), 32)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _components(values: Sequence[int]) -> list[dict[str, int]]:
    return [{"svn": value} for value in values]


class SimulatedTdx:
    """A SIMULATED TDX platform: PKI from ``seed``, TCB ``tcb``, FMSPC :data:`SIM_FMSPC`.

    Quotes verify with :func:`attestation.tdx.verify_quote` given ``root=root_certificate()``
    and ``collateral=collateral()`` (status UpToDate by default), and with nothing else.
    """

    def __init__(
        self,
        seed: bytes = DEFAULT_SEED,
        *,
        tcb: TdxPlatformTcb | None = None,
        fmspc: bytes = SIM_FMSPC,
    ) -> None:
        if len(fmspc) != 6:
            raise ValueError("fmspc must be 6 bytes")
        self.seed = bytes(seed)
        self.tcb = tcb if tcb is not None else TdxPlatformTcb()
        self.fmspc = bytes(fmspc)

    def __repr__(self) -> str:
        return f"SimulatedTdx(fmspc={self.fmspc.hex()}, SIMULATED)"

    # -- the PKI -----------------------------------------------------------------------------

    @property
    def _pki(self) -> _IntelPki:
        return _intel_pki(self.seed)

    def root_der(self) -> bytes:
        """The simulated root CA (the trust anchor to pin), DER."""
        return self._pki.root_der

    def root_certificate(self) -> Certificate:
        """The simulated root CA, parsed: pass it to ``verify_quote(root=...)``."""
        return load_certificate(self.root_der())

    def platform_ca_der(self) -> bytes:
        return self._pki.platform_ca_der

    def tcb_signing_der(self) -> bytes:
        return self._pki.tcb_signing_der

    @cached_property
    def _pck_key(self) -> ec.EllipticCurvePrivateKey:
        return _key(self.seed, f"pck/{self.fmspc.hex()}")

    @cached_property
    def attestation_key(self) -> ec.EllipticCurvePrivateKey:
        """The Quoting Enclave's attestation key (signs quotes)."""
        return _key(self.seed, "attestation-key")

    def _sgx_extension(self) -> bytes:
        tcb = self.tcb
        oid = _SGX_OID

        def pair(suffix: str, value: bytes) -> bytes:
            return d.sequence(d.oid(f"{oid}.{suffix}"), value)

        tcb_items = [pair(f"2.{i}", d.integer(v)) for i, v in enumerate(tcb.sgx_components, 1)]
        tcb_items.append(pair("2.17", d.integer(tcb.pcesvn)))
        tcb_items.append(pair("2.18", d.octet_string(bytes(tcb.sgx_components))))
        value = d.sequence(
            pair("1", d.octet_string(derive_bytes(self.seed, "tdx/ppid", 16))),
            pair("2", d.sequence(*tcb_items)),
            pair("3", d.octet_string(bytes(2))),
            pair("4", d.octet_string(self.fmspc)),
            pair("5", d.enumerated(0)),
            pair("6", d.octet_string(derive_bytes(self.seed, "tdx/platform-instance", 16))),
            pair(
                "7",
                d.sequence(
                    pair("7.1", d.boolean(False)),
                    pair("7.2", d.boolean(True)),
                    pair("7.3", d.boolean(True)),
                ),
            ),
        )
        return extension(_SGX_OID, value)

    @cached_property
    def _pck_der(self) -> bytes:
        ca_key = _key(self.seed, "pck-platform-ca")
        public = self._pck_key.public_key()
        return build_certificate(
            serial=_serial(self.seed, f"pck/{self.fmspc.hex()}"),
            issuer=_intel_name(_PLATFORM_CA_NAME),
            subject=_intel_name(_PCK_NAME),
            public_key=public,
            signer=EcdsaSigner(ca_key, "sha256"),
            extensions=[
                authority_key_identifier(ca_key.public_key()),
                subject_key_identifier(public),
                key_usage(cert_sign=False, crl_sign=False, digital_signature=True),
                basic_constraints(ca=False),
                self._sgx_extension(),
            ],
        )

    def pck_der(self) -> bytes:
        self._pki  # noqa: B018 - the CA certificates first (same cache for every instance)
        return self._pck_der

    def pck_chain_pem(self) -> bytes:
        """PCK certificate, PCK Platform CA, root: the chain a quote carries (type 5)."""
        return pem(self.pck_der()) + pem(self.platform_ca_der()) + pem(self.root_der())

    # -- the Quoting Enclave -----------------------------------------------------------------

    @property
    def qe_mrsigner(self) -> bytes:
        return derive_bytes(self.seed, "tdx/qe/mrsigner", 32)

    @property
    def qe_mrenclave(self) -> bytes:
        return derive_bytes(self.seed, "tdx/qe/mrenclave", 32)

    def _attest_key_raw(self) -> bytes:
        numbers = self.attestation_key.public_key().public_numbers()
        return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")

    def _qe_report(self, qe_auth_data: bytes, isv_svn: int) -> bytes:
        binding = hashlib.sha256(self._attest_key_raw() + qe_auth_data).digest() + bytes(32)
        report = b"".join(
            [
                bytes(self.tcb.sgx_components),  # CPUSVN
                struct.pack("<I", 0),  # MISCSELECT
                bytes(12),
                bytes(16),  # ISVEXTPRODID
                _TD_QE_ATTRIBUTES,
                self.qe_mrenclave,
                bytes(32),
                self.qe_mrsigner,
                bytes(32),
                bytes(64),  # CONFIGID
                struct.pack("<HHH", _TD_QE_PRODID, isv_svn, 0),
                bytes(42),
                bytes(16),  # ISVFAMILYID
                binding,
            ]
        )
        assert len(report) == 384
        return report

    def tdreport(self, report_data: bytes = bytes(64), **quote_fields: Any) -> bytes:
        """A SIMULATED TDREPORT (1024 bytes: REPORTMACSTRUCT, TEE_TCB_INFO, TDINFO) with the
        TD fields :meth:`quote` would carry; its MAC uses a key derived from the seed."""
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        quote = self.quote(report_data, **quote_fields)
        body = quote[48 : 48 + 584]
        svn, mr_seam, mr_signer_seam = body[0:16], body[16:64], body[64:112]
        seam_attributes, td_info = body[112:120], body[120:520]
        tee_tcb_info = (
            b"\xff\x03" + bytes(6) + svn + mr_seam + mr_signer_seam + seam_attributes + bytes(111)
        )
        td_info_block = td_info + bytes(48) + bytes(64)  # + SERVTD_HASH, reserved
        mac_input = (
            struct.pack("<BBBB", 0x81, 0, 0, 0)
            + bytes(12)
            + bytes(self.tcb.sgx_components)
            + hashlib.sha384(tee_tcb_info).digest()
            + hashlib.sha384(td_info_block).digest()
            + report_data
            + bytes(32)
        )
        mac_key = derive_bytes(self.seed, "tdx/tdreport-mac", 32)
        mac = hmac.new(mac_key, mac_input, hashlib.sha256).digest()
        report = mac_input + mac + tee_tcb_info + bytes(17) + td_info_block
        assert len(report) == 1024
        return report

    # -- quotes ------------------------------------------------------------------------------

    def quote(
        self,
        report_data: bytes = bytes(64),
        *,
        version: int = 4,
        body_type: int = 2,
        tee_tcb_svn: bytes | None = None,
        mr_seam: bytes | None = None,
        mr_signer_seam: bytes = bytes(48),
        seam_attributes: bytes = bytes(8),
        td_attributes: bytes = bytes.fromhex("0000001000000000"),
        xfam: bytes = bytes.fromhex("e702060000000000"),
        mr_td: bytes | None = None,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
        rtmr0: bytes = bytes(48),
        rtmr1: bytes = bytes(48),
        rtmr2: bytes = bytes(48),
        rtmr3: bytes = bytes(48),
        tee_tcb_svn2: bytes | None = None,
        mr_service_td: bytes = bytes(48),
        user_data: bytes | None = None,
        qe_auth_data: bytes = bytes(range(32)),
        qe_isvsvn: int | None = None,
        trailing: bytes = b"",
    ) -> bytes:
        """A signed TDX DCAP quote (v4, or v5 with body type 2 = TD 1.0 or 3 = TD 1.5).

        Defaults describe a production TD (not debug; SEPT_VE_DISABLE set) on the simulated
        platform; ``mr_td`` and ``mr_seam`` default to SHA-384 of fixed labels. Nothing is
        validated beyond field sizes: tests may build bad quotes on purpose.
        """
        if version not in (4, 5) or body_type not in (2, 3) or (version == 4 and body_type != 2):
            raise ValueError("quotes are v4 (body type 2) or v5 (body type 2 or 3)")
        if mr_td is None:
            mr_td = hashlib.sha384(b"cube-simulator MRTD").digest()
        if mr_seam is None:
            mr_seam = hashlib.sha384(b"cube-simulator TDX module").digest()
        tee_tcb_svn = self.tcb.tee_tcb_svn if tee_tcb_svn is None else tee_tcb_svn
        sizes = {
            "report_data": (report_data, 64),
            "tee_tcb_svn": (tee_tcb_svn, 16),
            "mr_seam": (mr_seam, 48),
            "mr_signer_seam": (mr_signer_seam, 48),
            "seam_attributes": (seam_attributes, 8),
            "td_attributes": (td_attributes, 8),
            "xfam": (xfam, 8),
            "mr_td": (mr_td, 48),
            "mr_config_id": (mr_config_id, 48),
            "mr_owner": (mr_owner, 48),
            "mr_owner_config": (mr_owner_config, 48),
            "rtmr0": (rtmr0, 48),
            "rtmr1": (rtmr1, 48),
            "rtmr2": (rtmr2, 48),
            "rtmr3": (rtmr3, 48),
            "mr_service_td": (mr_service_td, 48),
        }
        for what, (value, size) in sizes.items():
            if len(value) != size:
                raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
        body = b"".join(
            [
                tee_tcb_svn,
                mr_seam,
                mr_signer_seam,
                seam_attributes,
                td_attributes,
                xfam,
                mr_td,
                mr_config_id,
                mr_owner,
                mr_owner_config,
                rtmr0,
                rtmr1,
                rtmr2,
                rtmr3,
                report_data,
            ]
        )
        if body_type == 3:
            svn2 = tee_tcb_svn if tee_tcb_svn2 is None else tee_tcb_svn2
            if len(svn2) != 16:
                raise ValueError("tee_tcb_svn2 must be 16 bytes")
            body += svn2 + mr_service_td
        isv_svn = self.tcb.qe_isvsvn if qe_isvsvn is None else qe_isvsvn
        if user_data is None:
            user_data = derive_bytes(self.seed, "tdx/qe-id", 16) + bytes(4)
        header = _HEADER.pack(
            version, 2, 0x81, isv_svn, self.tcb.pcesvn, _INTEL_QE_VENDOR_ID, user_data
        )
        signed = header + (struct.pack("<HI", body_type, len(body)) if version == 5 else b"")
        signed += body

        qe_report = self._qe_report(qe_auth_data, isv_svn)
        chain = self.pck_chain_pem() + b"\0"  # DCAP writes the PEM chain NUL-terminated
        certification = b"".join(
            [
                qe_report,
                _raw_signature(self._pck_key, qe_report),
                struct.pack("<H", len(qe_auth_data)),
                qe_auth_data,
                struct.pack("<HI", 5, len(chain)),
                chain,
            ]
        )
        signature_data = b"".join(
            [
                _raw_signature(self.attestation_key, signed),
                self._attest_key_raw(),
                struct.pack("<HI", 6, len(certification)),
                certification,
            ]
        )
        return signed + struct.pack("<I", len(signature_data)) + signature_data + trailing

    # -- collateral --------------------------------------------------------------------------

    def crl_der(
        self,
        issuer: str = "pck",
        *,
        revoked: Sequence[int] = (),
        this_update: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
    ) -> bytes:
        """A CRL of the PCK Platform CA (``issuer="pck"``) or of the root (``"root"``)."""
        if issuer == "pck":
            key, name = _key(self.seed, "pck-platform-ca"), _PLATFORM_CA_NAME
        elif issuer == "root":
            key, name = _key(self.seed, "root"), _ROOT_NAME
        else:
            raise ValueError("issuer must be 'pck' or 'root'")
        return build_crl(
            issuer=_intel_name(name),
            issuer_key=key.public_key(),
            signer=EcdsaSigner(key, "sha256"),
            this_update=this_update,
            next_update=next_update,
            number=1,
            revoked=[(serial, this_update) for serial in revoked],
        )

    def pck_serial(self) -> int:
        return _serial(self.seed, f"pck/{self.fmspc.hex()}")

    def tcb_info_json(
        self,
        *,
        issue_date: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
        tcb_status: str = "UpToDate",
        module_status: str = "UpToDate",
        fmspc: bytes | None = None,
        tcb_evaluation_data_number: int = 17,
    ) -> str:
        """The signed TCB info text (id TDX, v3): the platform's level has ``tcb_status``."""
        if tcb_status not in _TCB_STATUSES:
            raise ValueError(f"unknown TCB status {tcb_status!r}")
        tcb = self.tcb
        svn = tcb.tee_tcb_svn
        major = svn[1]
        # The level the platform is at, then an older OutOfDate one below it.
        platform_tdx = [svn[0], 0, *svn[2:]]
        older_sgx = [max(0, c - 1) for c in tcb.sgx_components]
        levels: list[dict[str, object]] = [
            {
                "tcb": {
                    "sgxtcbcomponents": _components(tcb.sgx_components),
                    "pcesvn": tcb.pcesvn,
                    "tdxtcbcomponents": _components(platform_tdx),
                },
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": tcb_status,
                **({} if tcb_status == "UpToDate" else {"advisoryIDs": ["INTEL-SA-00001-SIM"]}),
            },
            {
                "tcb": {
                    "sgxtcbcomponents": _components(older_sgx),
                    "pcesvn": max(0, tcb.pcesvn - 6),
                    "tdxtcbcomponents": _components([0] * 16),
                },
                "tcbDate": "2018-01-04T00:00:00Z",
                "tcbStatus": "OutOfDate",
                "advisoryIDs": ["INTEL-SA-00000-SIM"],
            },
        ]
        zero_signer = "00" * 48
        module_levels: list[dict[str, object]] = [
            {"tcb": {"isvsvn": svn[0]}, "tcbDate": "2024-03-13T00:00:00Z",
             "tcbStatus": module_status},
        ]  # fmt: skip
        if svn[0] > 0:
            module_levels.append(
                {"tcb": {"isvsvn": 0}, "tcbDate": "2023-08-09T00:00:00Z", "tcbStatus": "OutOfDate"}
            )
        document = {
            "id": "TDX",
            "version": 3,
            "issueDate": _time(issue_date),
            "nextUpdate": _time(next_update),
            "fmspc": (self.fmspc if fmspc is None else fmspc).hex().upper(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": tcb_evaluation_data_number,
            "tdxModule": {
                "mrsigner": zero_signer,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [
                {
                    "id": f"TDX_{max(major, 1):02X}",
                    "mrsigner": zero_signer,
                    "attributes": "0000000000000000",
                    "attributesMask": "FFFFFFFFFFFFFFFF",
                    "tcbLevels": module_levels,
                }
            ],
            "tcbLevels": levels,
        }
        return json.dumps(document, separators=(",", ":"))

    def qe_identity_json(
        self,
        *,
        issue_date: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
        qe_status: str = "UpToDate",
        tcb_evaluation_data_number: int = 17,
    ) -> str:
        """The signed QE identity text (id TD_QE, v2) for the simulated Quoting Enclave."""
        isvsvn = self.tcb.qe_isvsvn
        levels: list[dict[str, object]] = [
            {"tcb": {"isvsvn": isvsvn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": qe_status}
        ]
        if isvsvn > 0:
            levels.append(
                {"tcb": {"isvsvn": 0}, "tcbDate": "2021-11-10T00:00:00Z", "tcbStatus": "OutOfDate"}
            )
        document = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": _time(issue_date),
            "nextUpdate": _time(next_update),
            "tcbEvaluationDataNumber": tcb_evaluation_data_number,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": _TD_QE_ATTRIBUTES.hex().upper(),
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": self.qe_mrsigner.hex().upper(),
            "isvprodid": _TD_QE_PRODID,
            "tcbLevels": levels,
        }
        return json.dumps(document, separators=(",", ":"))

    def collateral_json(
        self,
        *,
        issue_date: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
        tcb_status: str = "UpToDate",
        module_status: str = "UpToDate",
        qe_status: str = "UpToDate",
        revoked_pck_serials: Sequence[int] = (),
        revoked_ca_serials: Sequence[int] = (),
        fmspc: bytes | None = None,
    ) -> bytes:
        """Collateral in the dcap-qvl JSON form that ``Collateral.from_json`` reads.

        Valid from 2024-01-01 to 2049-12-31 unless told otherwise (a simulator has no PCS to
        refresh from; staleness tests pass their own window).
        """
        pki = self._pki
        signing_key = _key(self.seed, "tcb-signing")
        tcb_info = self.tcb_info_json(
            issue_date=issue_date,
            next_update=next_update,
            tcb_status=tcb_status,
            module_status=module_status,
            fmspc=fmspc,
        )
        qe_identity = self.qe_identity_json(
            issue_date=issue_date, next_update=next_update, qe_status=qe_status
        )
        signing_chain = (pem(pki.tcb_signing_der) + pem(pki.root_der)).decode()
        document = {
            "pck_crl_issuer_chain": (pem(pki.platform_ca_der) + pem(pki.root_der)).decode(),
            "root_ca_crl": self.crl_der(
                "root", revoked=revoked_ca_serials, this_update=issue_date, next_update=next_update
            ).hex(),
            "pck_crl": self.crl_der(
                "pck", revoked=revoked_pck_serials, this_update=issue_date, next_update=next_update
            ).hex(),
            "tcb_info_issuer_chain": signing_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": _raw_signature(signing_key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": signing_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": _raw_signature(signing_key, qe_identity.encode()).hex(),
        }
        return json.dumps(document, indent=1).encode()

    def collateral(
        self,
        *,
        issue_date: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
        tcb_status: str = "UpToDate",
        module_status: str = "UpToDate",
        qe_status: str = "UpToDate",
        revoked_pck_serials: Sequence[int] = (),
        revoked_ca_serials: Sequence[int] = (),
        fmspc: bytes | None = None,
    ) -> Collateral:
        """:meth:`collateral_json`, parsed with :meth:`attestation.tdx.Collateral.from_json`."""
        return Collateral.from_json(
            self.collateral_json(
                issue_date=issue_date,
                next_update=next_update,
                tcb_status=tcb_status,
                module_status=module_status,
                qe_status=qe_status,
                revoked_pck_serials=revoked_pck_serials,
                revoked_ca_serials=revoked_ca_serials,
                fmspc=fmspc,
            )
        )
