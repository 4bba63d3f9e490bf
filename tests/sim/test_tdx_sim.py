"""The TDX simulator round-trips through the production verifier, and only through it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from attestation import Checks, tdx
from attestation._x509 import load_certificate
from attestation.errors import (
    CertificateChainError,
    CollateralError,
    MalformedError,
    PolicyError,
    RevokedError,
    SignatureError,
    TcbStatusError,
    ValidityError,
    VerificationError,
)
from attestation.sim import DEFAULT_SEED, SIM_FMSPC, SimulatedTdx, TdxPlatformTcb

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = hashlib.sha512(b"nonce").digest()
MRTD = hashlib.sha384(b"my TD").digest()
SIM = SimulatedTdx()


def verify(
    quote: bytes, collateral: tdx.Collateral | None = None, sim: SimulatedTdx = SIM, **kw: object
) -> tdx.VerifiedTdxQuote:
    return tdx.verify_quote(
        tdx.parse_quote(quote),
        collateral=collateral if collateral is not None else sim.collateral(),
        now=NOW,
        root=sim.root_certificate(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("version", "body_type"), [(4, 2), (5, 2), (5, 3)])
def test_round_trip_up_to_date(version: int, body_type: int) -> None:
    rtmrs = [hashlib.sha384(bytes([i])).digest() for i in range(4)]
    quote = SIM.quote(
        NONCE,
        version=version,
        body_type=body_type,
        mr_td=MRTD,
        rtmr0=rtmrs[0],
        rtmr1=rtmrs[1],
        rtmr2=rtmrs[2],
        rtmr3=rtmrs[3],
    )
    checks = Checks()
    verified = verify(quote, checks=checks)
    assert verified.tcb_status == "UpToDate"
    assert verified.advisory_ids == ()
    td = verified.quote.td_report
    assert verified.quote.version == version and verified.quote.body_type == body_type
    assert td.report_data == NONCE and td.mr_td == MRTD
    assert list(td.rtmrs) == rtmrs
    assert not td.debug and td.sept_ve_disable
    assert verified.pck.fmspc == SIM_FMSPC
    assert all(check.passed for check in checks)
    fields = verified.quote.fields()
    assert fields["mr_td"] == MRTD.hex() and fields["report_data"] == NONCE.hex()


def test_real_intel_root_refuses_a_simulated_quote() -> None:
    quote = tdx.parse_quote(SIM.quote(NONCE))
    with pytest.raises(CertificateChainError):
        tdx.verify_quote(quote, collateral=None, now=NOW)
    with pytest.raises(CertificateChainError):
        tdx.verify_quote(quote, collateral=SIM.collateral(), now=NOW)


def test_without_collateral_the_status_is_not_evaluated() -> None:
    verified = tdx.verify_quote(
        tdx.parse_quote(SIM.quote(NONCE)), collateral=None, now=NOW, root=SIM.root_certificate()
    )
    assert verified.tcb_status is None


@pytest.mark.parametrize("status", ["OutOfDate", "SWHardeningNeeded", "ConfigurationNeeded"])
def test_platform_tcb_status_from_collateral(status: str) -> None:
    verified = verify(SIM.quote(NONCE), SIM.collateral(tcb_status=status))
    assert verified.tcb_status == status
    assert verified.advisory_ids == ("INTEL-SA-00001-SIM",)


def test_revoked_platform_status() -> None:
    assert verify(SIM.quote(NONCE), SIM.collateral(tcb_status="Revoked")).tcb_status == "Revoked"


def test_out_of_date_qe_or_module_converges() -> None:
    assert verify(SIM.quote(NONCE), SIM.collateral(qe_status="OutOfDate")).tcb_status == (
        "OutOfDate"
    )
    assert verify(SIM.quote(NONCE), SIM.collateral(module_status="OutOfDate")).tcb_status == (
        "OutOfDate"
    )


def test_platform_below_the_current_level() -> None:
    old = TdxPlatformTcb(tee_tcb_svn=bytes([5, 1, 1]) + bytes(13))  # late microcode 1 < 2
    sim = SimulatedTdx(tcb=old)
    # The collateral of the up-to-date platform grades the old one by its lower level.
    assert verify(sim.quote(NONCE), SIM.collateral(), sim=sim).tcb_status == "OutOfDate"


def test_revoked_pck_certificate() -> None:
    collateral = SIM.collateral(revoked_pck_serials=[SIM.pck_serial()])
    with pytest.raises(RevokedError):
        verify(SIM.quote(NONCE), collateral)


def test_revoked_platform_ca() -> None:
    serial = load_certificate(SIM.platform_ca_der()).serial
    with pytest.raises(RevokedError):
        verify(SIM.quote(NONCE), SIM.collateral(revoked_ca_serials=[serial]))


def test_stale_collateral() -> None:
    stale = SIM.collateral(
        issue_date=datetime(2025, 1, 1, tzinfo=UTC), next_update=datetime(2025, 2, 1, tzinfo=UTC)
    )
    with pytest.raises(ValidityError):
        verify(SIM.quote(NONCE), stale)


def test_collateral_for_another_platform() -> None:
    with pytest.raises(CollateralError, match="FMSPC"):
        verify(SIM.quote(NONCE), SIM.collateral(fmspc=bytes.fromhex("00906ED50000")))


def test_collateral_json_form() -> None:
    document = json.loads(SIM.collateral_json())
    assert set(document) == {
        "pck_crl_issuer_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info_issuer_chain",
        "tcb_info",
        "tcb_info_signature",
        "qe_identity_issuer_chain",
        "qe_identity",
        "qe_identity_signature",
    }
    tcb_info = json.loads(document["tcb_info"])
    assert (tcb_info["id"], tcb_info["version"], tcb_info["fmspc"]) == ("TDX", 3, "C0BE51000000")
    assert json.loads(document["qe_identity"])["id"] == "TD_QE"
    collateral = tdx.Collateral.from_json(SIM.collateral_json())
    assert collateral.tcb_info.fmspc == SIM_FMSPC


def test_tampered_collateral_signature() -> None:
    document = json.loads(SIM.collateral_json())
    document["tcb_info"] = document["tcb_info"].replace('"tcbType":0', '"tcbType":0 ')
    with pytest.raises(SignatureError):
        verify(SIM.quote(NONCE), tdx.Collateral.from_json(json.dumps(document).encode()))


@pytest.mark.parametrize("position", [*range(0, 48 + 584, 41), 48 + 584 + 4 + 10])
def test_tampering_is_detected(position: int) -> None:
    quote = bytearray(SIM.quote(NONCE))
    quote[position] ^= 0x01
    with pytest.raises((VerificationError, MalformedError)):
        verify(bytes(quote))


def test_pki_shape_and_labels() -> None:
    root = SIM.root_certificate()
    assert root.subject.get("CN") == "SIM-SGX-Root-CA" and root.issuer.der == root.subject.der
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    quote = tdx.parse_quote(SIM.quote(NONCE))
    leaf, ca, anchor = quote.pck_chain
    assert anchor.der == SIM.root_der() and ca.der == SIM.platform_ca_der()
    assert leaf.subject.get("CN") == "SIM-SGX-PCK-Certificate"
    signing = load_certificate(SIM.tcb_signing_der())
    for cert in (root, ca, leaf, signing):
        assert cert.subject.get("O") == "Cube Simulator"
    ext = quote.pck_extensions
    assert ext.fmspc == SIM_FMSPC and ext.pce_id == bytes(2)
    assert ext.tcb.pcesvn == SIM.tcb.pcesvn and ext.tcb.components == SIM.tcb.sgx_components
    assert quote.trailing == b""
    qe = quote.qe_report
    assert qe.report_data[32:] == bytes(32) and qe.isv_prod_id == 2


def test_derivation_is_deterministic() -> None:
    other = SimulatedTdx(DEFAULT_SEED)
    assert other.root_der() == SIM.root_der()
    assert other.collateral_json() == SIM.collateral_json()
    assert other.quote(NONCE) == SIM.quote(NONCE)
    assert SimulatedTdx(b"another seed").root_der() != SIM.root_der()


def test_another_seed_is_refused() -> None:
    other = SimulatedTdx(b"another seed")
    with pytest.raises(VerificationError):
        verify(other.quote(NONCE))  # verified against SIM's root and collateral


def test_policy_validation() -> None:
    policy = tdx.TdxPolicy.from_json({"mr_td": [MRTD.hex()]})
    tdx.validate_quote(verify(SIM.quote(NONCE, mr_td=MRTD)), policy)
    with pytest.raises(PolicyError):
        tdx.validate_quote(verify(SIM.quote(NONCE)), policy)
    debug = SIM.quote(NONCE, mr_td=MRTD, td_attributes=bytes.fromhex("0100001000000000"))
    with pytest.raises(PolicyError):
        tdx.validate_quote(verify(debug), policy)
    with pytest.raises(TcbStatusError):
        tdx.validate_quote(
            verify(SIM.quote(NONCE, mr_td=MRTD), SIM.collateral(tcb_status="OutOfDate")), policy
        )


def test_tdreport_layout() -> None:
    report = SIM.tdreport(NONCE, mr_td=MRTD)
    assert len(report) == 1024
    assert report[0] == 0x81
    assert report[128:192] == NONCE
    # TDINFO starts at 512: attributes, xfam, then MRTD.
    assert report[512 + 16 : 512 + 64] == MRTD


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SIM.quote(bytes(10))
    with pytest.raises(ValueError):
        SIM.quote(NONCE, version=4, body_type=3)
    with pytest.raises(ValueError):
        SimulatedTdx(fmspc=b"x")
    with pytest.raises(ValueError):
        SIM.collateral(tcb_status="Great")
