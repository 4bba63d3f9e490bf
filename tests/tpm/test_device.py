"""Guest side: TpmQuoter against a real software TPM (swtpm), verified with verify_quote."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestation import Checks
from attestation.errors import (
    BindingError,
    CollectionError,
    DeviceNotFoundError,
    MalformedError,
    SignatureError,
    VerificationError,
)
from attestation.tpm import extend, parse_attest, parse_public, verify_quote
from attestation.tpm.device import TpmQuoter

NONCE = hashlib.sha256(b"cube-evidence/1\0quote").digest()


def test_library_does_not_import_tpm2_pytss() -> None:
    code = (
        "import sys, attestation.tpm, attestation.tpm.device; "
        "assert 'tpm2_pytss' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_device_is_device_not_found(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFoundError):
        TpmQuoter(f"device:{tmp_path / 'tpmrm0'}").ak_public()
    with pytest.raises(DeviceNotFoundError):
        TpmQuoter.for_device(tmp_path / "tpmrm9")


def _free_port_pair() -> int:
    """A port P with P and P+1 both free (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def test_unreachable_tpm_is_a_collection_error() -> None:
    pytest.importorskip("tpm2_pytss")
    port = _free_port_pair()  # nothing listens there
    with pytest.raises(CollectionError), TpmQuoter(f"swtpm:port={port}") as quoter:
        quoter.quote(NONCE)


def test_bad_arguments_are_rejected_before_the_tpm() -> None:
    quoter = TpmQuoter("device:/nonexistent/tpm")
    with pytest.raises(MalformedError):
        quoter.quote(b"x" * 65)
    with pytest.raises(MalformedError):
        quoter.quote(NONCE, {"md5": [0]})
    with pytest.raises(MalformedError):
        quoter.quote(NONCE, {"sha256": [24]})
    with pytest.raises(MalformedError):
        quoter.extend(24, bytes(32))
    with pytest.raises(MalformedError):
        quoter.extend(16, bytes(20))  # not a SHA-256 digest


# -- with a real swtpm -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("tpm2_pytss")
    binary = shutil.which("swtpm")
    if binary is None:
        pytest.skip("swtpm is not installed")
    state = tmp_path_factory.mktemp("swtpm")
    port = _free_port_pair()
    proc = subprocess.Popen(
        [
            binary, "socket", "--tpm2",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--tpmstate", f"dir={state}",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"swtpm exited: {proc.stderr.read() if proc.stderr else ''!r}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"swtpm:port={port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def quoter(swtpm: str) -> Iterator[TpmQuoter]:
    with TpmQuoter(swtpm) as q:
        yield q


@pytest.mark.slow
def test_round_trip(quoter: TpmQuoter) -> None:
    evidence = quoter.quote(NONCE)
    ak = parse_public(evidence.ak_public)
    assert ak.fields()["curve"] == "nist_p256"
    assert (ak.fields()["scheme"], ak.fields()["scheme_hash"]) == ("ecdsa", "sha256")
    assert ak.is_restricted and ak.is_signing and ak.is_fixed_tpm
    assert evidence.event_log is None
    assert set(evidence.pcrs) == {"sha256"} and sorted(evidence.pcrs["sha256"]) == list(range(24))
    checks = Checks()
    verified = verify_quote(
        attest=evidence.attest,
        signature=evidence.signature,
        ak=ak,
        pcrs=evidence.pcrs,
        qualifying_data=NONCE,
        checks=checks,
    )
    assert all(c.passed for c in checks)
    assert verified.attest.extra_data == NONCE
    assert verified.signature.scheme == "ecdsa"
    # swtpm (libtpms) identifies itself like the trustee vector does.
    assert verified.attest.firmware_version >> 32 == 0x20191023
    assert verified.pcrs["sha256"][17] == b"\xff" * 32


@pytest.mark.slow
def test_tampered_quote_is_rejected(quoter: TpmQuoter) -> None:
    evidence = quoter.quote(NONCE)
    ak = parse_public(evidence.ak_public)
    kwargs = {"signature": evidence.signature, "ak": ak, "pcrs": evidence.pcrs}
    for index in range(0, len(evidence.attest), 5):
        bad = bytearray(evidence.attest)
        bad[index] ^= 0x02
        with pytest.raises((MalformedError, SignatureError)):
            verify_quote(attest=bytes(bad), qualifying_data=NONCE, **kwargs)  # type: ignore[arg-type]
    bad_sig = bytearray(evidence.signature)
    bad_sig[-1] ^= 1
    with pytest.raises(SignatureError):
        verify_quote(
            attest=evidence.attest, signature=bytes(bad_sig), ak=ak, pcrs=evidence.pcrs,
            qualifying_data=NONCE,
        )  # fmt: skip
    with pytest.raises(BindingError):
        verify_quote(attest=evidence.attest, qualifying_data=b"other nonce", **kwargs)  # type: ignore[arg-type]
    pcrs = {"sha256": {**evidence.pcrs["sha256"], 3: b"\x01" * 32}}
    with pytest.raises(VerificationError):
        verify_quote(
            attest=evidence.attest, signature=evidence.signature, ak=ak, pcrs=pcrs,
            qualifying_data=NONCE,
        )  # fmt: skip


@pytest.mark.slow
def test_ak_is_deterministic(swtpm: str, quoter: TpmQuoter) -> None:
    first = quoter.ak_public()
    with TpmQuoter(swtpm) as other:
        assert other.ak_public() == first
    assert parse_public(first).name() == parse_public(quoter.ak_public()).name()


@pytest.mark.slow
def test_extend_shows_up_in_the_next_quote(quoter: TpmQuoter) -> None:
    before = quoter.pcr_read({"sha256": [16]})["sha256"][16]
    digest = hashlib.sha256(b"model weights digest").digest()
    quoter.extend(16, digest)
    expected = extend(before, digest, "sha256")
    evidence = quoter.quote(NONCE, {"sha256": [16, 23]})
    verified = verify_quote(
        attest=evidence.attest,
        signature=evidence.signature,
        ak=parse_public(evidence.ak_public),
        pcrs=evidence.pcrs,
        qualifying_data=NONCE,
    )
    assert verified.pcrs["sha256"][16] == expected
    assert parse_attest(evidence.attest).selection() == {"sha256": (16, 23)}


@pytest.mark.slow
def test_measure_extends_every_active_bank(quoter: TpmQuoter) -> None:
    banks = quoter.active_banks()
    assert "sha256" in banks and "sha1" in banks
    selection = {b: [16] for b in banks}
    before = quoter.pcr_read(selection)
    digests = quoter.measure(16, b"agent config")
    assert set(digests) == set(banks)
    evidence = quoter.quote(NONCE, selection)
    verified = verify_quote(
        attest=evidence.attest,
        signature=evidence.signature,
        ak=parse_public(evidence.ak_public),
        pcrs=evidence.pcrs,
        qualifying_data=NONCE,
    )
    for bank in banks:
        assert verified.pcrs[bank][16] == extend(before[bank][16], digests[bank], bank)


@pytest.mark.slow
def test_multi_bank_quote_and_batched_reads(quoter: TpmQuoter) -> None:
    selection = {"sha1": list(range(24)), "sha256": list(range(24)), "sha384": [0, 7, 23]}
    values = quoter.pcr_read(selection)  # 24 PCRs: three TPM2_PCR_Read calls per bank
    assert [len(values[b]) for b in selection] == [24, 24, 3]
    evidence = quoter.quote(NONCE, selection)
    verified = verify_quote(
        attest=evidence.attest,
        signature=evidence.signature,
        ak=parse_public(evidence.ak_public),
        pcrs=evidence.pcrs,
        qualifying_data=NONCE,
    )
    assert list(verified.attest.selection()) == ["sha1", "sha256", "sha384"]


@pytest.mark.slow
def test_async_wrappers(quoter: TpmQuoter) -> None:
    async def run() -> None:
        ak, evidence = await asyncio.gather(quoter.aak_public(), quoter.aquote(NONCE))
        assert ak == evidence.ak_public
        await quoter.aextend(16, hashlib.sha256(b"async").digest())
        values = await quoter.apcr_read({"sha256": [16]})
        assert len(values["sha256"][16]) == 32
        await quoter.ameasure(16, b"async measure")

    asyncio.run(run())


@pytest.mark.slow
def test_event_log_is_attached_when_configured(swtpm: str, tmp_path: Path) -> None:
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(b"log bytes")
    with TpmQuoter(swtpm, event_log=log) as q:
        assert q.quote(NONCE).event_log == b"log bytes"
    with TpmQuoter(swtpm, event_log=tmp_path / "missing") as q, pytest.raises(CollectionError):
        q.quote(NONCE)
