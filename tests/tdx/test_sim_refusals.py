"""TDX refusals that need re-signed quotes or a re-shaped PKI, built on the simulator.

Each test pins one check (by the name it records) that no real vector can exercise: a debug or
mis-configured Quoting Enclave, a non-CA certificate issuing in a chain, the PCK CRL of the
other PCK CA, a PCK certificate without an EC key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from attestation import Checks, tdx
from attestation._x509 import load_certificate
from attestation.errors import AttestationError, CertificateChainError, CollateralError
from attestation.sim import SimulatedTdx
from attestation.sim._pki import (
    EPOCH,
    NOT_AFTER,
    EcdsaSigner,
    basic_constraints,
    build_certificate,
    build_crl,
    key_usage,
    pem,
)
from attestation.sim._tdx import _intel_name, _key, _raw_signature
from attestation.tdx import _verify

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SIM = SimulatedTdx()
NONCE = bytes(range(64))

# Offsets in the 384-byte SGX report body of the Quoting Enclave.
_MISCSELECT = 16
_ATTRIBUTES = 48
_MRSIGNER = 128
_ISVPRODID = 256


def _verify_sim(
    quote: bytes, collateral: tdx.Collateral | None, checks: Checks | None = None
) -> tdx.VerifiedTdxQuote:
    return tdx.verify_quote(
        tdx.parse_quote(quote),
        collateral=collateral,
        now=NOW,
        root=SIM.root_certificate(),
        checks=checks,
    )


def _refused_by(check: str, quote: bytes, collateral: tdx.Collateral | None) -> AttestationError:
    """Verify, expect a refusal, and return it after asserting that ``check`` is what failed."""
    checks = Checks()
    with pytest.raises(AttestationError) as info:
        _verify_sim(quote, collateral, checks)
    assert info.value.check == check, info.value
    assert [c.name for c in checks if not c.passed] == [check]
    return info.value


def _with_qe_report(quote: bytes, patches: dict[int, bytes]) -> bytes:
    """``quote`` with bytes of its QE report replaced, re-signed by the simulated PCK key."""
    qe = tdx.parse_quote(quote).qe_report.raw
    at = quote.index(qe)
    new = bytearray(qe)
    for offset, value in patches.items():
        new[offset : offset + len(value)] = value
    signature = _raw_signature(SIM._pck_key, bytes(new))
    assert quote[at + len(qe) : at + len(qe) + 64] == _raw_signature(SIM._pck_key, qe)
    return quote[:at] + bytes(new) + signature + quote[at + len(qe) + 64 :]


def _debug_attributes() -> bytes:
    attributes = bytearray(tdx.parse_quote(SIM.quote(NONCE)).qe_report.attributes)
    attributes[0] |= 0x02  # ATTRIBUTES.DEBUG
    return bytes(attributes)


def test_resigned_qe_report_still_verifies() -> None:
    """The helper changes only what it is told to: an unchanged re-sign verifies."""
    quote = _with_qe_report(SIM.quote(NONCE), {})
    assert _verify_sim(quote, SIM.collateral()).tcb_status == "UpToDate"
    assert _verify_sim(quote, None).tcb_status is None


# -- the Quoting Enclave, with collateral (QE identity) -------------------------------------------


def test_debug_quoting_enclave_refused_with_collateral() -> None:
    quote = _with_qe_report(SIM.quote(NONCE), {_ATTRIBUTES: _debug_attributes()})
    assert tdx.parse_quote(quote).qe_report.debug
    error = _refused_by("tdx.qe_identity.attributes", quote, SIM.collateral())
    assert isinstance(error, CollateralError)


def test_quoting_enclave_miscselect_must_match_the_qe_identity() -> None:
    quote = _with_qe_report(SIM.quote(NONCE), {_MISCSELECT: (1).to_bytes(4, "little")})
    error = _refused_by("tdx.qe_identity.miscselect", quote, SIM.collateral())
    assert isinstance(error, CollateralError)


# -- the Quoting Enclave, without collateral (must be Intel's TD QE) -----------------------------


@pytest.fixture
def sim_root_as_intels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the simulated root the "shipped Intel root", so the no-collateral QE checks run."""
    monkeypatch.setattr(_verify, "embedded_root", SIM.root_certificate)


def _intel_qe_quote(patches: dict[int, bytes] | None = None) -> bytes:
    return _with_qe_report(
        SIM.quote(NONCE), {_MRSIGNER: _verify.INTEL_TD_QE_MRSIGNER, **(patches or {})}
    )


@pytest.mark.usefixtures("sim_root_as_intels")
def test_intel_qe_without_collateral_passes_the_qe_checks() -> None:
    checks = Checks()
    _verify_sim(_intel_qe_quote(), None, checks)
    names = {c.name for c in checks if c.passed}
    assert {"tdx.qe_report.mrsigner", "tdx.qe_report.isvprodid", "tdx.qe_report.debug"} <= names


@pytest.mark.usefixtures("sim_root_as_intels")
def test_debug_quoting_enclave_refused_without_collateral() -> None:
    quote = _intel_qe_quote({_ATTRIBUTES: _debug_attributes()})
    _refused_by("tdx.qe_report.debug", quote, None)


