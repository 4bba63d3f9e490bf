"""Authenticode hashing against osslsigncode, and its invariants."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cube.measure import PeError, authenticode_digest, parse_pe
from tests.measure.helpers import base_pe


def _osslsigncode_digest(tmp: Path, data: bytes) -> str:
    """Sign a copy with a throwaway key; osslsigncode prints the Authenticode digest it computes."""
    if shutil.which("osslsigncode") is None or shutil.which("openssl") is None:
        pytest.skip("osslsigncode/openssl not installed")
    (tmp / "in.efi").write_bytes(data)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp / "k.pem"),
         "-out", str(tmp / "c.pem"), "-days", "1", "-subj", "/CN=cube-test"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["osslsigncode", "sign", "-certs", str(tmp / "c.pem"), "-key", str(tmp / "k.pem"),
         "-h", "sha256", "-in", str(tmp / "in.efi"), "-out", str(tmp / "signed.efi")],
        check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        ["osslsigncode", "verify", "-in", str(tmp / "signed.efi")],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"Calculated message digest\s*:\s*([0-9A-F]{64})", out)
    assert match, out
    return match.group(1).lower()


def test_authenticode_matches_osslsigncode(tmp_path: Path) -> None:
    data = base_pe()
    assert authenticode_digest(data).hex() == _osslsigncode_digest(tmp_path, data)
    signed = (tmp_path / "signed.efi").read_bytes()
    assert parse_pe(signed).cert_table[1] > 0
    # The signature is outside its own hash: the signed file hashes like the unsigned one
    # (the input is 8-byte aligned, so signing added no padding).
    assert len(data) % 8 == 0
    assert authenticode_digest(signed) == authenticode_digest(data)


def test_systemd_stub_matches_osslsigncode(tmp_path: Path) -> None:
    stubs = sorted(
        Path.home().glob(".cache/cube/image-tools/tools-tree/usr/lib/systemd/boot/efi/*.efi*")
    )
    if not stubs:
        pytest.skip("no systemd EFI binary in the image tools tree")
    data = stubs[0].read_bytes()
    assert authenticode_digest(data).hex() == _osslsigncode_digest(tmp_path, data)


def test_checksum_and_cert_dir_are_excluded_but_sections_are_not() -> None:
    data = bytearray(base_pe())
    pe = parse_pe(bytes(data))
    digest = authenticode_digest(bytes(data))
    data[pe.checksum_offset : pe.checksum_offset + 4] = b"\x12\x34\x56\x78"
    assert authenticode_digest(bytes(data)) == digest
    section = next(s for s in pe.sections if s.raw_size)
    data[section.raw_offset] ^= 0xFF
    assert authenticode_digest(bytes(data)) != digest


def test_trailing_data_is_hashed() -> None:
    data = base_pe()
    assert authenticode_digest(data + b"\0" * 8) != authenticode_digest(data)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"XX" + d[2:],
        lambda d: d[:0x3C] + struct.pack("<I", len(d) + 10) + d[0x40:],
        lambda d: d[:0x200],
    ],
    ids=["no-mz", "pe-offset-outside", "truncated"],
)
def test_malformed_pe_is_refused(mutate: object) -> None:
    assert callable(mutate)
    with pytest.raises(PeError):
        authenticode_digest(mutate(base_pe()))
