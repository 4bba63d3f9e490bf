"""SnpPolicy: strict JSON, fail-closed defaults, and validation of verified reports."""

from __future__ import annotations

from typing import Any

import pytest

from attestation._checks import Checks
from attestation.errors import InvalidPolicyError, PolicyError, TcbStatusError
from attestation.snp import SnpMinTcb, SnpPolicy, parse_report, validate_report, verify_report
from attestation.snp.verify import VerifiedSnpReport
from tests import vectors
from tests.snp._util import ids, report_bytes, signed_report, snp_vectors, vcek_and_chain

SNP = snp_vectors()


def _verified(vector_id: str) -> VerifiedSnpReport:
    v = vectors.vector(vector_id)
    vcek, chain = vcek_and_chain(v)
    return verify_report(
        parse_report(report_bytes(v)), vcek=vcek, cert_chain=chain, now=vectors.time_inside(v)
    )


GO_SEV = "snp-milan-v2-go-sev-guest"  # guest policy 0xb0000: DEBUG set
TRUSTEE = "snp-milan-v2-trustee"  # current microcode 206 > reported 115; ID block present
TURIN = "snp-turin-v5-oak"
VLEK = "snp-milan-v3-vlek-aws-trustee"


def _refused(vector_id: str, policy: SnpPolicy) -> list[str]:
    checks = Checks()
    with pytest.raises(PolicyError):
        validate_report(_verified(vector_id), policy, checks=checks)
    return [c.name for c in checks if not c.passed]


# -- defaults -----------------------------------------------------------------------------------


def test_default_policy_refuses_the_debug_guest() -> None:
    assert _refused(GO_SEV, SnpPolicy()) == ["snp.policy.debug"]
    validate_report(_verified(GO_SEV), SnpPolicy(allow_debug=True))


@pytest.mark.parametrize("v", [v for v in SNP if v["id"] != GO_SEV], ids=ids(SNP)[1:])
def test_default_policy_accepts_the_other_vectors(v: dict[str, Any]) -> None:
    checks = Checks()
    validate_report(_verified(v["id"]), SnpPolicy(), checks=checks)
    assert all(c.passed for c in checks)
    assert SnpPolicy() == SnpPolicy.from_json({})


def test_default_refuses_a_migration_agent() -> None:
    s = signed_report(policy=0x30000 | 1 << 18)
    verified = verify_report(s.report, vcek=s.vcek, cert_chain=s.chain, now=s.now, roots=s.roots)
    with pytest.raises(PolicyError, match="migration agent"):
        validate_report(verified, SnpPolicy())
    validate_report(verified, SnpPolicy(allow_migration_agent=True))


def test_smt_and_single_socket_are_not_checked_by_default_and_can_be_required() -> None:
    smt_any_socket = signed_report(policy=0x30000)  # SMT allowed, not single-socket
    verified = verify_report(
        smt_any_socket.report,
        vcek=smt_any_socket.vcek,
        cert_chain=smt_any_socket.chain,
        now=smt_any_socket.now,
        roots=smt_any_socket.roots,
    )
    validate_report(verified, SnpPolicy())
    with pytest.raises(PolicyError, match="SMT"):
        validate_report(verified, SnpPolicy(allow_smt=False))
    with pytest.raises(PolicyError, match="one socket"):
        validate_report(verified, SnpPolicy(require_single_socket=True))

    strict = signed_report(policy=0x20000 | 1 << 20)  # SMT disallowed, single socket
    verified = verify_report(
        strict.report, vcek=strict.vcek, cert_chain=strict.chain, now=strict.now, roots=strict.roots
    )
    checks = Checks()
    validate_report(verified, SnpPolicy(allow_smt=False, require_single_socket=True), checks=checks)
    assert {"snp.policy.smt", "snp.policy.single_socket"} <= {c.name for c in checks}


