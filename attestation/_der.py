"""A strict, minimal DER reader (no crypto, no I/O).

Only what certificates, CRLs and vendor extensions need: definite lengths, minimal length
encoding, exact consumption. Every failure is a :class:`~attestation.errors.MalformedError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from attestation.errors import MalformedError

__all__ = [
    "BIT_STRING",
    "BOOLEAN",
    "GENERALIZED_TIME",
    "INTEGER",
    "NULL",
    "OCTET_STRING",
    "OID",
    "SEQUENCE",
    "SET",
    "UTC_TIME",
    "Node",
    "parse",
    "parse_prefix",
]

BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
PRINTABLE_STRING = 0x13
IA5_STRING = 0x16
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30
SET = 0x31

_MAX_DEPTH = 32


@dataclass(frozen=True)
class Node:
    """One DER TLV. ``raw`` is the whole encoding, ``content`` the value bytes."""

    tag: int
    raw: bytes
    content: bytes

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)

    def children(self) -> list[Node]:
        """Parse the content as a sequence of TLVs that must consume it exactly."""
        if not self.constructed:
            raise MalformedError(f"DER: tag 0x{self.tag:02x} is not constructed")
        out: list[Node] = []
        data = self.content
        pos = 0
        # Walk by offset: re-slicing the remainder per child made a large CRL quadratic.
        while pos < len(data):
            node, pos = _parse_at(data, pos)
            out.append(node)
        return out

    def expect(self, tag: int, what: str) -> Node:
        if self.tag != tag:
            raise MalformedError(f"DER: {what}: expected tag 0x{tag:02x}, got 0x{self.tag:02x}")
        return self

    def as_int(self) -> int:
        self.expect(INTEGER, "integer")
        c = self.content
        if not c:
            raise MalformedError("DER: empty INTEGER")
        if len(c) > 1 and ((c[0] == 0 and c[1] < 0x80) or (c[0] == 0xFF and c[1] >= 0x80)):
            raise MalformedError("DER: INTEGER not minimally encoded")
        return int.from_bytes(c, "big", signed=True)

    def as_oid(self) -> str:
        self.expect(OID, "object identifier")
        return decode_oid(self.content)

    def as_bool(self) -> bool:
        self.expect(BOOLEAN, "boolean")
        if self.content == b"\xff":
            return True
        if self.content == b"\x00":
            return False
        raise MalformedError("DER: BOOLEAN must be 0x00 or 0xff")

    def as_octets(self) -> bytes:
        self.expect(OCTET_STRING, "octet string")
        return self.content

    def as_bits(self) -> bytes:
        """A BIT STRING with no unused bits (signatures, keys)."""
        self.expect(BIT_STRING, "bit string")
        if not self.content or self.content[0] != 0:
            raise MalformedError("DER: BIT STRING with unused bits")
        return self.content[1:]

    def as_time(self) -> datetime:
        return decode_time(self)

    def as_text(self) -> str:
        try:
            return self.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedError("DER: string is not valid UTF-8") from exc


def _parse_at(data: bytes, start: int) -> tuple[Node, int]:
    """Parse one TLV at ``data[start:]``; return it and the offset just past it."""
    if len(data) - start < 2:
        raise MalformedError("DER: truncated header")
    tag = data[start]
    if tag & 0x1F == 0x1F:
        raise MalformedError("DER: multi-byte tags are not supported")
    first = data[start + 1]
    pos = start + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise MalformedError("DER: indefinite length")
    else:
        n = first & 0x7F
        if n > 4:
            raise MalformedError("DER: length too large")
        if len(data) < pos + n:
            raise MalformedError("DER: truncated length")
        length = int.from_bytes(data[pos : pos + n], "big")
        if length < 0x80 or data[pos] == 0:
            raise MalformedError("DER: length not minimally encoded")
        pos += n
    end = pos + length
    if end > len(data):
        raise MalformedError("DER: value runs past the end of the input")
    return Node(tag, data[start:end], data[pos:end]), end


def parse_prefix(data: bytes) -> tuple[Node, bytes]:
    """Parse one TLV from the front of ``data``; return it and the remaining bytes."""
    data = bytes(data)
    node, end = _parse_at(data, 0)
    return node, data[end:]


def parse(data: bytes) -> Node:
    """Parse exactly one TLV; trailing bytes are an error."""
    data = bytes(data)
    node, end = _parse_at(data, 0)
    if end != len(data):
        raise MalformedError(f"DER: {len(data) - end} trailing bytes")
    return node


def decode_oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise MalformedError("DER: bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    start = True
    for b in content:
        if start and b == 0x80:
            raise MalformedError("DER: OID arc not minimally encoded")
        value = (value << 7) | (b & 0x7F)
        start = False
        if not b & 0x80:
            arcs.append(value)
            value = 0
            start = True
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


#: Digits before the "Z" of each time type (DER: seconds present, no fraction, UTC).
_TIME_DIGITS = {UTC_TIME: 12, GENERALIZED_TIME: 14}


def decode_time(node: Node) -> datetime:
    digits = _TIME_DIGITS.get(node.tag)
    if digits is None:
        raise MalformedError(f"DER: tag 0x{node.tag:02x} is not a time")
    text = node.content
    # Read the digits directly: strptime cost more than the rest of parsing a large CRL.
    if len(text) != digits + 1 or text[-1:] != b"Z" or not text[:-1].isdigit():
        raise MalformedError("DER: bad time value")
    if node.tag == UTC_TIME:
        # RFC 5280: YY >= 50 is 19YY.
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000
        rest = text[2:]
    else:
        year = int(text[:4])
        rest = text[4:]
    try:
        return datetime(
            year,
            int(rest[0:2]),
            int(rest[2:4]),
            int(rest[4:6]),
            int(rest[6:8]),
            int(rest[8:10]),
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise MalformedError("DER: bad time value") from exc
