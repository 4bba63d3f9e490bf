"""Simulated AMD SEV-SNP: a seed-derived ARK -> ASK -> VCEK PKI and signed attestation reports.

Everything here is SIMULATED. The certificates look like AMD's (RSA-4096 ARK/ASK with
RSASSA-PSS SHA-384, an ECDSA P-384 VCEK with serial 0 and AMD's VCEK extensions) but their names
say what they are (``CN=SIM-ARK-Milan, O=Cube Simulator, OU=SIMULATED - not AMD``), and AMD's
real roots refuse them. The leaf keeps AMD's ``CN=SEV-VCEK`` / ``SEV-VLEK`` because verifiers
identify the key kind by it; its O and OU still say "simulated".
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation._x509 import load_certificate
from attestation.guest._certtable import build_certificate_table
from attestation.sim import _derw as d
from attestation.sim._drbg import derive_bytes
from attestation.sim._keys import ec_key, rsa_key
from attestation.sim._pki import (
    EPOCH,
    NOT_AFTER,
    EcdsaSigner,
    RsaPssSigner,
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
from attestation.snp.roots import ProductRoots, SnpTrustRoots

__all__ = [
    "DEFAULT_SEED",
    "SIM_ORGANIZATION",
    "SIM_UNIT",
    "SNP_PRODUCTS",
    "SimulatedSnp",
    "SnpTcb",
]

#: The simulator's default seed. It is public: anything derived from it is a *test* PKI, and
#: a verifier re-derives the simulator's roots from it.
DEFAULT_SEED: Final = b"cube-simulator/default-seed/v1 (SIMULATED, NOT A REAL TEE)"
SIM_ORGANIZATION: Final = "Cube Simulator"
SIM_UNIT: Final = "SIMULATED - not AMD"
SNP_PRODUCTS: Final = ("Milan", "Genoa", "Turin")

_REPORT_SIZE = 0x4A0
_SIGNATURE_OFFSET = 0x2A0
_COMPONENT = 72
_AMD_OID = "1.3.6.1.4.1.3704.1"

# CPUID family, model, stepping of each product (what v3+ reports carry).
_CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x01)}
_PRODUCT_NAME = {"Milan": "Milan-B0", "Genoa": "Genoa", "Turin": "Turin"}
_STRUCT_VERSION = {"Milan": 0, "Genoa": 0, "Turin": 1}
_SERIAL_BASE = {"Milan": 0x10000, "Genoa": 0x20000, "Turin": 0x30000}


@dataclass(frozen=True)
class SnpTcb:
    """TCB component SVNs. ``fmc`` exists only on Turin."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    def raw(self, product: str) -> int:
        """The 64-bit TCB_VERSION in ``product``'s layout."""
        values = (self.bootloader, self.tee, self.snp, self.microcode, self.fmc or 0)
        if not all(0 <= v <= 0xFF for v in values):
            raise ValueError(f"TCB component out of range: {values}")
        if product == "Turin":
            b = bytes([self.fmc or 0, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode])
        else:
            if self.fmc is not None:
                raise ValueError(f"{product} has no FMC TCB component")
            b = bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return int.from_bytes(b, "little")


_DEFAULT_TCB = {
    "Milan": SnpTcb(bootloader=4, tee=0, snp=24, microcode=219),
    "Genoa": SnpTcb(bootloader=10, tee=0, snp=25, microcode=84),
    "Turin": SnpTcb(bootloader=1, tee=0, snp=2, microcode=71, fmc=0),
}


def _sim_name(common_name: str) -> bytes:
    # AMD's attribute order (OU, C, L, ST, O, CN), with values that say "simulated".
    return d.name(
        [
            ("OU", SIM_UNIT),
            ("C", "US"),
            ("L", "Simulation"),
            ("ST", "CA"),
            ("O", SIM_ORGANIZATION),
            ("CN", common_name),
        ]
    )


@dataclass(frozen=True)
class _ProductPki:
    ark_der: bytes
    ask_der: bytes
    asvk_der: bytes


