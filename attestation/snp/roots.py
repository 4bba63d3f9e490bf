"""AMD SEV-SNP trust anchors: the ARK (root), ASK (VCEK issuer) and ASVK (VLEK issuer) per product.

The default roots are AMD's public certificates, shipped in ``attestation/snp/trust/`` (as KDS
serves them at ``/vcek/v1/{product}/cert_chain`` and ``/vlek/v1/{product}/cert_chain``). They
are trust anchors: a certificate chain supplied with evidence must end in the same ARK, byte
for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from attestation._x509 import Certificate, load_certificate
from attestation.errors import CertificateChainError, MalformedError
from attestation.snp.report import PRODUCTS

__all__ = ["DEFAULT_TRUST_ROOTS", "ProductRoots", "SnpTrustRoots"]


@dataclass(frozen=True)
class ProductRoots:
    """The pinned certificates of one product line.

    ``ask`` issues VCEKs, ``asvk`` issues VLEKs; either may be absent (then that kind of key
    cannot be verified for this product).
    """

    product: str
    ark: Certificate
    ask: Certificate | None = None
    asvk: Certificate | None = None

    def __post_init__(self) -> None:
        if self.ark.issuer.der != self.ark.subject.der:
            raise MalformedError(f"{self.product}: ARK {self.ark.describe()} is not self-issued")
        for name, cert in (("ASK", self.ask), ("ASVK", self.asvk)):
            if cert is not None and cert.issuer.der != self.ark.subject.der:
                raise MalformedError(
                    f"{self.product}: {name} {cert.describe()} is not issued by the ARK"
                )

    @classmethod
    def from_pem(
        cls, product: str, *, ark: bytes, ask: bytes | None = None, asvk: bytes | None = None
    ) -> ProductRoots:
        """Build from PEM (or DER) certificates."""
        return cls(
            product=product,
            ark=load_certificate(ark),
            ask=None if ask is None else load_certificate(ask),
            asvk=None if asvk is None else load_certificate(asvk),
        )

    def intermediate(self, signing_key: str) -> Certificate:
        """The pinned issuer for ``signing_key`` ("vcek" -> ASK, "vlek" -> ASVK)."""
        cert = self.ask if signing_key == "vcek" else self.asvk
        if cert is None:
            name = "ASK" if signing_key == "vcek" else "ASVK"
            raise CertificateChainError(f"no pinned {name} for {self.product}")
        return cert


@dataclass(frozen=True)
class SnpTrustRoots:
    """Pinned AMD roots by product name ("Milan", "Genoa", "Turin").

    ``simulated`` marks roots of a test PKI (see :mod:`attestation.sim`); verification results
    carry the flag so a policy can refuse simulated evidence.
    """

    products: Mapping[str, ProductRoots] = field(default_factory=lambda: MappingProxyType({}))
    simulated: bool = False

    @classmethod
    def of(cls, roots: Iterable[ProductRoots], *, simulated: bool = False) -> SnpTrustRoots:
        table: dict[str, ProductRoots] = {}
        for entry in roots:
            if entry.product in table:
                raise MalformedError(f"duplicate trust roots for {entry.product}")
            table[entry.product] = entry
        return cls(MappingProxyType(table), simulated)

    @classmethod
    def from_directory(cls, path: Path | str, *, simulated: bool = False) -> SnpTrustRoots:
        """Load ``ark_<product>.pem`` (and ``ask_``/``asvk_<product>.pem`` when present)."""
        base = Path(path)
        entries = []
        for product in PRODUCTS:
            ark = base / f"ark_{product.lower()}.pem"
            if not ark.is_file():
                continue
            ask = base / f"ask_{product.lower()}.pem"
            asvk = base / f"asvk_{product.lower()}.pem"
            entries.append(
                ProductRoots.from_pem(
                    product,
                    ark=ark.read_bytes(),
                    ask=ask.read_bytes() if ask.is_file() else None,
                    asvk=asvk.read_bytes() if asvk.is_file() else None,
                )
            )
        return cls.of(entries, simulated=simulated)

    def for_product(self, product: str) -> ProductRoots:
        try:
            return self.products[product]
        except KeyError:
            raise CertificateChainError(f"no trusted AMD roots for product {product}") from None


def _packaged() -> SnpTrustRoots:
    trust = resources.files("attestation.snp") / "trust"
    entries = []
    for product in PRODUCTS:
        name = product.lower()
        entries.append(
            ProductRoots.from_pem(
                product,
                ark=(trust / f"ark_{name}.pem").read_bytes(),
                ask=(trust / f"ask_{name}.pem").read_bytes(),
                asvk=(trust / f"asvk_{name}.pem").read_bytes(),
            )
        )
    return SnpTrustRoots.of(entries)


#: AMD's production roots for Milan, Genoa and Turin.
DEFAULT_TRUST_ROOTS: SnpTrustRoots = _packaged()
