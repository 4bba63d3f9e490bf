"""``cube-policy/1``: what a verifier accepts.

A policy is one strict JSON document (unknown keys are errors, byte fields are hex with their
length checked) made of small composable parts: the general part here, and one section per
platform (``sev_snp``, ``tdx``, ``vtpm``) defined beside that platform's validator. Defaults
fail closed: debug guests, simulated evidence, vTPM-only evidence, expired certificates, unknown
platforms and (for TDX) any TCB status but UpToDate are refused. An absent field means "not
checked" only for reference values (measurements, digests, PCRs) — which is why ``cube measure``
writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from attestation._json import (
    ObjectReader,
    decode_hex,
    loads_object,
    refuse_lone_surrogates,
    refuse_nulls,
)
from attestation.errors import InvalidPolicyError
from attestation.snp import SnpPolicy
from attestation.tdx import TdxPolicy
from attestation.tpm import TpmPolicy

__all__ = [
    "DEFAULT_PLATFORMS",
    "POLICY_FORMAT",
    "REAL_PLATFORMS",
    "SIMULATED_PLATFORMS",
    "Policy",
    "load_policy",
]

POLICY_FORMAT = "cube-policy/1"
REAL_PLATFORMS = ("sev-snp", "tdx", "vtpm")
#: What ``Policy()`` accepts. Not "vtpm": a vTPM-only document has no hardware root for its
#: AK (the claims that name the AK are bound only by a quote made with that same AK), so anyone
#: can produce one in software. A policy must list "vtpm" to accept it on purpose.
DEFAULT_PLATFORMS = ("sev-snp", "tdx")
SIMULATED_PLATFORMS = ("sim-sev-snp", "sim-tdx")
_DIGEST_PREFIX = "sha256:"


def _digests(reader: ObjectReader, key: str) -> frozenset[str] | None:
    values = reader.strings(key)
    if values is None:
        return None
    for value in values:
        if not value.startswith(_DIGEST_PREFIX):
            raise InvalidPolicyError(f"policy.{key}: {value!r} is not 'sha256:<64 hex>'")
        # Hex digits only (bytes.fromhex would also take spaces): one digest, one spelling.
        decode_hex(
            value.removeprefix(_DIGEST_PREFIX),
            what=f"policy.{key}: {value!r}",
            length=32,
            error=InvalidPolicyError,
        )
    return frozenset(v.lower() for v in values)


@dataclass(frozen=True)
class Policy:
    """A verifier's acceptance policy. ``Policy()`` is the strict default."""

    platforms: frozenset[str] = frozenset(DEFAULT_PLATFORMS)
    allow_simulated: bool = False
    #: Evidence whose claims were issued longer ago than this is stale.
    max_evidence_age_seconds: int = 300
    #: Tolerated clock skew for claims issued "in the future".
    max_clock_skew_seconds: int = 60
    #: Accepted model weight digests ("sha256:<hex>"); None = not checked.
    model_digests: frozenset[str] | None = None
    #: Accepted agent configuration digests ("sha256:<hex>"); None = not checked.
    config_digests: frozenset[str] | None = None
    #: Accepted agent versions; None = not checked.
    agent_versions: frozenset[str] | None = None
    #: Launch measurements (SNP MEASUREMENT or TDX MRTD, 48 bytes) refused whatever else says.
    revoked_measurements: frozenset[bytes] = frozenset()
    #: Require a vTPM quote in addition to the TEE report.
    require_tpm: bool = False
    sev_snp: SnpPolicy = field(default_factory=SnpPolicy)
    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    vtpm: TpmPolicy = field(default_factory=TpmPolicy)
    description: str = ""

    @classmethod
    def from_json(cls, obj: object) -> Policy:
        r = ObjectReader(obj, what="policy", error=InvalidPolicyError)
        refuse_nulls(obj, "policy", InvalidPolicyError)
        # A policy may come as a dict decoded by someone else (the proxy's API); its strings
        # are stored and printed, so a lone surrogate is refused here, not where it would crash.
        refuse_lone_surrogates(obj, "policy", InvalidPolicyError)
        fmt = r.string("format", required=True)
        if fmt != POLICY_FORMAT:
            raise InvalidPolicyError(f"policy.format: expected {POLICY_FORMAT!r}, got {fmt!r}")
        allow_simulated = r.boolean("allow_simulated", False)
        platforms = r.strings("platforms")
        known = (*REAL_PLATFORMS, *SIMULATED_PLATFORMS)
        for p in platforms or ():
            if p not in known:
                raise InvalidPolicyError(
                    f"policy.platforms: unknown platform {p!r} (known: {', '.join(known)})"
                )
        default = cls()
        # A year and a day: bounds far past any sensible value that keep times representable.
        max_age = r.integer("max_evidence_age_seconds", minimum=1, maximum=366 * 86400)
        skew = r.integer("max_clock_skew_seconds", minimum=0, maximum=86400)
        revoked = r.hex_list("revoked_measurements", 48)
        versions = r.strings("agent_versions")
        policy = cls(
            platforms=frozenset(platforms) if platforms is not None else default.platforms,
            allow_simulated=allow_simulated,
            max_evidence_age_seconds=max_age or default.max_evidence_age_seconds,
            max_clock_skew_seconds=default.max_clock_skew_seconds if skew is None else skew,
            model_digests=_digests(r, "model_digests"),
            config_digests=_digests(r, "config_digests"),
            agent_versions=None if versions is None else frozenset(versions),
            revoked_measurements=frozenset(revoked or ()),
            require_tpm=r.boolean("require_tpm", False),
            sev_snp=SnpPolicy.from_json(r.raw("sev_snp")) if "sev_snp" in r else SnpPolicy(),
            tdx=TdxPolicy.from_json(r.raw("tdx")) if "tdx" in r else TdxPolicy(),
            vtpm=TpmPolicy.from_json(r.raw("vtpm")) if "vtpm" in r else TpmPolicy(),
            description=r.string("description") or "",
        )
        r.finish()
        return policy

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "format": POLICY_FORMAT,
            "platforms": sorted(self.platforms),
            "allow_simulated": self.allow_simulated,
            "max_evidence_age_seconds": self.max_evidence_age_seconds,
            "max_clock_skew_seconds": self.max_clock_skew_seconds,
            "require_tpm": self.require_tpm,
            "revoked_measurements": sorted(m.hex() for m in self.revoked_measurements),
            "sev_snp": self.sev_snp.to_json(),
            "tdx": self.tdx.to_json(),
            "vtpm": self.vtpm.to_json(),
        }
        if self.description:
            out["description"] = self.description
        for key, values in (
            ("model_digests", self.model_digests),
            ("config_digests", self.config_digests),
            ("agent_versions", self.agent_versions),
        ):
            if values is not None:
                out[key] = sorted(values)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    def lists_platform(self, platform: str) -> bool:
        """Whether ``platforms`` names ``platform`` (a simulated one: itself or what it
        simulates; whether simulated evidence is allowed at all is ``allow_simulated``)."""
        return platform in self.platforms or platform.removeprefix("sim-") in self.platforms

    def accepts_platform(self, platform: str) -> bool:
        if platform in SIMULATED_PLATFORMS and not self.allow_simulated:
            return False
        return self.lists_platform(platform)

    def with_simulated(self, allowed: bool = True) -> Policy:
        return replace(self, allow_simulated=allowed)


def load_policy(source: bytes | str | Path) -> Policy:
    """Load a ``cube-policy/1`` document from bytes or a file path."""
    if isinstance(source, str | Path):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidPolicyError(f"cannot read policy {source}: {exc.strerror}") from exc
    else:
        data = source
    return Policy.from_json(loads_object(data, what="policy", error=InvalidPolicyError))
