"""Small strict readers shared by the TDX modules (PEM chains, Intel JSON values)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from attestation._x509 import Certificate, load_certificates
from attestation.errors import MalformedError

__all__ = ["format_time", "load_pem_chain", "parse_hex", "parse_time"]

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"
_PADDING = b" \t\r\n\x00"
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def load_pem_chain(data: bytes, *, what: str, minimum: int = 1) -> tuple[Certificate, ...]:
    """A PEM certificate bundle; only whitespace and NUL padding may sit between the blocks."""
    rest = bytes(data)
    if _BEGIN not in rest:
        raise MalformedError(f"{what}: no PEM certificate")
    while True:
        start = rest.find(b"-----BEGIN")
        if start < 0:
            break
        if rest[start : start + len(_BEGIN)] != _BEGIN:
            raise MalformedError(f"{what}: PEM block is not a CERTIFICATE")
        end = rest.find(_END, start)
        if end < 0:
            raise MalformedError(f"{what}: unterminated PEM certificate")
        if rest[:start].strip(_PADDING):
            raise MalformedError(f"{what}: unexpected bytes between PEM certificates")
        rest = rest[end + len(_END) :]
    if rest.strip(_PADDING):
        raise MalformedError(f"{what}: unexpected bytes after the PEM certificates")
    certs = tuple(load_certificates(bytes(data)))
    if len(certs) < minimum:
        raise MalformedError(f"{what}: {len(certs)} certificate(s), need at least {minimum}")
    return certs


def parse_time(value: object, *, what: str) -> datetime:
    """An Intel collateral timestamp: ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, optional fraction)."""
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise MalformedError(f"{what}: expected a UTC timestamp like 2025-01-31T12:00:00Z")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError as exc:
        raise MalformedError(f"{what}: invalid timestamp {value!r}") from exc


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_hex(value: object, *, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise MalformedError(f"{what}: expected a hex string")
    raw = bytes.fromhex(value)
    if length is not None and len(raw) != length:
        raise MalformedError(f"{what}: expected {length} bytes of hex, got {len(raw)}")
    return raw
