"""Shared pieces of the ``cube-evidence/1`` tests: claims, policies, simulated collectors."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attestation.evidence import EvidenceCollector, encode_claims
from attestation.guest import ConfigfsTsm, SevGuestDevice, TeeDevice
from attestation.policy import Policy
from attestation.sim import EmulatedConfigfsTsm, SimulatedSevGuestIo

#: Inside the simulator's certificate validity (2024 .. 2049).
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NONCE = bytes(range(32))
OTHER_NONCE = bytes(range(1, 33))
MODEL_DIGEST = "sha256:" + "11" * 32
CONFIG_DIGEST = "sha256:" + "22" * 32
#: What the simulator reports by default as SNP MEASUREMENT and (for TDX) MRTD label.
SIM_MEASUREMENT = hashlib.sha384(b"cube-simulator measurement").digest()

ALLOW_SIMULATED = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})


def claims_dict(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "tls_cert_sha256": hashlib.sha256(b"agent certificate").hexdigest(),
        "hpke_public_key": base64.b64encode(bytes(range(32))).decode(),
        "model": {"name": "tiny", "digest": MODEL_DIGEST},
        "config_digest": CONFIG_DIGEST,
        "agent_version": "0.1.0",
        "issued_at": NOW.isoformat().replace("+00:00", "Z"),
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def claims_bytes(**overrides: Any) -> bytes:
    return encode_claims(claims_dict(**overrides))


def policy(**fields: Any) -> Policy:
    """A policy allowing simulated evidence, plus ``fields``."""
    return Policy.from_json({"format": "cube-policy/1", "allow_simulated": True, **fields})


#: Production collectors over the simulator, by the platform they yield.
DEVICES: dict[str, Callable[..., TeeDevice]] = {
    "configfs-snp": lambda **kw: ConfigfsTsm(fs=EmulatedConfigfsTsm.snp(**kw)),
    "configfs-tdx": lambda **kw: ConfigfsTsm(fs=EmulatedConfigfsTsm.tdx(**kw)),
    "sev-guest": lambda **kw: SevGuestDevice(io=SimulatedSevGuestIo(**kw)),
}
PLATFORM_OF = {"configfs-snp": "sim-sev-snp", "configfs-tdx": "sim-tdx", "sev-guest": "sim-sev-snp"}


def collect(
    device: str = "configfs-snp",
    *,
    nonce: bytes = NONCE,
    claims: bytes | None = None,
    **report_fields: Any,
) -> bytes:
    """An evidence document from the simulator through the production collection path."""
    collector = EvidenceCollector(tee=DEVICES[device](**report_fields))
    return collector.collect(nonce, claims_bytes() if claims is None else claims)


def edit(document: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-encode an evidence document after ``change`` (the document, not the claims)."""
    doc: dict[str, Any] = json.loads(document)
    change(doc)
    return json.dumps(doc).encode()


def set_claims(document: bytes, claims: bytes) -> bytes:
    def change(doc: dict[str, Any]) -> None:
        doc["claims"] = base64.b64encode(claims).decode()

    return edit(document, change)


def claims_of(document: bytes) -> bytes:
    return base64.b64decode(json.loads(document)["claims"])
