"""The SEV-SNP extended-report certificate table (GHCB GUID table)."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError, MalformedError
from attestation.guest import (
    ARK_GUID,
    ASK_GUID,
    CERT_TABLE_GUIDS,
    VCEK_GUID,
    VLEK_GUID,
    build_certificate_table,
    parse_certificate_table,
)

ENTRY = struct.Struct("<16sII")


def test_guids_are_amds_in_rfc4122_byte_order() -> None:
    # Pinned bytes, not just the text: a mixed-endian conversion would keep the text and
    # silently break every real table.
    assert VCEK_GUID.bytes == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    assert VLEK_GUID.bytes == bytes.fromhex("a8074bc2a25a483eaae639c045a0b8a1")
    assert ASK_GUID.bytes == bytes.fromhex("4ab7b379bbac4fe4a02f05aef327c782")
    assert ARK_GUID.bytes == bytes.fromhex("c0b406a4a803495297433fb6014cd0ae")
    assert set(CERT_TABLE_GUIDS.values()) == {"vcek", "vlek", "ask", "ark", "crl"}


def _table(entries: list[tuple[bytes, int, int]], body: bytes, *, terminator: bool = True) -> bytes:
    raw = b"".join(ENTRY.pack(g, o, n) for g, o, n in entries)
    if terminator:
        raw += bytes(24)
    return raw + body


def test_hand_built_table_parses() -> None:
    vcek, ask, ark = b"V" * 10, b"S" * 7, b"R" * 5
    start = 24 * 4
    blob = _table(
        [
            (VCEK_GUID.bytes, start, 10),
            (ASK_GUID.bytes, start + 10, 7),
            (ARK_GUID.bytes, start + 17, 5),
        ],
        vcek + ask + ark + bytes(100),  # page padding after the certificates
    )
    assert dict(parse_certificate_table(blob)) == {"vcek": vcek, "ask": ask, "ark": ark}


def test_build_then_parse_round_trips_with_padding() -> None:
    certs = {"vcek": b"\x30" * 1300, "ask": b"\x31" * 1600, "ark": b"\x32" * 1600}
    blob = build_certificate_table(certs, pad_to=4096)
    assert len(blob) % 4096 == 0
    assert dict(parse_certificate_table(blob)) == certs
    # The first entry is the VCEK, pointing just past the 4-entry table.
    guid, offset, length = ENTRY.unpack_from(blob, 0)
    assert (guid, offset, length) == (VCEK_GUID.bytes, 96, 1300)


def test_unknown_guid_is_kept_under_its_string() -> None:
    other = uuid.UUID("12345678-1234-5678-1234-567812345678")
    blob = build_certificate_table({str(other): b"xyz", "vlek": b"vlek-der"})
    assert dict(parse_certificate_table(blob)) == {str(other): b"xyz", "vlek": b"vlek-der"}


@pytest.mark.parametrize("blob", [b"", bytes(24), bytes(4096)])
def test_empty_or_zero_blob_means_no_certificates(blob: bytes) -> None:
    assert dict(parse_certificate_table(blob)) == {}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_table([(VCEK_GUID.bytes, 48, 3)], b"abc", terminator=False), "terminating"),
        (_table([(bytes(16), 48, 3)], b"abc"), "zero GUID"),
        (_table([(VCEK_GUID.bytes, 10, 3)], b"abc"), "inside the table"),
        (_table([(VCEK_GUID.bytes, 48, 4)], b"abc"), "past the end"),
        (_table([(VCEK_GUID.bytes, 48, 0)], b"abc"), "empty"),
        (_table([(VCEK_GUID.bytes, 72, 1), (VCEK_GUID.bytes, 73, 1)], b"ab"), "twice"),
        (_table([(VCEK_GUID.bytes, 0xFFFFFFFF, 0xFFFFFFFF)], b"abc"), "past the end"),
    ],
)
def test_malformed_tables_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        parse_certificate_table(blob)


def test_too_many_entries_are_refused() -> None:
    entries = [(uuid.UUID(int=i + 1).bytes, 24 * 70, 1) for i in range(65)]
    with pytest.raises(MalformedError, match="more than 64"):
        parse_certificate_table(_table(entries, b"x"))


def test_build_refuses_unknown_names_and_empty_values() -> None:
    with pytest.raises(MalformedError):
        build_certificate_table({"not-a-guid": b"x"})
    with pytest.raises(MalformedError):
        build_certificate_table({"vcek": b""})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_attestation_errors(blob: bytes) -> None:
    try:
        result = parse_certificate_table(blob)
    except AttestationError as exc:
        assert isinstance(exc, MalformedError)
        return
    for value in result.values():
        assert value and value in blob


_NAMES = st.sampled_from(["vcek", "vlek", "ask", "ark", "crl"]) | st.uuids().filter(
    lambda u: u not in CERT_TABLE_GUIDS
).map(str)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(_NAMES, st.binary(min_size=1, max_size=200), max_size=6),
    st.sampled_from([0, 16, 4096]),
)
def test_build_parse_round_trip_property(certs: dict[str, bytes], pad_to: int) -> None:
    blob = build_certificate_table(certs, pad_to=pad_to)
    if pad_to:
        assert len(blob) % pad_to == 0
    assert dict(parse_certificate_table(blob)) == certs


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=24, max_size=24 * 4), st.binary(max_size=64))
def test_table_shaped_garbage_raises_only_malformed(head: bytes, tail: bytes) -> None:
    blob = head + bytes(24) + tail
    with contextlib.suppress(MalformedError):
        for value in parse_certificate_table(blob).values():
            assert value in blob