_PKI_CACHE: dict[tuple[bytes, str], _ProductPki] = {}
_PKI_LOCK = threading.Lock()


def _product_pki(seed: bytes, product: str) -> _ProductPki:
    """ARK (self-signed), ASK and ASVK of ``product``: RSA-4096, RSASSA-PSS SHA-384."""
    with _PKI_LOCK:
        cached = _PKI_CACHE.get((seed, product))
        if cached is not None:
            return cached
    ark_key = rsa_key(seed, f"snp/{product}/ark")
    ask_key = rsa_key(seed, f"snp/{product}/ask")
    asvk_key = rsa_key(seed, f"snp/{product}/asvk")
    ark_name = _sim_name(f"SIM-ARK-{product}")
    ark_signer = RsaPssSigner(ark_key)
    serial = _SERIAL_BASE[product]
    ark = build_certificate(
        serial=serial,
        issuer=ark_name,
        subject=ark_name,
        public_key=ark_key.public_key(),
        signer=ark_signer,
        extensions=[
            key_usage(cert_sign=True, crl_sign=True),
            subject_key_identifier(ark_key.public_key()),
            basic_constraints(ca=True),
        ],
    )

    def intermediate(key_name: str, public: rsa.RSAPublicKey, number: int) -> bytes:
        return build_certificate(
            serial=serial + number,
            issuer=ark_name,
            subject=_sim_name(key_name),
            public_key=public,
            signer=ark_signer,
            extensions=[
                subject_key_identifier(public),
                authority_key_identifier(ark_key.public_key()),
                basic_constraints(ca=True, path_length=0),
                key_usage(cert_sign=True, crl_sign=False),
            ],
        )

    pki = _ProductPki(
        ark_der=ark,
        ask_der=intermediate(f"SIM-SEV-{product}", ask_key.public_key(), 1),
        asvk_der=intermediate(f"SIM-SEV-VLEK-{product}", asvk_key.public_key(), 0x101),
    )
    with _PKI_LOCK:
        _PKI_CACHE[(seed, product)] = pki
    return pki


class _LazyProductRoots(Mapping[str, ProductRoots]):
    """Product -> pinned simulated roots, generated on first access (RSA keygen is slow)."""

    def __init__(self, seed: bytes, products: tuple[str, ...]) -> None:
        self._seed = seed
        self._products = products
        self._built: dict[str, ProductRoots] = {}
        self._lock = threading.Lock()

    def __getitem__(self, product: str) -> ProductRoots:
        if product not in self._products:
            raise KeyError(product)
        with self._lock:
            roots = self._built.get(product)
            if roots is None:
                pki = _product_pki(self._seed, product)
                roots = ProductRoots(
                    product=product,
                    ark=load_certificate(pki.ark_der),
                    ask=load_certificate(pki.ask_der),
                    asvk=load_certificate(pki.asvk_der),
                )
                self._built[product] = roots
            return roots

    def __iter__(self) -> Iterator[str]:
        return iter(self._products)

    def __len__(self) -> int:
        return len(self._products)


_ROOTS_CACHE: dict[bytes, SnpTrustRoots] = {}
_LEAF_CACHE: dict[tuple[bytes, str, str, bytes, SnpTcb], bytes] = {}


