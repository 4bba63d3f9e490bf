"""`cube measure` end to end on a synthetic build directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.config import load_config
from agent.measure import measure_runtime
from attestation.policy import load_policy
from cube.cli import cube
from cube.measure import MeasureError, MeasureOptions, load_uki, measure_build
from tests.measure.helpers import base_pe, make_uki

MODEL_DIGEST = "sha256:" + "ab" * 32
ROOT_HASH = "cd" * 32


def _config_bytes() -> bytes:
    config = {
        "format": "cube-agent-config/1",
        "backend": "openai",
        "backend_url": "http://127.0.0.1:8080",
        "model_name": "cube-tiny",
        "model_dir": "/run/cube/model",
        "model_digest": MODEL_DIGEST,
        "jwt_issuer": "https://issuer.example",
        "jwt_audience": "tenant.example",
        "jwks_file": "/etc/cube/jwks.json",
        "tpm": "device:/dev/tpmrm0",
    }
    return json.dumps(config, indent=2).encode()


def make_build(tmp: Path, *, config: bytes | None = None, cmdline_sha: str | None = None) -> Path:
    build = tmp / "build"
    build.mkdir()
    config = config if config is not None else _config_bytes()
    (build / "agent-config.json").write_bytes(config)
    sha = cmdline_sha or hashlib.sha256(config).hexdigest()
    cmdline = f"console=ttyS0 cube.config_sha256={sha} cube.model_root_hash={ROOT_HASH}\n"
    sections = {
        ".osrel": b"ID=debian\n",
        ".cmdline": cmdline.encode(),
        ".initrd": os.urandom(4096),
        ".linux": base_pe(),  # a PE: PCR 4 holds its Authenticode hash
    }
    (tmp / "sections").mkdir()
    (build / "cube.efi").write_bytes(make_uki(tmp / "sections", sections))
    volume = {"format": "erofs", "root_hash": ROOT_HASH, "model_digest": MODEL_DIGEST}
    (build / "model-volume.json").write_text(json.dumps(volume))
    return build


class _FakeTpm:
    """A sha256-bank PCR file: what the agent's runtime measurement does to a real TPM."""

    def __init__(self) -> None:
        self.pcrs: dict[int, bytes] = {}

    def measure(self, pcr: int, data: bytes) -> dict[str, bytes]:
        digest = hashlib.sha256(data).digest()
        old = self.pcrs.get(pcr, bytes(32))
        self.pcrs[pcr] = hashlib.sha256(old + digest).digest()
        return {"sha256": digest}


