"""The TCG crypto-agile event log: parsing, replay, and replay against quoted PCRs."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import pytest

from attestation import Checks
from attestation.errors import MalformedError, VerificationError
from attestation.tpm import extend, parse_event_log, replay, verify_event_log
from attestation.tpm.eventlog import EV_NO_ACTION
from tests.tpm._cases import case

SHA1, SHA256, SM3 = 0x0004, 0x000B, 0x0012
SIZES = {SHA1: 20, SHA256: 32, SM3: 32, 0x7777: 16}


def spec_id(
    algs: Sequence[int] = (SHA1, SHA256),
    *,
    signature: bytes = b"Spec ID Event03\0",
    version: tuple[int, int] = (2, 0),
    uintn: int = 2,
    sizes: dict[int, int] | None = None,
) -> bytes:
    sizes = sizes or SIZES
    body = signature + struct.pack("<IBBBB", 0, version[1], version[0], 0, uintn)
    body += struct.pack("<I", len(algs))
    body += b"".join(struct.pack("<HH", a, sizes[a]) for a in algs)
    body += b"\x03abc"  # vendor info
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def event(
    pcr: int, data: bytes, algs: Sequence[int] = (SHA1, SHA256), *, kind: int = 0x0D
) -> bytes:
    out = struct.pack("<III", pcr, kind, len(algs))
    for a in algs:
        digest = (
            hashlib.new({SHA1: "sha1", SHA256: "sha256"}[a], data).digest()
            if a in (SHA1, SHA256)
            else bytes(SIZES[a])
        )
        out += struct.pack("<H", a) + digest
    return out + struct.pack("<I", len(data)) + data


def test_gce_log_fields() -> None:
    log_bytes = case("tpm-gce-cos85-nonce#0").event_log
    assert log_bytes is not None
    log = parse_event_log(log_bytes)
    f = log.fields()
    assert f["spec_version"] == "2.0.0" and f["uintn_size"] == 2
    assert f["banks"] == ["sha1", "sha256", "sha384"]
    assert f["events"] == len(log.events) == 44
    assert f["pcrs"] == list(range(10))
    assert log.events[0].type_name == "EV_S_CRTM_VERSION" and log.events[0].index == 1
    assert log.events[0].digest("sha256") is not None
    assert log.events[0].fields()["type"] == "EV_S_CRTM_VERSION"
    replayed = replay(log)
    assert set(replayed) == {"sha1", "sha256", "sha384"}
    # The sha256 replay of PCR 0 equals the quoted value (manifest).
    assert replayed["sha256"][0].hex() == case("tpm-gce-cos85-nonce#1").expected["pcrs"]["0"]


def test_replay_by_hand() -> None:
    data = spec_id() + event(4, b"kernel") + event(4, b"initrd") + event(9, b"cmdline")
    replayed = replay(parse_event_log(data))
    expected4 = bytes(32)
    for item in (b"kernel", b"initrd"):
        expected4 = hashlib.sha256(expected4 + hashlib.sha256(item).digest()).digest()
    assert replayed["sha256"][4] == expected4
    assert replayed["sha256"][4] == extend(
        extend(bytes(32), hashlib.sha256(b"kernel").digest(), "sha256"),
        hashlib.sha256(b"initrd").digest(),
        "sha256",
    )
    assert set(replayed["sha1"]) == {4, 9}
    with pytest.raises(MalformedError):
        extend(bytes(31), bytes(32), "sha256")


def test_startup_locality_sets_pcr0_initial_value() -> None:
    locality = event(0, b"StartupLocality\0\x03", kind=EV_NO_ACTION)
    data = spec_id() + locality + event(0, b"crtm")
    replayed = replay(parse_event_log(data))
    start = bytes(31) + b"\x03"
    assert (
        replayed["sha256"][0] == hashlib.sha256(start + hashlib.sha256(b"crtm").digest()).digest()
    )
    # EV_NO_ACTION events are never extended.
    only_no_action = spec_id() + event(5, b"note", kind=EV_NO_ACTION)
    assert replay(parse_event_log(only_no_action)) == {"sha1": {}, "sha256": {}}


def test_unknown_and_uncomputable_banks_are_skipped() -> None:
    algs = (SHA256, SM3, 0x7777)
    data = spec_id(algs) + event(7, b"x", algs)
    log = parse_event_log(data)
    assert log.spec_id.banks == ("sha256", "sm3_256", "0x7777")
    assert set(replay(log)) == {"sha256"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (spec_id(signature=b"Spec ID Event02\0"), "crypto-agile"),
        (spec_id(version=(1, 2)), "version"),
        (spec_id(uintn=4), "uintnSize"),
        (spec_id((SHA256, SHA256)), "twice"),
        (spec_id((SHA256,), sizes={SHA256: 20}), "expected 32"),
        (spec_id(()), "digest algorithms"),
        (spec_id() + event(1, b"a", (SHA256,)), "header lists"),
        (spec_id() + event(1, b"a", (SHA256, SHA256)), "two of them"),
        (spec_id() + event(1, b"a", (SHA1, SM3)), "does not list"),
        (spec_id() + event(40, b"a"), "PCR 40"),
        (spec_id() + event(1, b"abc")[:-1], "truncated"),
        (struct.pack("<II", 1, EV_NO_ACTION) + spec_id()[8:], "first event"),
        (struct.pack("<II", 0, 4) + spec_id()[8:], "first event"),
        (b"", "truncated"),
    ],
)
def test_malformed_logs(data: bytes, match: str) -> None:
    with pytest.raises(MalformedError, match=match):
        parse_event_log(data)


def test_verify_event_log_coverage_and_mismatch() -> None:
    data = spec_id() + event(4, b"kernel") + event(9, b"cmdline") + event(14, b"mok")
    replayed = replay(parse_event_log(data))["sha256"]
    quoted = {"sha256": {i: replayed.get(i, bytes(32)) for i in (0, 4, 9)}}
    checks = Checks()
    result = verify_event_log(data, quoted, checks=checks)
    # PCR 14 is in the log but not quoted: not verified. PCR 0 is quoted, not in the log.
    assert result.verified == {"sha256": frozenset({4, 9})}
    summary = next(c for c in checks if c.name == "tpm.event_log.sha256")
    assert "extended but not quoted: [14]" in summary.detail
    assert "quoted but not in the log: [0]" in summary.detail

    quoted["sha256"][9] = bytes(32)
    with pytest.raises(VerificationError, match="PCR sha256:9") as info:
        verify_event_log(data, quoted)
    assert info.value.check == "tpm.event_log.sha256.pcr9"
    assert replayed[9].hex() in str(info.value) and bytes(32).hex() in str(info.value)


def test_verify_event_log_without_a_common_bank_is_refused() -> None:
    data = spec_id((SHA1,)) + event(4, b"kernel", (SHA1,))
    with pytest.raises(VerificationError) as info:
        verify_event_log(data, {"sha256": {4: bytes(32)}})
    assert info.value.check == "tpm.event_log.banks"
