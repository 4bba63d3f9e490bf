"""SEV-SNP: no measurement from a firmware that cannot do measured direct boot; the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cube.measure import SnpError, check_snp_firmware, ovmf_sev_tables
from cube.measure._snp import SEV_HASH_TABLE_RV, SEV_METADATA


@pytest.mark.parametrize("name", ["OVMF_CODE_4M.fd", "OVMF_CODE.fd"])
def test_debian_ovmf_is_refused(name: str) -> None:
    path = Path("/usr/share/OVMF") / name
    if not path.exists():
        pytest.skip(f"{path} not installed")
    data = path.read_bytes()
    tables = ovmf_sev_tables(data)
    assert SEV_HASH_TABLE_RV in tables  # the reset vector has the table GUID ...
    with pytest.raises(SnpError, match="SEV metadata"):  # ... but no kernel-hashes section
        check_snp_firmware(data)
    if name == "OVMF_CODE.fd":
        assert SEV_METADATA in tables


def test_not_ovmf_is_refused() -> None:
    with pytest.raises(SnpError, match="no OVMF GUIDed table"):
        check_snp_firmware(bytes(1 << 16))


def _snp_inputs() -> tuple[Path, Path]:
    import os

    cache = Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube")
    tool = cache / "sev-snp-measure" / "bin" / "sev-snp-measure"
    firmwares = sorted(cache.glob("ovmf/*/OVMF.amdsev.fd"))
    if not tool.exists() or not firmwares:
        pytest.skip("needs scripts/setup-sev-snp-measure and scripts/build-ovmf")
    return tool, firmwares[0]


def test_snp_measurements_for_the_vcpu_matrix(tmp_path: Path) -> None:
    from cube.measure import MeasureOptions, measure_build
    from tests.measure.test_measure_cli import make_build

    tool, firmware = _snp_inputs()
    build = make_build(tmp_path)
    options = MeasureOptions(ovmf=firmware, sev_snp_measure=str(tool), vcpus=(1, 2))
    result = measure_build(build, options)
    snp = result.document["sev_snp"]
    assert isinstance(snp, dict) and snp["computed"] is True
    values = [m["measurement"] for m in snp["measurements"]]
    assert len(values) == 6 and len(set(values)) == 6  # every vCPU count/type differs
    assert result.snp_policy is not None
    assert result.snp_policy.platforms == frozenset({"sev-snp"})
    assert {m.hex() for m in result.snp_policy.sev_snp.measurements or ()} == set(values)
    assert result.snp_policy.sev_snp.vmpls == (0,)  # a report from a higher VMPL is refused
    # Deterministic, and bound to the command line (which pins the configuration).
    assert measure_build(build, options).document["sev_snp"] == snp