class SimulatedSnp:
    """A SIMULATED SEV-SNP machine: one chip of ``product`` at TCB ``tcb``, keys from ``seed``.

    ``signing_key="vlek"`` signs reports with a VLEK (issued by the ASVK) instead of the VCEK.
    Reports verify with :func:`attestation.snp.verify_report` against :meth:`trust_roots`, and
    with nothing else.
    """

    def __init__(
        self,
        seed: bytes = DEFAULT_SEED,
        *,
        product: str = "Milan",
        tcb: SnpTcb | None = None,
        chip_id: bytes | None = None,
        signing_key: Literal["vcek", "vlek"] = "vcek",
    ) -> None:
        if product not in SNP_PRODUCTS:
            raise ValueError(f"unknown SNP product {product!r} (known: {SNP_PRODUCTS})")
        if signing_key not in ("vcek", "vlek"):
            raise ValueError(f"signing_key must be 'vcek' or 'vlek', not {signing_key!r}")
        self.seed = bytes(seed)
        self.product = product
        self.tcb = tcb if tcb is not None else _DEFAULT_TCB[product]
        self.tcb.raw(product)  # validates the components for this product's layout
        hwid_size = 8 if product == "Turin" else 64
        if chip_id is None:
            hwid = derive_bytes(self.seed, f"snp/{product}/chip-id", hwid_size)
        else:
            hwid = bytes(chip_id[:hwid_size])
            if len(chip_id) != 64 or (hwid_size == 8 and any(chip_id[8:])):
                raise ValueError(
                    f"chip_id must be 64 bytes{' (8 bytes then zeros on Turin)' * (hwid_size == 8)}"
                )
        self.hwid = hwid
        self.chip_id = hwid + bytes(64 - len(hwid))
        self.signing_key: Literal["vcek", "vlek"] = signing_key

    def __repr__(self) -> str:
        return (
            f"SimulatedSnp(product={self.product!r}, signing_key={self.signing_key!r}, SIMULATED)"
        )

    # -- the PKI -----------------------------------------------------------------------------

    @property
    def _pki(self) -> _ProductPki:
        return _product_pki(self.seed, self.product)

    def ark_der(self) -> bytes:
        """The simulated ARK (self-signed root) of this product, DER."""
        return self._pki.ark_der

    def ask_der(self) -> bytes:
        """The simulated ASK (issues VCEKs), DER."""
        return self._pki.ask_der

    def asvk_der(self) -> bytes:
        """The simulated ASVK (issues VLEKs), DER."""
        return self._pki.asvk_der

    def trust_roots(self) -> SnpTrustRoots:
        """The simulated roots of every product (``simulated=True``), generated on first use.

        Depends only on the seed: a verifier builds the same roots with
        ``SimulatedSnp(DEFAULT_SEED).trust_roots()``.
        """
        with _PKI_LOCK:
            roots = _ROOTS_CACHE.get(self.seed)
            if roots is None:
                roots = SnpTrustRoots(_LazyProductRoots(self.seed, SNP_PRODUCTS), simulated=True)
                _ROOTS_CACHE[self.seed] = roots
            return roots

    @cached_property
    def _leaf_key(self) -> ec.EllipticCurvePrivateKey:
        # Like AMD's VCEK: one key per chip and TCB (a VLEK: per "cloud provider" and TCB).
        owner = self.hwid.hex() if self.signing_key == "vcek" else "csp"
        label = f"snp/{self.product}/{self.signing_key}/{owner}/{self.tcb.raw(self.product):016x}"
        return ec_key(self.seed, label, ec.SECP384R1())

    def _leaf_extensions(self) -> list[bytes]:
        t = self.tcb

        def spl(number: str, value: int) -> bytes:
            return extension(f"{_AMD_OID}.3.{number}", d.integer(value))

        head = [
            extension(f"{_AMD_OID}.1", d.integer(_STRUCT_VERSION[self.product])),
            extension(f"{_AMD_OID}.2", d.ia5_string(_PRODUCT_NAME[self.product])),
        ]
        if self.product == "Turin":
            body = [
                spl("9", t.fmc or 0),
                spl("1", t.bootloader),
                spl("2", t.tee),
                spl("3", t.snp),
                spl("5", 0),
                spl("6", 0),
                spl("7", 0),
                spl("8", t.microcode),
            ]
        else:
            body = [
                spl("1", t.bootloader),
                spl("2", t.tee),
                spl("4", 0),
                spl("5", 0),
                spl("6", 0),
                spl("7", 0),
                spl("3", t.snp),
                spl("8", t.microcode),
            ]
        if self.signing_key == "vcek":
            # KDS puts the raw chip id in the extension value (no OCTET STRING wrapper).
            tail = [extension(f"{_AMD_OID}.4", self.hwid)]
        else:
            tail = [extension(f"{_AMD_OID}.5", d.ia5_string("cube-simulator.invalid"))]
        return head + body + tail

    @cached_property
    def _leaf_der(self) -> bytes:
        key = (self.seed, self.product, self.signing_key, self.hwid, self.tcb)
        with _PKI_LOCK:
            cached = _LEAF_CACHE.get(key)
        if cached is None:
            cached = self._build_leaf()
            with _PKI_LOCK:
                _LEAF_CACHE[key] = cached
        return cached

    def _build_leaf(self) -> bytes:
        issuer_key = rsa_key(
            self.seed, f"snp/{self.product}/{'ask' if self.signing_key == 'vcek' else 'asvk'}"
        )
        issuer_cn = (
            f"SIM-SEV-{self.product}"
            if self.signing_key == "vcek"
            else f"SIM-SEV-VLEK-{self.product}"
        )
        return build_certificate(
            serial=0,
            issuer=_sim_name(issuer_cn),
            subject=_sim_name("SEV-VCEK" if self.signing_key == "vcek" else "SEV-VLEK"),
            public_key=self._leaf_key.public_key(),
            signer=RsaPssSigner(issuer_key),
            extensions=self._leaf_extensions(),
        )

    def vcek_der(self) -> bytes:
        """The certificate of the key that signs this simulator's reports (VCEK or VLEK), DER."""
        # The ARK must exist before the ASK signs anything (and both come from the same cache).
        self._pki  # noqa: B018
        return self._leaf_der

    def cert_chain_pem(self) -> bytes:
        """ASK (or ASVK) then ARK, PEM: what AMD's KDS serves as ``cert_chain``."""
        intermediate = self.ask_der() if self.signing_key == "vcek" else self.asvk_der()
        return pem(intermediate) + pem(self.ark_der())

    def certificate_table(self, *, pad_to: int = 0) -> bytes:
        """The extended report's certificate table (what configfs-tsm's auxblob holds)."""
        leaf = self.vcek_der()
        if self.signing_key == "vcek":
            certs = {"vcek": leaf, "ask": self.ask_der(), "ark": self.ark_der()}
        else:
            certs = {"vlek": leaf, "ask": self.asvk_der(), "ark": self.ark_der()}
        return build_certificate_table(certs, pad_to=pad_to)

    def crl_der(
        self,
        *,
        revoked: tuple[int, ...] = (),
        this_update: datetime = EPOCH,
        next_update: datetime = NOT_AFTER,
    ) -> bytes:
        """A CRL signed by the simulated ARK, revoking the given serial numbers."""
        ark_key = rsa_key(self.seed, f"snp/{self.product}/ark")
        return build_crl(
            issuer=_sim_name(f"SIM-ARK-{self.product}"),
            issuer_key=ark_key.public_key(),
            signer=RsaPssSigner(ark_key),
            this_update=this_update,
            next_update=next_update,
            number=1,
            revoked=[(serial, this_update) for serial in revoked],
        )

    # -- reports -----------------------------------------------------------------------------

    def report(
        self,
        report_data: bytes = bytes(64),
        *,
        version: int = 5,
        guest_svn: int = 0,
        policy: int = 0x30000,
        family_id: bytes = bytes(16),
        image_id: bytes = bytes(16),
        vmpl: int = 0,
        measurement: bytes | None = None,
        host_data: bytes = bytes(32),
        id_key_digest: bytes = bytes(48),
        author_key_digest: bytes = bytes(48),
        report_id: bytes | None = None,
        report_id_ma: bytes = b"\xff" * 32,
        platform_info: int = 0x25,
        author_key_en: bool = False,
        mask_chip_key: bool = False,
        current_tcb: SnpTcb | int | None = None,
        reported_tcb: SnpTcb | int | None = None,
        committed_tcb: SnpTcb | int | None = None,
        launch_tcb: SnpTcb | int | None = None,
        chip_id: bytes | None = None,
        current_version: tuple[int, int, int] = (1, 55, 21),
        committed_version: tuple[int, int, int] = (1, 55, 21),
        cpuid: tuple[int, int, int] | None = None,
        launch_mit_vector: int = 0,
        current_mit_vector: int = 0,
    ) -> bytes:
        """A signed ATTESTATION_REPORT (1184 bytes, version 3 or 5 layout).

        Defaults describe a healthy guest at VMPL 0: policy 0x30000 (SMT allowed, no debug),
        every TCB equal to the chip's, CHIP_ID = the VCEK's hwID. ``measurement`` defaults to
        SHA-384 of "cube-simulator measurement". TCB values are :class:`SnpTcb` or raw ints.
        Nothing is checked beyond what the layout needs: tests may build bad reports on purpose.
        """
        if version not in (3, 5):
            raise ValueError("the simulator writes report versions 3 and 5")
        if len(report_data) != 64:
            raise ValueError(f"report_data must be 64 bytes, got {len(report_data)}")
        fixed = {
            "family_id": (family_id, 16),
            "image_id": (image_id, 16),
            "host_data": (host_data, 32),
            "id_key_digest": (id_key_digest, 48),
            "author_key_digest": (author_key_digest, 48),
            "report_id_ma": (report_id_ma, 32),
        }
        for what, (value, size) in fixed.items():
            if len(value) != size:
                raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
        if measurement is None:
            measurement = hashlib.sha384(b"cube-simulator measurement").digest()
        if len(measurement) != 48:
            raise ValueError(f"measurement must be 48 bytes, got {len(measurement)}")
        if report_id is None:
            report_id = derive_bytes(self.seed, f"snp/{self.product}/report-id", 32)
        if chip_id is None:
            chip_id = bytes(64) if mask_chip_key else self.chip_id
        if len(report_id) != 32 or len(chip_id) != 64:
            raise ValueError("report_id must be 32 bytes and chip_id 64 bytes")

        def tcb(value: SnpTcb | int | None) -> int:
            if value is None:
                return self.tcb.raw(self.product)
            return value if isinstance(value, int) else value.raw(self.product)

        flags = int(author_key_en) | int(mask_chip_key) << 1
        flags |= (0 if self.signing_key == "vcek" else 1) << 2
        data = bytearray(_REPORT_SIZE)
        struct.pack_into(
            "<IIQ16s16sIIQQII64s48s32s48s48s32s32sQ",
            data,
            0,
            version,
            guest_svn,
            policy,
            family_id,
            image_id,
            vmpl,
            1,  # SIGNATURE_ALGO: ECDSA P-384 with SHA-384
            tcb(current_tcb),
            platform_info,
            flags,
            0,
            report_data,
            measurement,
            host_data,
            id_key_digest,
            author_key_digest,
            report_id,
            report_id_ma,
            tcb(reported_tcb),
        )
        struct.pack_into("<3B", data, 0x188, *(cpuid or _CPUID[self.product]))
        data[0x1A0:0x1E0] = chip_id
        cur_major, cur_minor, cur_build = current_version
        com_major, com_minor, com_build = committed_version
        struct.pack_into(
            "<Q4B4BQ",
            data,
            0x1E0,
            tcb(committed_tcb),
            cur_build,
            cur_minor,
            cur_major,
            0,
            com_build,
            com_minor,
            com_major,
            0,
            tcb(launch_tcb),
        )
        if version >= 5:
            struct.pack_into("<QQ", data, 0x1F8, launch_mit_vector, current_mit_vector)
        return self.sign(bytes(data))

    def sign(self, report: bytes) -> bytes:
        """(Re-)sign ``report``'s bytes 0x000..0x2A0 with this simulator's VCEK/VLEK."""
        if len(report) != _REPORT_SIZE:
            raise ValueError(f"an SNP report is {_REPORT_SIZE} bytes, got {len(report)}")
        self.vcek_der()
        signer = EcdsaSigner(self._leaf_key, "sha384")
        r, s = raw_ecdsa_signature(signer.sign(report[:_SIGNATURE_OFFSET]), _COMPONENT)
        signature = r.to_bytes(_COMPONENT, "little") + s.to_bytes(_COMPONENT, "little")
        tail = bytes(_REPORT_SIZE - _SIGNATURE_OFFSET - len(signature))
        return report[:_SIGNATURE_OFFSET] + signature + tail