def test_cube_measure_writes_a_loadable_policy(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    result = CliRunner().invoke(cube, ["measure", str(build)])
    assert result.exit_code == 0, result.output
    policy = load_policy(build / "policy.json")
    doc = json.loads((build / "measurements.json").read_text())
    config = load_config(build / "agent-config.json")
    assert policy.platforms == frozenset({"vtpm"})
    assert policy.require_tpm is True
    assert policy.model_digests == frozenset({MODEL_DIGEST})
    assert policy.config_digests == frozenset({config.digest()})
    pinned = policy.vtpm.pcrs["sha256"]
    assert sorted(pinned) == [4, 7, 9, 11, 15]
    uki = load_uki((build / "cube.efi").read_bytes())
    assert pinned[11] == (uki.pcr11(),)
    # PCR 15 equals what the agent's own code extends at start-up.
    tpm = _FakeTpm()
    measure_runtime(tpm, 15, model_digest=MODEL_DIGEST, config_digest=config.digest())
    assert pinned[15] == (tpm.pcrs[15],)
    # Every value carries its rule and events; the document is deterministic.
    for index in ("4", "7", "9", "11", "15"):
        entry = doc["vtpm"]["pcrs"][index]
        assert entry["rule"] and entry["events"] and entry["pinned"] is True
    assert doc["inputs"]["uki"]["authenticode_sha256"] == uki.authenticode().hex()
    assert doc["sev_snp"]["computed"] is False
    first = (build / "measurements.json").read_bytes()
    assert CliRunner().invoke(cube, ["measure", str(build)]).exit_code == 0
    assert (build / "measurements.json").read_bytes() == first


def test_pcr_selection_and_phases(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    plain = measure_build(build)
    phased = measure_build(build, MeasureOptions(pcrs=(11,), pcr11_phases=("enter-initrd",)))
    assert sorted(phased.policy.vtpm.pcrs["sha256"]) == [11]
    before = plain.policy.vtpm.pcrs["sha256"][11][0]
    after = hashlib.sha256(before + hashlib.sha256(b"enter-initrd").digest()).digest()
    assert phased.policy.vtpm.pcrs["sha256"][11] == (after,)


def test_config_not_pinned_by_the_command_line_is_refused(tmp_path: Path) -> None:
    build = make_build(tmp_path, cmdline_sha="00" * 32)
    result = CliRunner().invoke(cube, ["measure", str(build)])
    assert result.exit_code == 3
    assert "cube.config_sha256" in result.output
    assert not (build / "policy.json").exists()


def test_model_volume_mismatch_is_refused(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    (build / "model-volume.json").write_text(
        json.dumps({"root_hash": ROOT_HASH, "model_digest": "sha256:" + "00" * 32})
    )
    with pytest.raises(MeasureError, match="pins"):
        measure_build(build)


def test_missing_uki_is_a_clean_error(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    (build / "cube.efi").unlink()
    result = CliRunner().invoke(cube, ["measure", str(build)])
    assert result.exit_code == 3
    assert "cannot read the UKI" in result.output
    assert "Traceback" not in result.output


def test_snp_with_a_firmware_without_kernel_hashes_is_refused(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    firmware = tmp_path / "fake.fd"
    firmware.write_bytes(bytes(4096))
    result = CliRunner().invoke(
        cube, ["measure", str(build), "--ovmf", str(firmware), "--sev-snp-measure", "/bin/false"]
    )
    assert result.exit_code == 3
    assert "OVMF" in result.output


def test_an_earlier_builds_snp_policy_does_not_stay_beside_this_ones(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    stale = build / "policy-sev-snp.json"
    stale.write_text('{"format": "cube-policy/1", "description": "an earlier build"}')
    result = CliRunner().invoke(cube, ["measure", str(build)])
    assert result.exit_code == 0, result.output
    assert (build / "policy.json").exists() and not stale.exists()


def test_ovmf_without_sev_snp_measure_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = make_build(tmp_path)
    firmware = tmp_path / "fake.fd"
    firmware.write_bytes(bytes(4096))
    monkeypatch.setenv("CUBE_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    result = CliRunner().invoke(cube, ["measure", str(build), "--ovmf", str(firmware)])
    assert result.exit_code == 3
    assert "sev-snp-measure not found" in result.output
    assert not (build / "policy.json").exists()


@pytest.mark.parametrize(
    "change",
    ["cmdline-not-utf8", "volume-not-utf8", "volume-deep", "no-root-hash", "upper-case-sha"],
)
def test_builds_the_vm_would_refuse_are_clean_errors(tmp_path: Path, change: str) -> None:
    config = _config_bytes()
    sha = hashlib.sha256(config).hexdigest()
    build = make_build(tmp_path, cmdline_sha=sha.upper() if change == "upper-case-sha" else None)
    if change == "volume-not-utf8":
        (build / "model-volume.json").write_bytes(b'{"root_hash": "\xff"}')
    elif change == "volume-deep":
        (build / "model-volume.json").write_bytes(b"[" * 100_000)
    elif change in ("cmdline-not-utf8", "no-root-hash"):
        cmdline = (
            b"cube.config_sha256=" + sha.encode() + b" x=\xff\n"
            if change == "cmdline-not-utf8"
            else b"cube.config_sha256=" + sha.encode() + b"\n"
        )
        sections = {".osrel": b"ID=debian\n", ".cmdline": cmdline, ".linux": base_pe()}
        sections[".initrd"] = os.urandom(64)
        (build / "cube.efi").write_bytes(make_uki(tmp_path / "sections", sections))
    result = CliRunner().invoke(cube, ["measure", str(build)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (build / "policy.json").exists()


def test_an_unwritable_output_is_a_clean_error_and_writes_nothing(tmp_path: Path) -> None:
    build = make_build(tmp_path)
    result = CliRunner().invoke(
        cube, ["measure", str(build), "--out", str(tmp_path / "missing-dir" / "p.json")]
    )
    assert result.exit_code == 3
    assert "cannot write" in result.output
    assert not (build / "measurements.json").exists()


@pytest.mark.parametrize(
    ("out", "measurements", "message"),
    [
        # The SNP policy's sibling is removed as stale: it took the measurements with it.
        ("p.json", "p-sev-snp.json", "SEV-SNP policy"),
        ("build/cube.efi", None, "is an input"),  # the UKI was overwritten with a policy
        ("build/../build/agent-config.json", None, "is an input"),
        (None, "build/model-volume.json", "is an input"),
        ("same.json", "same.json", "are one file"),  # one of the two was lost
        ("link.json", "target.json", "are one file"),  # through a symbolic link
    ],
)
def test_outputs_that_collide_are_a_usage_error_and_touch_nothing(
    tmp_path: Path, out: str | None, measurements: str | None, message: str
) -> None:
    build = make_build(tmp_path)
    (tmp_path / "target.json").write_text("keep")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    (tmp_path / "p-sev-snp.json").write_text("keep")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    args = ["measure", str(build)]
    if out is not None:
        args += ["--out", str(tmp_path / out)]
    if measurements is not None:
        args += ["--measurements", str(tmp_path / measurements)]
    result = CliRunner().invoke(cube, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before  # nothing written, overwritten or removed
