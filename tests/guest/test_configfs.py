"""ConfigfsTsm (production code) against the simulator's emulated configfs-tsm."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attestation import snp, tdx
from attestation.errors import (
    CollectionError,
    DeviceBusyError,
    DeviceNotFoundError,
    MalformedError,
)
from attestation.guest import (
    DEFAULT_TSM_ROOT,
    ConfigfsTsm,
    SevGuestDevice,
    TdxGuestDevice,
    TeeDevice,
    detect_tee,
)
from attestation.sim import (
    EmulatedConfigfsTsm,
    SimulatedSevGuestIo,
    SimulatedSnp,
    SimulatedTdx,
    SimulatedTdxGuestIo,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = bytes(range(64))


def no_sleep(seconds: float) -> None:
    del seconds


def test_snp_report_with_certificates_verifies() -> None:
    sim = SimulatedSnp()
    emulation = EmulatedConfigfsTsm.snp(sim)
    tsm = ConfigfsTsm(fs=emulation, privlevel=1)
    assert isinstance(tsm, TeeDevice)
    assert tsm.available()
    assert tsm.platform == "sim-sev-snp"
    evidence = tsm.get_evidence(NONCE)
    assert evidence.platform == "sim-sev-snp" and evidence.simulated
    assert evidence.source == f"configfs-tsm:{DEFAULT_TSM_ROOT}"
    assert set(evidence.certificates) == {"vcek", "ask", "ark"}
    assert evidence.generation == 2  # privlevel and inblob
    verified = snp.verify_report(
        evidence.report, vcek=evidence.certificates["vcek"], now=NOW, roots=sim.trust_roots()
    )
    assert verified.report.report_data == NONCE
    assert verified.report.vmpl == 1
    assert verified.simulated
    assert emulation.entries == ()  # the entry was removed


def test_tdx_quote_verifies_with_collateral() -> None:
    sim = SimulatedTdx()
    emulation = EmulatedConfigfsTsm.tdx(sim)
    evidence = ConfigfsTsm(fs=emulation).get_evidence(NONCE)
    assert (evidence.platform, evidence.kind) == ("sim-tdx", "tdx-quote")
    assert evidence.auxblob is None and dict(evidence.certificates) == {}
    verified = tdx.verify_quote(
        tdx.parse_quote(evidence.report),
        collateral=sim.collateral(),
        now=NOW,
        root=sim.root_certificate(),
    )
    assert verified.tcb_status == "UpToDate"
    assert verified.quote.report_data == NONCE


def test_tdx_provider_refuses_privlevel() -> None:
    emulation = EmulatedConfigfsTsm.tdx()
    with pytest.raises(CollectionError, match="privlevel"):
        ConfigfsTsm(fs=emulation, privlevel=0).get_evidence(NONCE)
    assert emulation.entries == ()


def test_busy_is_retried() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    emulation.busy = 2
    sleeps: list[float] = []
    evidence = ConfigfsTsm(fs=emulation, sleep=sleeps.append, backoff=0.5).get_evidence(NONCE)
    assert snp.parse_report(evidence.report).report_data == NONCE
    assert sleeps == [0.5, 1.0]


def test_busy_forever_is_device_busy() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    emulation.busy = 1000
    with pytest.raises(DeviceBusyError, match="4 attempts"):
        ConfigfsTsm(fs=emulation, attempts=4, sleep=no_sleep).get_evidence(NONCE)


def test_another_writer_is_detected_and_the_report_recollected() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    emulation.interfere = 1
    evidence = ConfigfsTsm(fs=emulation, sleep=no_sleep).get_evidence(NONCE)
    # The raced attempt produced a report for someone else's nonce; it was thrown away.
    assert snp.parse_report(evidence.report).report_data == NONCE
    assert emulation.reports_generated == 2
    assert emulation.entries == ()


def test_a_writer_racing_every_attempt_is_device_busy() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    emulation.interfere = 100
    with pytest.raises(DeviceBusyError, match="generation moved"):
        ConfigfsTsm(fs=emulation, attempts=3, sleep=no_sleep).get_evidence(NONCE)
    assert emulation.entries == ()


def test_missing_configfs_is_device_not_found(tmp_path: Path) -> None:
    tsm = ConfigfsTsm(tmp_path / "no" / "tsm" / "report")
    assert not tsm.available()
    with pytest.raises(DeviceNotFoundError, match="configfs-tsm not found"):
        tsm.get_evidence(NONCE)


def test_unknown_provider_is_refused() -> None:
    emulation = EmulatedConfigfsTsm("sim_other_guest", lambda data, level: (data, None))
    with pytest.raises(CollectionError, match="unsupported provider"):
        ConfigfsTsm(fs=emulation).get_evidence(NONCE)


def test_empty_outblob_is_refused() -> None:
    emulation = EmulatedConfigfsTsm("sim_sev_guest", lambda data, level: (b"", None))
    with pytest.raises(CollectionError, match="empty outblob"):
        ConfigfsTsm(fs=emulation).get_evidence(NONCE)


def test_report_data_must_be_64_bytes() -> None:
    with pytest.raises(MalformedError):
        ConfigfsTsm(fs=EmulatedConfigfsTsm.snp()).get_evidence(bytes(32))


def test_concurrent_callers_get_their_own_reports() -> None:
    emulation = EmulatedConfigfsTsm.snp()
    tsm = ConfigfsTsm(fs=emulation)
    results: dict[int, bytes] = {}

    def collect(index: int) -> None:
        results[index] = tsm.get_evidence(bytes([index]) * 64).report

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, report in results.items():
        assert snp.parse_report(report).report_data == bytes([index]) * 64
    assert len(results) == 6 and emulation.entries == ()


def test_async_wrapper() -> None:
    evidence = asyncio.run(ConfigfsTsm(fs=EmulatedConfigfsTsm.snp()).aget_evidence(NONCE))
    assert snp.parse_report(evidence.report).report_data == NONCE


# -- detect_tee ----------------------------------------------------------------------------------


def test_detect_prefers_configfs_tsm(tmp_path: Path) -> None:
    found = detect_tee(fs=EmulatedConfigfsTsm.snp(), io=SimulatedSevGuestIo())
    assert isinstance(found, ConfigfsTsm)
    assert found.platform == "sim-sev-snp"


def test_detect_falls_back_to_the_devices(tmp_path: Path) -> None:
    missing = tmp_path / "tsm"
    sev = detect_tee(tsm_root=missing, io=SimulatedSevGuestIo())
    assert isinstance(sev, SevGuestDevice)
    tdx_device = detect_tee(tsm_root=missing, io=SimulatedTdxGuestIo())
    assert isinstance(tdx_device, TdxGuestDevice)
    assert detect_tee(tsm_root=missing, sev_guest=tmp_path / "a", tdx_guest=tmp_path / "b") is None


def test_detect_skips_configfs_without_a_provider(tmp_path: Path) -> None:
    # An emulated tree whose provider is unknown counts as "no provider".
    emulation = EmulatedConfigfsTsm("sim_unknown", lambda data, level: (data, None))
    found = detect_tee(fs=emulation, io=SimulatedSevGuestIo())
    assert isinstance(found, SevGuestDevice)