@pytest.mark.usefixtures("sim_root_as_intels")
def test_quoting_enclave_isvprodid_must_be_intels_td_qe_without_collateral() -> None:
    quote = _intel_qe_quote({_ISVPRODID: (1).to_bytes(2, "little")})
    _refused_by("tdx.qe_report.isvprodid", quote, None)


# -- re-shaped PKIs ------------------------------------------------------------------------------


class _SimWithChain(SimulatedTdx):
    """The simulator with the PCK chain in its quotes replaced (the QE report key is the same)."""

    def __init__(self, chain_pem: bytes) -> None:
        super().__init__()
        self._chain_pem = chain_pem

    def pck_chain_pem(self) -> bytes:
        return self._chain_pem


def _pck_certificate(
    *, issuer_cn: str, issuer_label: str, public_key: rsa.RSAPublicKey | None = None
) -> bytes:
    """A PCK certificate like the simulator's, issued by ``issuer_label``'s key."""
    issuer_key = _key(SIM.seed, issuer_label)
    return build_certificate(
        serial=SIM.pck_serial(),
        issuer=_intel_name(issuer_cn),
        subject=_intel_name("SIM-SGX-PCK-Certificate"),
        public_key=public_key or SIM._pck_key.public_key(),
        signer=EcdsaSigner(issuer_key, "sha256"),
        extensions=[
            key_usage(cert_sign=False, crl_sign=False, digital_signature=True),
            basic_constraints(ca=False),
            SIM._sgx_extension(),
        ],
    )


def test_pck_certificate_issued_by_a_non_ca_is_refused() -> None:
    # The TCB Signing certificate (cA=FALSE, chained to the root) signs a PCK certificate.
    pck = _pck_certificate(issuer_cn="Intel SGX TCB Signing", issuer_label="tcb-signing")
    chain = pem(pck) + pem(SIM.tcb_signing_der()) + pem(SIM.root_der())
    quote = _SimWithChain(chain).quote(NONCE)
    assert load_certificate(SIM.tcb_signing_der()).is_ca() is False
    error = _refused_by("tdx.pck_chain.1.ca", quote, None)
    assert isinstance(error, CertificateChainError)


def test_tcb_signing_certificate_issued_by_a_non_ca_is_refused() -> None:
    # A TCB Signing certificate (same key, so the collateral signatures verify) issued by the
    # PCK certificate (cA=FALSE), which chains to the root through the PCK Platform CA.
    signing = build_certificate(
        serial=2,
        issuer=_intel_name("SIM-SGX-PCK-Certificate"),
        subject=_intel_name("Intel SGX TCB Signing"),
        public_key=_key(SIM.seed, "tcb-signing").public_key(),
        signer=EcdsaSigner(SIM._pck_key, "sha256"),
        extensions=[
            key_usage(cert_sign=False, crl_sign=False, digital_signature=True),
            basic_constraints(ca=False),
        ],
    )
    chain = pem(signing) + pem(SIM.pck_der()) + pem(SIM.platform_ca_der()) + pem(SIM.root_der())
    document = json.loads(SIM.collateral_json())
    document["tcb_info_issuer_chain"] = chain.decode()
    document["qe_identity_issuer_chain"] = chain.decode()
    collateral = tdx.Collateral.from_json(json.dumps(document).encode())
    error = _refused_by("tdx.collateral.tcb_info.chain.1.ca", SIM.quote(NONCE), collateral)
    assert isinstance(error, CertificateChainError)


def test_pck_crl_of_the_other_pck_ca_is_refused() -> None:
    """A PCK CRL from a (validly chained) Processor CA does not cover a Platform CA's PCK."""
    name = "SIM-SGX-PCK-Processor-CA"
    ca_key = _key(SIM.seed, "pck-processor-ca")
    root_key = _key(SIM.seed, "root")
    processor_ca = build_certificate(
        serial=3,
        issuer=_intel_name("SIM-SGX-Root-CA"),
        subject=_intel_name(name),
        public_key=ca_key.public_key(),
        signer=EcdsaSigner(root_key, "sha256"),
        extensions=[
            key_usage(cert_sign=True, crl_sign=True),
            basic_constraints(ca=True, path_length=0),
        ],
    )
    crl = build_crl(
        issuer=_intel_name(name),
        issuer_key=ca_key.public_key(),
        signer=EcdsaSigner(ca_key, "sha256"),
        this_update=EPOCH,
        next_update=NOT_AFTER,
        number=1,
    )
    document = json.loads(SIM.collateral_json())
    document["pck_crl"] = crl.hex()
    document["pck_crl_issuer_chain"] = (pem(processor_ca) + pem(SIM.root_der())).decode()
    collateral = tdx.Collateral.from_json(json.dumps(document).encode())
    error = _refused_by("tdx.collateral.pck_crl.scope", SIM.quote(NONCE), collateral)
    assert isinstance(error, CollateralError)


def test_pck_certificate_without_an_ec_key_is_refused_cleanly() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pck = _pck_certificate(
        issuer_cn="SIM-SGX-PCK-Platform-CA",
        issuer_label="pck-platform-ca",
        public_key=rsa_key.public_key(),
    )
    chain = pem(pck) + pem(SIM.platform_ca_der()) + pem(SIM.root_der())
    quote = _SimWithChain(chain).quote(NONCE)
    for collateral in (None, SIM.collateral()):
        error = _refused_by("tdx.pck_chain.leaf_key", quote, collateral)
        assert isinstance(error, CertificateChainError)