# -- minimum TCB ----------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["bootloader", "tee", "snp", "microcode"])
def test_min_tcb_one_above_reported_is_refused(component: str) -> None:
    verified = _verified("snp-milan-v3-oak")
    value = verified.report.reported_tcb.components()[component]
    validate_report(verified, SnpPolicy(min_tcb=SnpMinTcb(**{component: value})))
    checks = Checks()
    with pytest.raises(TcbStatusError):
        validate_report(
            verified, SnpPolicy(min_tcb=SnpMinTcb(**{component: value + 1})), checks=checks
        )
    failed = [c for c in checks if not c.passed]
    assert len(failed) == 1
    assert failed[0].name.endswith(f".{component}")
    assert failed[0].expected == f">= {value + 1}" and failed[0].actual == str(value)


def test_min_tcb_checks_every_tcb_not_only_current() -> None:
    verified = _verified(TRUSTEE)
    assert verified.report.current_tcb.microcode == 206
    assert verified.report.reported_tcb.microcode == 115
    failed = _refused(TRUSTEE, SnpPolicy(min_tcb=SnpMinTcb(microcode=116)))
    # current passes (206); committed is checked next and refused.
    assert failed == ["snp.policy.min_tcb.committed.microcode"]


def test_fmc_minimum() -> None:
    checks = Checks()
    validate_report(_verified(GO_SEV), SnpPolicy(allow_debug=True, min_tcb=SnpMinTcb(fmc=5)),
                    checks=checks)  # fmt: skip
    fmc = [c for c in checks if c.name.endswith(".fmc")]
    assert len(fmc) == 4 and all("not applicable" in c.detail for c in fmc)
    validate_report(_verified(TURIN), SnpPolicy(min_tcb=SnpMinTcb(fmc=0)))
    assert _refused(TURIN, SnpPolicy(min_tcb=SnpMinTcb(fmc=1))) == [
        "snp.policy.min_tcb.current.fmc"
    ]


# -- reference values -------------------------------------------------------------------------


def test_measurement_pinning() -> None:
    verified = _verified(TURIN)
    good = verified.report.measurement
    validate_report(verified, SnpPolicy(measurements=(bytes(48), good)))
    assert _refused(TURIN, SnpPolicy(measurements=(bytes(48),))) == ["snp.policy.measurement"]


def test_host_data_vmpl_product_guest_svn() -> None:
    verified = _verified(TRUSTEE)
    validate_report(verified, SnpPolicy(host_data=bytes(32), vmpls=(0,), products=("Milan",)))
    assert _refused(TRUSTEE, SnpPolicy(host_data=b"\x01" * 32)) == ["snp.policy.host_data"]
    assert _refused(TRUSTEE, SnpPolicy(vmpls=(1, 2))) == ["snp.policy.vmpl"]
    assert _refused(TRUSTEE, SnpPolicy(products=("Genoa", "Turin"))) == ["snp.policy.product"]
    validate_report(verified, SnpPolicy(min_guest_svn=4))
    assert _refused(TRUSTEE, SnpPolicy(min_guest_svn=5)) == ["snp.policy.guest_svn"]


def test_id_block_values() -> None:
    report = _verified(TRUSTEE).report
    validate_report(
        _verified(TRUSTEE),
        SnpPolicy(
            family_ids=(report.family_id,),
            image_ids=(report.image_id,),
            id_key_digests=(report.id_key_digest,),
        ),
    )
    assert _refused(TRUSTEE, SnpPolicy(family_ids=(bytes(16),))) == ["snp.policy.family_id"]
    assert _refused(TRUSTEE, SnpPolicy(image_ids=(bytes(16),))) == ["snp.policy.image_id"]
    assert _refused(TRUSTEE, SnpPolicy(id_key_digests=(bytes(48),))) == ["snp.policy.id_key_digest"]
    # AUTHOR_KEY_EN is 0: pinning author keys refuses even an all-zero digest.
    assert _refused(TRUSTEE, SnpPolicy(author_key_digests=(bytes(48),))) == [
        "snp.policy.author_key_en"
    ]


