"""A minimal protobuf wire-format reader (test-only; the library has no protobuf dependency).

Enough to pull fields out of go-tpm-tools' ``attest.Attestation`` messages.
"""

from __future__ import annotations

from dataclasses import dataclass

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) for every field of one message, in wire order."""
    out: list[tuple[int, int | bytes]] = []
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == VARINT:
            value, offset = _varint(data, offset)
        elif wire == LEN:
            size, offset = _varint(data, offset)
            if offset + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, offset = data[offset : offset + size], offset + size
        elif wire == I64:
            value, offset = data[offset : offset + 8], offset + 8
        elif wire == I32:
            value, offset = data[offset : offset + 4], offset + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def get_bytes(data: bytes, number: int) -> list[bytes]:
    return [v for n, v in fields(data) if n == number and isinstance(v, bytes)]


def get_int(data: bytes, number: int) -> int:
    values = [v for n, v in fields(data) if n == number and isinstance(v, int)]
    return values[-1] if values else 0


@dataclass(frozen=True)
class GoTpmQuote:
    attest: bytes
    signature: bytes
    bank_alg: int
    pcrs: dict[int, bytes]


@dataclass(frozen=True)
class GoTpmAttestation:
    """go-tpm-tools proto/attest.proto ``Attestation`` (fields used here)."""

    ak_pub: bytes  # 1: TPMT_PUBLIC
    quotes: list[GoTpmQuote]  # 2: tpm.Quote {quote=1, raw_sig=2, pcrs=3 {hash=1, pcrs=2 map}}
    event_log: bytes  # 3
    ak_cert: bytes  # 6: DER


def parse_gotpm_attestation(data: bytes) -> GoTpmAttestation:
    quotes = []
    for raw_quote in get_bytes(data, 2):
        (pcrs_msg,) = get_bytes(raw_quote, 3)
        pcrs: dict[int, bytes] = {}
        for entry in get_bytes(pcrs_msg, 2):
            (value,) = get_bytes(entry, 2)
            pcrs[get_int(entry, 1)] = value
        (attest,) = get_bytes(raw_quote, 1)
        (sig,) = get_bytes(raw_quote, 2)
        quotes.append(GoTpmQuote(attest, sig, get_int(pcrs_msg, 1), pcrs))
    (ak_pub,) = get_bytes(data, 1)
    (log,) = get_bytes(data, 3)
    (cert,) = get_bytes(data, 6)
    return GoTpmAttestation(ak_pub, quotes, log, cert)
