"""The ``sev_snp`` section of ``cube-policy/1`` and its validation against a verified report.

Defaults fail closed: a debug guest or one that allows a migration agent is refused unless the
policy says otherwise. Reference values (measurements, HOST_DATA, IDs) are checked only when
given; an empty list is rejected as a policy error because it could never match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Self

from attestation._checks import Checks
from attestation._json import ObjectReader, refuse_nulls
from attestation.errors import InvalidPolicyError, PolicyError, TcbStatusError
from attestation.snp.report import PRODUCTS
from attestation.snp.verify import VerifiedSnpReport

__all__ = ["SnpMinTcb", "SnpPolicy", "validate_report"]

_TCB_COMPONENTS: Final = ("bootloader", "tee", "snp", "microcode", "fmc")
_U32_MAX: Final = 0xFFFF_FFFF


def _int_in_range(reader: ObjectReader, key: str, maximum: int) -> int | None:
    return reader.integer(key, maximum=maximum)


def _hex_list(reader: ObjectReader, key: str, length: int) -> tuple[bytes, ...] | None:
    values = reader.hex_list(key, length)
    if values is not None and not values:
        raise InvalidPolicyError(f"{reader.what}.{key}: empty list (omit the key to skip it)")
    return values


@dataclass(frozen=True)
class SnpMinTcb:
    """Minimum SVN per TCB component; None means that component is not checked."""

    bootloader: int | None = None
    tee: int | None = None
    snp: int | None = None
    microcode: int | None = None
    fmc: int | None = None  # Turin only

    @classmethod
    def from_json(cls, obj: object) -> Self:
        refuse_nulls(obj, "policy.sev_snp.min_tcb", InvalidPolicyError)
        reader = ObjectReader(obj, what="policy.sev_snp.min_tcb", error=InvalidPolicyError)
        values = {name: _int_in_range(reader, name, 0xFF) for name in _TCB_COMPONENTS}
        reader.finish()
        return cls(**values)

    def to_json(self) -> dict[str, object]:
        return {
            name: getattr(self, name) for name in _TCB_COMPONENTS if getattr(self, name) is not None
        }

    def items(self) -> list[tuple[str, int]]:
        return [(n, v) for n in _TCB_COMPONENTS if (v := getattr(self, n)) is not None]


@dataclass(frozen=True)
class SnpPolicy:
    """What a verifier accepts from an SEV-SNP report. ``SnpPolicy()`` is the strict default."""

    measurements: tuple[bytes, ...] | None = None
    host_data: bytes | None = None
    min_tcb: SnpMinTcb = SnpMinTcb()
    allow_debug: bool = False
    allow_migration_agent: bool = False
    vmpls: tuple[int, ...] | None = None
    products: tuple[str, ...] | None = None
    chip_ids: tuple[bytes, ...] | None = None
    allow_vlek: bool = True
    family_ids: tuple[bytes, ...] | None = None
    image_ids: tuple[bytes, ...] | None = None
    id_key_digests: tuple[bytes, ...] | None = None
    author_key_digests: tuple[bytes, ...] | None = None
    min_guest_svn: int | None = None
    #: False: the guest policy must forbid SMT on the host (bit 16 clear).
    allow_smt: bool = True
    #: True: the guest policy must confine the guest to one socket (bit 20 set).
    require_single_socket: bool = False

    @classmethod
    def from_json(cls, obj: object) -> Self:
        """Read the ``sev_snp`` section (strict: unknown keys and bad values are refused)."""
        refuse_nulls(obj, "policy.sev_snp", InvalidPolicyError)
        reader = ObjectReader(obj, what="policy.sev_snp", error=InvalidPolicyError)
        min_tcb_obj = reader.raw("min_tcb")
        vmpls_obj = reader.raw("vmpls")
        vmpls: tuple[int, ...] | None = None
        if vmpls_obj is not None:
            if (
                not isinstance(vmpls_obj, list)
                or not vmpls_obj
                or not all(type(v) is int and 0 <= v <= 3 for v in vmpls_obj)
            ):
                raise InvalidPolicyError(
                    "policy.sev_snp.vmpls: expected a non-empty list of integers 0..3"
                )
            vmpls = tuple(vmpls_obj)
        products = reader.strings("products")
        if products is not None:
            unknown = [p for p in products if p not in PRODUCTS]
            if unknown or not products:
                raise InvalidPolicyError(
                    f"policy.sev_snp.products: expected a non-empty list of {list(PRODUCTS)}"
                )
        policy = cls(
            measurements=_hex_list(reader, "measurements", 48),
            host_data=reader.hex("host_data", 32),
            min_tcb=SnpMinTcb() if min_tcb_obj is None else SnpMinTcb.from_json(min_tcb_obj),
            allow_debug=reader.boolean("allow_debug", False),
            allow_migration_agent=reader.boolean("allow_migration_agent", False),
            vmpls=vmpls,
            products=products,
            chip_ids=_hex_list(reader, "chip_ids", 64),
            allow_vlek=reader.boolean("allow_vlek", True),
            family_ids=_hex_list(reader, "family_ids", 16),
            image_ids=_hex_list(reader, "image_ids", 16),
            id_key_digests=_hex_list(reader, "id_key_digests", 48),
            author_key_digests=_hex_list(reader, "author_key_digests", 48),
            min_guest_svn=_int_in_range(reader, "min_guest_svn", _U32_MAX),
            allow_smt=reader.boolean("allow_smt", True),
            require_single_socket=reader.boolean("require_single_socket", False),
        )
        reader.finish()
        return policy

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}

        def hex_list(key: str, values: tuple[bytes, ...] | None) -> None:
            if values is not None:
                out[key] = [v.hex() for v in values]

        hex_list("measurements", self.measurements)
        if self.host_data is not None:
            out["host_data"] = self.host_data.hex()
        if self.min_tcb.items():
            out["min_tcb"] = self.min_tcb.to_json()
        out["allow_debug"] = self.allow_debug
        out["allow_migration_agent"] = self.allow_migration_agent
        if self.vmpls is not None:
            out["vmpls"] = list(self.vmpls)
        if self.products is not None:
            out["products"] = list(self.products)
        hex_list("chip_ids", self.chip_ids)
        out["allow_vlek"] = self.allow_vlek
        hex_list("family_ids", self.family_ids)
        hex_list("image_ids", self.image_ids)
        hex_list("id_key_digests", self.id_key_digests)
        hex_list("author_key_digests", self.author_key_digests)
        if self.min_guest_svn is not None:
            out["min_guest_svn"] = self.min_guest_svn
        # Written only when they check something, so older verifiers still read the policy.
        if not self.allow_smt:
            out["allow_smt"] = False
        if self.require_single_socket:
            out["require_single_socket"] = True
        return out


def _one_of(
    checks: Checks,
    name: str,
    allowed: tuple[bytes, ...] | None,
    actual: bytes,
    what: str,
) -> None:
    if allowed is None:
        checks.ok(name, actual=actual, detail="not checked (no reference values in the policy)")
        return
    checks.require(
        actual in allowed,
        name,
        PolicyError,
        f"{what} {actual.hex()} is not one the policy accepts",
        expected=" | ".join(v.hex() for v in allowed),
        actual=actual,
    )


def validate_report(
    verified: VerifiedSnpReport, policy: SnpPolicy, *, checks: Checks | None = None
) -> None:
    """Apply ``policy`` to a verified report; raise :class:`PolicyError` on the first refusal."""
    checks = Checks() if checks is None else checks
    report = verified.report
    guest = report.guest_policy

    checks.require(
        policy.allow_debug or not guest.debug,
        "snp.policy.debug",
        PolicyError,
        "guest policy allows debugging (bit 19): the host can read guest memory",
        expected="debug disallowed" if not policy.allow_debug else "any",
        actual=f"policy {report.policy:#x} (debug={guest.debug})",
    )
    checks.require(
        policy.allow_migration_agent or not guest.migrate_ma,
        "snp.policy.migration_agent",
        PolicyError,
        "guest policy allows a migration agent (bit 18)",
        expected="migration agent disallowed" if not policy.allow_migration_agent else "any",
        actual=f"policy {report.policy:#x} (migrate_ma={guest.migrate_ma})",
    )
    checks.require(
        policy.allow_smt or not guest.smt,
        "snp.policy.smt",
        PolicyError,
        "guest policy allows SMT on the host (bit 16) and the policy requires it disallowed",
        expected="SMT disallowed" if not policy.allow_smt else "any",
        actual=f"policy {report.policy:#x} (smt={guest.smt})",
    )
    checks.require(
        not policy.require_single_socket or guest.single_socket,
        "snp.policy.single_socket",
        PolicyError,
        "guest policy does not confine the guest to one socket (bit 20) and the policy requires it",
        expected="single socket" if policy.require_single_socket else "any",
        actual=f"policy {report.policy:#x} (single_socket={guest.single_socket})",
    )
    if policy.vmpls is None:
        checks.ok("snp.policy.vmpl", actual=report.vmpl, detail="any VMPL accepted")
    else:
        checks.require(
            report.vmpl in policy.vmpls,
            "snp.policy.vmpl",
            PolicyError,
            f"VMPL {report.vmpl} is not one the policy accepts",
            expected=", ".join(map(str, policy.vmpls)),
            actual=report.vmpl,
        )
    if policy.products is None:
        checks.ok("snp.policy.product", actual=verified.product, detail="any product accepted")
    else:
        checks.require(
            verified.product in policy.products,
            "snp.policy.product",
            PolicyError,
            f"product {verified.product} is not one the policy accepts",
            expected=", ".join(policy.products),
            actual=verified.product,
        )
    checks.require(
        policy.allow_vlek or verified.signing_key != "vlek",
        "snp.policy.signing_key",
        PolicyError,
        "report is signed with a VLEK (cloud-provider key) and the policy does not allow VLEK",
        expected="vcek" if not policy.allow_vlek else "vcek | vlek",
        actual=verified.signing_key,
    )
    _one_of(checks, "snp.policy.measurement", policy.measurements, report.measurement,
            "MEASUREMENT")  # fmt: skip
    if policy.host_data is None:
        checks.ok("snp.policy.host_data", actual=report.host_data, detail="not checked")
    else:
        checks.equal(
            "snp.policy.host_data", policy.host_data, report.host_data, PolicyError, "HOST_DATA"
        )
    if policy.chip_ids is not None:
        checks.require(
            verified.chip_id_checked,
            "snp.policy.chip_id_known",
            PolicyError,
            f"the policy pins chip IDs but this report's chip is not identified "
            f"({verified.chip_id_note})",
        )
    _one_of(checks, "snp.policy.chip_id", policy.chip_ids, report.chip_id, "CHIP_ID")
    _one_of(checks, "snp.policy.family_id", policy.family_ids, report.family_id, "FAMILY_ID")
    _one_of(checks, "snp.policy.image_id", policy.image_ids, report.image_id, "IMAGE_ID")
    _one_of(checks, "snp.policy.id_key_digest", policy.id_key_digests, report.id_key_digest,
            "ID_KEY_DIGEST")  # fmt: skip
    if policy.author_key_digests is not None:
        checks.require(
            report.author_key_en,
            "snp.policy.author_key_en",
            PolicyError,
            "the policy pins author keys but the report has no author key (AUTHOR_KEY_EN = 0)",
        )
    _one_of(checks, "snp.policy.author_key_digest", policy.author_key_digests,
            report.author_key_digest, "AUTHOR_KEY_DIGEST")  # fmt: skip
    if policy.min_guest_svn is None:
        checks.ok("snp.policy.guest_svn", actual=report.guest_svn, detail="not checked")
    else:
        checks.require(
            report.guest_svn >= policy.min_guest_svn,
            "snp.policy.guest_svn",
            PolicyError,
            f"GUEST_SVN {report.guest_svn} is below the minimum {policy.min_guest_svn}",
            expected=f">= {policy.min_guest_svn}",
            actual=report.guest_svn,
        )
    minimums = policy.min_tcb.items()
    if not minimums:
        checks.ok("snp.policy.min_tcb", detail="no minimum TCB in the policy")
    for tcb_name, tcb in report.tcbs().items():
        components = tcb.components()
        for component, minimum in minimums:
            name = f"snp.policy.min_tcb.{tcb_name}.{component}"
            if component not in components:
                checks.ok(name, detail=f"not applicable to the {tcb.layout} TCB layout")
                continue
            value = components[component]
            checks.require(
                value >= minimum,
                name,
                TcbStatusError,
                f"{tcb_name.upper()}_TCB {component} SVN {value} is below the minimum {minimum}",
                expected=f">= {minimum}",
                actual=value,
            )