def test_chip_ids() -> None:
    verified = _verified(TRUSTEE)
    validate_report(verified, SnpPolicy(chip_ids=(verified.report.chip_id,)))
    assert _refused(TRUSTEE, SnpPolicy(chip_ids=(bytes(64),))) == ["snp.policy.chip_id"]
    # A VLEK-signed report has no verified chip identity: pinned chip IDs refuse it.
    assert _refused(VLEK, SnpPolicy(chip_ids=(bytes(64),))) == ["snp.policy.chip_id_known"]


def test_vlek_refused_when_not_allowed() -> None:
    validate_report(_verified(VLEK), SnpPolicy())
    assert _refused(VLEK, SnpPolicy(allow_vlek=False)) == ["snp.policy.signing_key"]
    validate_report(_verified("snp-milan-v3-oak"), SnpPolicy(allow_vlek=False))


# -- strict JSON ------------------------------------------------------------------------------

FULL = {
    "measurements": ["ab" * 48, "CD" * 48],
    "host_data": "00" * 32,
    "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 0},
    "allow_debug": False,
    "allow_migration_agent": False,
    "vmpls": [0, 1],
    "products": ["Milan", "Genoa", "Turin"],
    "chip_ids": ["11" * 64],
    "allow_vlek": False,
    "family_ids": ["22" * 16],
    "image_ids": ["33" * 16],
    "id_key_digests": ["44" * 48],
    "author_key_digests": ["55" * 48],
    "min_guest_svn": 7,
    "allow_smt": False,
    "require_single_socket": True,
}


def test_from_json_reads_every_key_and_round_trips() -> None:
    policy = SnpPolicy.from_json(FULL)
    assert policy.measurements == (b"\xab" * 48, b"\xcd" * 48)
    assert policy.min_tcb == SnpMinTcb(bootloader=3, tee=0, snp=8, microcode=115, fmc=0)
    assert policy.vmpls == (0, 1) and policy.allow_vlek is False
    assert policy.allow_smt is False and policy.require_single_socket is True
    assert SnpPolicy.from_json(policy.to_json()) == policy
    assert SnpPolicy.from_json(SnpPolicy().to_json()) == SnpPolicy()


def test_smt_and_single_socket_keys_are_written_only_when_they_check_something() -> None:
    # A policy that does not use them stays readable by verifiers that predate them.
    assert not {"allow_smt", "require_single_socket"} & set(SnpPolicy().to_json())


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown": 1},
        {"min_tcb": {"microcode": 1, "ucode": 2}},
        {"measurements": ["ab" * 47]},
        {"measurements": ["ab" * 49]},
        {"measurements": ["zz" * 48]},
        {"measurements": "ab" * 48},
        {"measurements": []},
        {"host_data": "00" * 31},
        {"host_data": 0},
        {"chip_ids": ["00" * 63]},
        {"family_ids": ["00" * 17]},
        {"image_ids": ["00" * 15]},
        {"id_key_digests": ["00" * 32]},
        {"author_key_digests": ["00" * 64]},
        {"min_tcb": {"snp": 256}},
        {"min_tcb": {"snp": -1}},
        {"min_tcb": {"snp": True}},
        {"min_tcb": {"snp": "8"}},
        {"min_tcb": [1, 2]},
        {"allow_debug": 1},
        {"allow_debug": "false"},
        {"allow_vlek": None},
        {"allow_smt": 0},
        {"allow_smt": None},
        {"require_single_socket": "true"},
        {"min_tcb": {"snp": None}},
        {"vmpls": [4]},
        {"vmpls": [True]},
        {"vmpls": []},
        {"vmpls": 0},
        {"products": ["Rome"]},
        {"products": []},
        {"products": "Milan"},
        {"min_guest_svn": -1},
        {"min_guest_svn": 1 << 32},
        {"min_guest_svn": 1.5},
    ],
)
def test_from_json_is_strict(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidPolicyError):
        SnpPolicy.from_json(bad)


@pytest.mark.parametrize("bad", [None, [], "x", 1])
def test_from_json_needs_an_object(bad: object) -> None:
    with pytest.raises(InvalidPolicyError):
        SnpPolicy.from_json(bad)
