"""The attesting client's side: a policy pinning model, configuration (and vTPM PCR), and the
first step of every session, :func:`attest`."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attestation.evidence import VerifiedEvidence, verify_evidence
from attestation.policy import Policy
from tests.e2e.servers import AgentProcess, cert_sha256, der_to_pem, fetch_evidence

RUNTIME_PCR = 15  # the agent's default runtime_pcr


def runtime_pcr_value(model_digest: str, config_digest: str) -> bytes:
    """PCR 15 (SHA-256 bank) of a freshly started swtpm after the agent's two runtime events,
    written down independently of agent.measure: extend(H("cube-agent/1 model <digest>")),
    then extend(H("cube-agent/1 config <digest>"))."""
    value = bytes(32)
    for event in (f"cube-agent/1 model {model_digest}", f"cube-agent/1 config {config_digest}"):
        value = hashlib.sha256(value + hashlib.sha256(event.encode()).digest()).digest()
    return value


def make_policy(
    model_digest: str, config_digest: str, *, pcr15: bytes | None, **overrides: Any
) -> Policy:
    doc: dict[str, Any] = {
        "format": "cube-policy/1",
        "allow_simulated": True,
        "model_digests": [model_digest],
        "config_digests": [config_digest],
    }
    if pcr15 is not None:
        doc["require_tpm"] = True
        doc["vtpm"] = {"pcrs": {"sha256": {str(RUNTIME_PCR): pcr15.hex()}}}
    doc.update(overrides)
    return Policy.from_json(doc)


def attest(agent: AgentProcess, policy: Policy, cert_file: Path) -> tuple[VerifiedEvidence, bytes]:
    """The client's first step: evidence for a fresh nonce, verified; the connection's
    certificate must be the one the claims name; then it is pinned (written to cert_file)."""
    nonce = secrets.token_bytes(32)
    status, document, der = fetch_evidence(agent.port, nonce)
    assert status == 200, document[:500]
    evidence = verify_evidence(document, nonce=nonce, policy=policy, now=datetime.now(UTC))
    assert evidence.claims.tls_cert_sha256 == cert_sha256(der), (
        "the TLS certificate of this connection is not the attested one"
    )
    cert_file.write_text(der_to_pem(der))
    return evidence, der
