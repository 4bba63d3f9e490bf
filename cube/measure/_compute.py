"""From a build directory to reference values: ``measurements.json`` and a ``cube-policy/1``.

Inputs (scripts/build-image's output, contract §4): ``cube.efi`` (the UKI), ``agent-config.json``
(the agent configuration the VM is given), ``model-volume.json`` (the model volume, optional).
Nothing is learned from a running VM: every value is computed from these bytes with a rule that
``measurements.json`` names beside it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import ConfigError, load_config
from attestation.policy import Policy
from attestation.snp import SnpPolicy
from attestation.tpm import TpmPolicy
from cube.measure._events import (
    Event,
    agent_events,
    pcr4_events,
    pcr7_events,
    pcr9_events,
    pcr11_events,
    replay,
)
from cube.measure._snp import SnpError, SnpMeasurement, snp_measure
from cube.measure._uki import UkiError, load_uki

__all__ = [
    "DEFAULT_PCRS",
    "MEASUREMENTS_FORMAT",
    "MeasureError",
    "MeasureOptions",
    "Measurements",
    "measure_build",
]

MEASUREMENTS_FORMAT = "cube-measurements/1"
DEFAULT_PCRS = (4, 7, 9, 11, 15)
UKI_NAME = "cube.efi"
CONFIG_NAME = "agent-config.json"
VOLUME_NAME = "model-volume.json"

#: Why the other PCRs are not pinned (they depend on the host's firmware build and VM shape).
NOT_PINNED = {
    "0": "firmware code (OVMF build of the host running the VM): pin per deployment if wanted",
    "1": "firmware configuration: CPU count, memory size, SMBIOS, boot order, fw_cfg files",
    "2": "option ROMs (e.g. iPXE of a virtio-net device): depends on the VM's devices",
    "3": "option ROM configuration",
    "5": "GPT of the boot disk and ExitBootServices events: depends on how the disk is attached",
    "6": "platform manufacturer events (unused by OVMF)",
    "8": "unused on this boot path (no GRUB)",
    "10": "IMA (not enabled in the image)",
    "12": "systemd-stub: kernel command line overrides, credentials, addons (none expected)",
    "13": "systemd-stub: system extensions (none expected)",
    "14": "shim MOK (no shim)",
}
RULES = {
    4: "replay of: EV_EFI_ACTION 'Calling EFI Application from Boot Option', EV_SEPARATOR, "
    "EV_EFI_BOOT_SERVICES_APPLICATION = Authenticode SHA-256 of cube.efi, then of its .linux "
    "section (systemd-stub 257 starts the kernel through LoadImage) (OVMF Tcg2Dxe)",
    7: "replay of EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot=0, PK, KEK, db, dbx (empty), "
    "EV_SEPARATOR: Secure Boot disabled, no keys enrolled (Debian OVMF_VARS_4M.fd)",
    9: "replay of Linux EFI stub tagged events: LoadOptions (UTF-16LE command line + NUL), then "
    "the initrd received through LoadFile2 (.initrd, then systemd-stub's cpio of "
    ".extra/os-release from .osrel, each padded to 4 bytes)",
    11: "replay of systemd-stub: for each UKI section in .linux .osrel .cmdline .initrd .ucode "
    ".splash .dtb .uname .sbat .pcrpkey .profile .dtbauto .hwids order (present ones, never "
    ".pcrsig): SHA-256(name + NUL), then SHA-256(content, VirtualSize bytes)",
    15: "replay of the agent's runtime events (agent/measure.py): SHA-256('cube-agent/1 model "
    "<model digest>'), then SHA-256('cube-agent/1 config <config digest>')",
}


class MeasureError(ValueError):
    """The build directory cannot be measured (missing, malformed or inconsistent input)."""


@dataclass(frozen=True)
class MeasureOptions:
    pcrs: tuple[int, ...] = DEFAULT_PCRS
    kernel_load_measured: bool = True
    #: systemd-pcrphase strings extended into PCR 11 before the quote (none if the image
    #: does not run systemd-pcrphase).
    pcr11_phases: tuple[str, ...] = ()
    ovmf: Path | None = None
    sev_snp_measure: str | None = None
    vcpus: tuple[int, ...] = (1, 2, 4)
    vcpu_types: tuple[str, ...] = ("EPYC-v4", "EPYC-Milan", "EPYC-Genoa")
    require_event_log: bool = True


@dataclass
class Measurements:
    document: dict[str, object]
    policy: Policy
    snp_policy: Policy | None = None
    notes: list[str] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps(self.document, indent=2, sort_keys=True) + "\n"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MeasureError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _cmdline_values(cmdline: str, key: str) -> list[str]:
    return [w.split("=", 1)[1] for w in cmdline.split() if w.startswith(key + "=")]


def _single(cmdline: str, key: str) -> str | None:
    values = _cmdline_values(cmdline, key)
    if len(values) > 1:
        raise MeasureError(f"the UKI command line has {key}= more than once")
    return values[0] if values else None


def measure_build(build_dir: Path, options: MeasureOptions | None = None) -> Measurements:
    """Compute every reference value of ``build_dir``. Blocking (hashing, sev-snp-measure)."""
    opts = options or MeasureOptions()
    notes: list[str] = []
    uki_path = build_dir / UKI_NAME
    uki_data = _read(uki_path, "UKI")
    try:
        uki = load_uki(uki_data)
        cmdline = uki.cmdline()
    except UkiError as exc:
        raise MeasureError(f"{uki_path}: {exc}") from exc

    # The agent configuration: its file must be the one the command line pins, and its
    # canonical digest is what the agent extends into PCR 15 and names in its evidence.
    config_path = build_dir / CONFIG_NAME
    config_bytes = _read(config_path, "agent configuration")
    config_file_sha = hashlib.sha256(config_bytes).hexdigest()
    pinned_sha = _single(cmdline, "cube.config_sha256")
    if pinned_sha is None:
        raise MeasureError("the UKI command line has no cube.config_sha256=")
    if not hmac.compare_digest(pinned_sha, config_file_sha):  # lowercase, as start-agent wants
        raise MeasureError(
            f"{config_path} has SHA-256 {config_file_sha} but the UKI command line pins "
            f"cube.config_sha256={pinned_sha}: this configuration would be refused at boot"
        )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise MeasureError(f"{config_path}: {exc}") from exc
    try:
        config.validate()
    except ConfigError as exc:
        # Still measurable (the digest is defined), but say so loudly: such a VM never serves.
        notes.append(f"the agent would refuse {CONFIG_NAME} at start: {exc}")
    config_digest = config.digest()
    model_digest = config.model_digest
    if model_digest is None:
        raise MeasureError(f"{config_path} pins no model_digest")

    volume: dict[str, object] | None = None
    volume_path = build_dir / VOLUME_NAME
    if volume_path.exists():
        try:
            loaded = json.loads(_read(volume_path, "model volume description"))
        except (ValueError, RecursionError) as exc:  # (not UTF-8 is a ValueError too)
            raise MeasureError(f"{volume_path}: not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise MeasureError(f"{volume_path}: expected an object")
        volume = loaded
        if volume.get("model_digest") != model_digest:
            raise MeasureError(
                f"{volume_path} holds model {volume.get('model_digest')}, the agent "
                f"configuration pins {model_digest}"
            )
        root_hash = _single(cmdline, "cube.model_root_hash")
        if root_hash is None:
            raise MeasureError(
                f"{volume_path} describes a model volume but the UKI command line pins no "
                "cube.model_root_hash=: the VM could not open it"
            )
        if root_hash != volume.get("root_hash"):
            raise MeasureError(
                f"the UKI command line pins cube.model_root_hash={root_hash}, "
                f"{volume_path} has {volume.get('root_hash')}"
            )
    else:
        notes.append(f"no {VOLUME_NAME}: the model volume's root hash is not cross-checked")

    source = f"{UKI_NAME} (sha256 {uki.sha256.hex()})"
    events: list[Event] = []
    try:
        events += pcr4_events(uki, source=source, kernel_load_measured=opts.kernel_load_measured)
    except UkiError as exc:
        raise MeasureError(f"{uki_path}: {exc}") from exc
    events += pcr7_events()
    try:
        events += pcr9_events(uki, source=source)
    except ValueError as exc:
        if 9 in opts.pcrs:
            raise MeasureError(str(exc)) from exc
        notes.append(str(exc))
    events += pcr11_events(uki, source=source, phases=opts.pcr11_phases)
    events += agent_events(
        config.runtime_pcr,
        model_digest=model_digest,
        config_digest=config_digest,
        sources=(
            f"{CONFIG_NAME} model_digest",
            f"{CONFIG_NAME} canonical digest (AgentConfig.digest)",
        ),
    )
    values = replay(events)
    rules = dict(RULES)
    if config.runtime_pcr != 15:
        rules[config.runtime_pcr] = rules.pop(15)
    pinned = tuple(sorted(config.runtime_pcr if p == 15 else p for p in opts.pcrs))
    unknown = [p for p in pinned if p not in values]
    if unknown:
        raise MeasureError(f"no rule computes PCR(s) {unknown}")

    pcr_doc = {
        str(p): {
            "value": values[p].hex(),
            "pinned": p in pinned,
            "rule": rules[p],
            "events": [e.to_json() for e in events if e.pcr == p],
        }
        for p in sorted(values)
    }

    snp: dict[str, object]
    snp_values: list[SnpMeasurement] = []
    if opts.ovmf is None:
        snp = {
            "computed": False,
            "why": "no SNP-capable OVMF given (--ovmf, from scripts/build-ovmf)",
        }
    elif opts.sev_snp_measure is None:
        # Asked for (--ovmf) and impossible: an error, not a build without SNP values.
        raise MeasureError(
            "--ovmf given but sev-snp-measure not found (scripts/setup-sev-snp-measure)"
        )
    else:
        try:
            snp_values = snp_measure(
                uki, opts.ovmf, vcpus=list(opts.vcpus), vcpu_types=list(opts.vcpu_types),
                tool=opts.sev_snp_measure,
            )  # fmt: skip
        except (SnpError, OSError) as exc:
            raise MeasureError(f"SEV-SNP: {exc}") from exc
        firmware = _read(opts.ovmf, "firmware")
        snp = {
            "computed": True,
            "rule": "sev-snp-measure --mode snp --vmm-type QEMU (QEMU direct boot, "
            "kernel-hashes=on) over the firmware, the .linux/.initrd sections and the "
            "command line below",
            "ovmf": {"file": opts.ovmf.name, "sha256": hashlib.sha256(firmware).hexdigest()},
            "kernel_sha256": hashlib.sha256(uki.require(".linux")).hexdigest(),
            "initrd_sha256": hashlib.sha256(uki.require(".initrd")).hexdigest(),
            "append": cmdline,
            "measurements": [m.to_json() for m in snp_values],
        }

    document: dict[str, object] = {
        "format": MEASUREMENTS_FORMAT,
        "inputs": {
            "uki": {
                "file": UKI_NAME,
                "sha256": uki.sha256.hex(),
                "authenticode_sha256": uki.authenticode().hex(),
                "cmdline": cmdline,
                "sections": {
                    s.name: {
                        "sha256": hashlib.sha256(s.memory_bytes(uki_data)).hexdigest(),
                        "size": s.virtual_size,
                    }
                    for s in uki.pe.sections
                },
            },
            "agent_config": {
                "file": CONFIG_NAME,
                "sha256": config_file_sha,
                "digest": config_digest,
                "runtime_pcr": config.runtime_pcr,
            },
            "model_volume": volume,
        },
        "model_digests": [model_digest],
        "config_digests": [config_digest],
        "vtpm": {
            "bank": "sha256",
            "pcrs": pcr_doc,
            "not_pinned": NOT_PINNED,
            "require_event_log": opts.require_event_log,
        },
        "sev_snp": snp,
        "tdx": {
            "computed": False,
            "why": "not computed: MRTD needs a TDVF (OVMF IntelTdx) build and its TD HOB/metadata "
            "layout, RTMR[1..2] the TDVF's own event log; later work (docs/measure.md)",
        },
        "notes": notes,
    }

    policy = Policy(
        platforms=frozenset({"vtpm"}),
        model_digests=frozenset({model_digest}),
        config_digests=frozenset({config_digest}),
        require_tpm=True,
        vtpm=TpmPolicy.from_json(
            {
                "pcrs": {"sha256": {str(p): values[p].hex() for p in pinned}},
                "require_event_log": opts.require_event_log,
            }
        ),
        description=f"cube measure: {UKI_NAME} {uki.sha256.hex()[:16]}, vTPM PCRs "
        + ",".join(str(p) for p in pinned),
    )
    snp_policy = None
    if snp_values:
        snp_policy = Policy(
            platforms=frozenset({"sev-snp"}),
            model_digests=frozenset({model_digest}),
            config_digests=frozenset({config_digest}),
            sev_snp=SnpPolicy(
                measurements=tuple(dict.fromkeys(m.measurement for m in snp_values)),
                # Direct boot with no SVSM or paravisor: the guest, and so its reports, are VMPL 0.
                vmpls=(0,),
            ),
            description=f"cube measure: SEV-SNP direct boot of {UKI_NAME} {uki.sha256.hex()[:16]}",
        )
    return Measurements(document, policy, snp_policy, notes)
