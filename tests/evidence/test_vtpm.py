"""vTPM evidence with a real software TPM (swtpm through tpm2-pytss): alone, and next to a
simulated SEV-SNP report. The swtpm fixture is the TPM tests' own (tests/tpm/test_device.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import evidence, snp
from attestation.errors import (
    AttestationError,
    BindingError,
    PolicyError,
    VerificationError,
)
from attestation.policy import Policy
from attestation.tpm.device import TpmQuoter
from tests.evidence import _util as e
from tests.tpm import _build as build
from tests.tpm.test_device import swtpm  # noqa: F401 (the fixture, shared)

pytestmark = pytest.mark.slow

PCR_SELECTION = {"sha256": (0, 7, 16, 17)}
#: vTPM-only evidence is accepted only by a policy that lists "vtpm" (see test_vtpm_forgery).
VTPM = Policy.from_json({"format": "cube-policy/1", "platforms": ["vtpm"]})


@pytest.fixture(scope="module")
def quoter(swtpm: str) -> Iterator[TpmQuoter]:  # noqa: F811
    with TpmQuoter(swtpm) as q:
        yield q


@pytest.fixture(scope="module")
def vtpm_collector(quoter: TpmQuoter) -> evidence.EvidenceCollector:
    return evidence.EvidenceCollector(tee=None, tpm_quoter=quoter, tpm_selection=PCR_SELECTION)


def _claims(collector: evidence.EvidenceCollector, **overrides: Any) -> bytes:
    ak = collector.tpm_ak_sha256()
    assert ak is not None
    return e.claims_bytes(**{"tpm_ak_sha256": ak.hex(), **overrides})


@pytest.fixture(scope="module")
def vtpm_doc(vtpm_collector: evidence.EvidenceCollector) -> bytes:
    return vtpm_collector.collect(e.NONCE, _claims(vtpm_collector))


def _verify(document: bytes, policy: Policy = VTPM, nonce: bytes = e.NONCE) -> Any:
    return evidence.verify_evidence(document, nonce=nonce, policy=policy, now=e.NOW)


def _refuse(document: bytes, error: type[AttestationError], **kwargs: Any) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        _verify(document, **kwargs)
    assert isinstance(info.value, error), repr(info.value)
    return info.value


def test_vtpm_round_trip(vtpm_collector: evidence.EvidenceCollector, vtpm_doc: bytes) -> None:
    doc = json.loads(vtpm_doc)
    assert doc["platform"] == "vtpm" == vtpm_collector.platform
    assert "tee" not in doc
    assert set(doc["tpm"]) >= {"quote", "signature", "ak_public", "pcrs"}
    assert sorted(doc["tpm"]["pcrs"]["sha256"], key=int) == ["0", "7", "16", "17"]
    ak_public = base64.b64decode(doc["tpm"]["ak_public"])
    assert vtpm_collector.tpm_ak_sha256() == hashlib.sha256(ak_public).digest()

    verified = _verify(vtpm_doc)
    assert verified.platform == "vtpm" and not verified.simulated
    assert verified.tee is None and verified.tpm is not None
    assert verified.claims.tpm_ak_sha256 == vtpm_collector.tpm_ak_sha256()
    assert verified.tpm.attest.extra_data == evidence.tpm_qualifying_data_for(
        e.NONCE, _claims(vtpm_collector)
    )
    names = [c.name for c in verified.checks]
    assert "evidence.tpm.ak_bound_to_claims" in names
    assert all(c.passed for c in verified.checks)


def test_claims_naming_another_ak(vtpm_collector: evidence.EvidenceCollector) -> None:
    claims = _claims(vtpm_collector, tpm_ak_sha256=hashlib.sha256(b"another AK").hexdigest())
    document = vtpm_collector.collect(e.NONCE, claims)
    error = _refuse(document, BindingError)
    assert error.check == "evidence.tpm.ak_bound_to_claims"
    # Claims that name no AK at all do not vouch for the one in the document either.
    document = vtpm_collector.collect(e.NONCE, e.claims_bytes())
    assert _refuse(document, BindingError).check == "evidence.tpm.ak_bound_to_claims"


def test_vtpm_binding_refusals(vtpm_doc: bytes, vtpm_collector: evidence.EvidenceCollector) -> None:
    assert _refuse(vtpm_doc, BindingError, nonce=e.OTHER_NONCE).check == "evidence.nonce"
    altered = e.claims_of(vtpm_doc).replace(b'"0.1.0"', b'"0.1.1"')
    _refuse(e.set_claims(vtpm_doc, altered), BindingError)

    def other_pcr(doc: dict[str, Any]) -> None:
        doc["tpm"]["pcrs"]["sha256"]["16"] = "ab" * 32

    _refuse(e.edit(vtpm_doc, other_pcr), VerificationError)

    def other_ak(doc: dict[str, Any]) -> None:
        # A well-formed AK of another (software) key: not the one the claims name.
        key = ec.generate_private_key(ec.SECP256R1())
        doc["tpm"]["ak_public"] = base64.b64encode(build.public_ecc(key.public_key())).decode()

    error = _refuse(e.edit(vtpm_doc, other_ak), BindingError)
    assert error.check == "evidence.tpm.ak_bound_to_claims"


def test_vtpm_platform_must_be_allowed(vtpm_doc: bytes) -> None:
    assert _refuse(vtpm_doc, PolicyError, policy=Policy()).check == "policy.platform"
    only_snp = Policy.from_json({"format": "cube-policy/1", "platforms": ["sev-snp"]})
    assert _refuse(vtpm_doc, PolicyError, policy=only_snp).check == "policy.platform"


def test_pcr_policy(vtpm_doc: bytes) -> None:
    quoted = json.loads(vtpm_doc)["tpm"]["pcrs"]["sha256"]

    def pinned(value: str) -> Policy:
        return Policy.from_json(
            {
                "format": "cube-policy/1",
                "platforms": ["vtpm"],
                "vtpm": {"pcrs": {"sha256": {"16": value}}},
            }
        )

    _verify(vtpm_doc, pinned(quoted["16"]))
    error = _refuse(vtpm_doc, PolicyError, policy=pinned("cd" * 32))
    assert error.check == "policy.vtpm.sha256.pcr16"
    # A PCR the policy pins but the quote does not cover is refused too.
    absent = Policy.from_json(
        {
            "format": "cube-policy/1",
            "platforms": ["vtpm"],
            "vtpm": {"pcrs": {"sha256": {"3": "00" * 32}}},
        }
    )
    assert _refuse(vtpm_doc, PolicyError, policy=absent).check == "policy.vtpm.sha256.pcr3"


def test_simulated_snp_with_swtpm(quoter: TpmQuoter) -> None:
    collector = evidence.EvidenceCollector(
        tee=e.DEVICES["configfs-snp"](), tpm_quoter=quoter, tpm_selection=PCR_SELECTION
    )
    assert collector.platform == "sim-sev-snp"
    claims = _claims(collector)
    document = collector.collect(e.NONCE, claims)
    doc = json.loads(document)
    assert set(doc) == {"format", "platform", "nonce", "claims", "tee", "tpm"}
    both = e.policy(require_tpm=True)
    verified = _verify(document, both)
    assert isinstance(verified.tee, snp.VerifiedSnpReport)
    assert verified.tpm is not None
    assert verified.tee.report.report_data == evidence.report_data_for(e.NONCE, claims)
    assert verified.tpm.attest.extra_data == evidence.tpm_qualifying_data_for(e.NONCE, claims)

    def drop_tpm(d: dict[str, Any]) -> None:
        del d["tpm"]

    without = e.edit(document, drop_tpm)
    _verify(without, e.policy())  # the TEE report alone still verifies ...
    error = _refuse(without, PolicyError, policy=both)  # ... unless a vTPM quote is required
    assert error.check == "evidence.tpm.present"
    # The vTPM quote of one document does not bind another document's claims.
    other = collector.collect(e.NONCE, _claims(collector, agent_version="0.2.0"))

    def swap_tpm(d: dict[str, Any]) -> None:
        d["tpm"] = json.loads(other)["tpm"]

    _refuse(e.edit(document, swap_tpm), BindingError, policy=both)


def test_concurrent_collection_with_tee_and_tpm(quoter: TpmQuoter) -> None:
    """The collector serialises: TPM sessions and configfs-tsm entries are not shared."""
    collector = evidence.EvidenceCollector(
        tee=e.DEVICES["configfs-snp"](), tpm_quoter=quoter, tpm_selection=PCR_SELECTION
    )
    claims = _claims(collector)
    nonces = [hashlib.sha256(bytes([i])).digest() for i in range(6)]

    async def gather() -> list[bytes]:
        return list(await asyncio.gather(*(collector.acollect(n, claims) for n in nonces)))

    documents = asyncio.run(gather())
    policy = e.policy(require_tpm=True)
    for nonce, document in zip(nonces, documents, strict=True):
        verified = _verify(document, policy, nonce=nonce)
        assert verified.tpm is not None and verified.nonce == nonce
