"""A minimal DER writer for the simulator's certificates and CRLs (the inverse of attestation._der).

Certificates are assembled here rather than with ``cryptography``'s builders because AMD's VCEK
has serial number 0 (which ``cryptography`` refuses to write) and because every signature must
be deterministic, so that a verifier can re-derive byte-identical roots from the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

__all__ = [
    "bit_string",
    "boolean",
    "context",
    "enumerated",
    "ia5_string",
    "integer",
    "name",
    "null",
    "octet_string",
    "oid",
    "printable_string",
    "sequence",
    "set_of",
    "time",
    "tlv",
    "utf8_string",
]


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def integer(value: int) -> bytes:
    # Minimal two's complement: one spare bit for the sign.
    size = (value.bit_length() + 8) // 8
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def enumerated(value: int) -> bytes:
    return b"\x0a" + integer(value)[1:]


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


def null() -> bytes:
    return b"\x05\x00"


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def bit_string(value: bytes) -> bytes:
    return tlv(0x03, b"\x00" + value)


def utf8_string(value: str) -> bytes:
    return tlv(0x0C, value.encode())


def printable_string(value: str) -> bytes:
    return tlv(0x13, value.encode("ascii"))


def ia5_string(value: str) -> bytes:
    return tlv(0x16, value.encode("ascii"))


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(items)))


def context(number: int, content: bytes, *, constructed: bool = True) -> bytes:
    return tlv((0xA0 if constructed else 0x80) | number, content)


def time(value: datetime) -> bytes:
    """UTCTime before 2050, GeneralizedTime from 2050 on (RFC 5280)."""
    value = value.astimezone(UTC)
    if value.year < 2050:
        return tlv(0x17, value.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, value.strftime("%Y%m%d%H%M%SZ").encode())


_ATTRIBUTE_OIDS = {
    "CN": "2.5.4.3",
    "C": "2.5.4.6",
    "L": "2.5.4.7",
    "ST": "2.5.4.8",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
}


def name(attributes: Sequence[tuple[str, str]]) -> bytes:
    """A distinguished name, one attribute per RDN, in the given order (C as PrintableString)."""
    rdns = []
    for key, value in attributes:
        encoded = printable_string(value) if key == "C" else utf8_string(value)
        rdns.append(set_of(sequence(oid(_ATTRIBUTE_OIDS[key]), encoded)))
    return sequence(*rdns)
