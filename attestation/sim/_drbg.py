"""HMAC_DRBG (NIST SP 800-90A, HMAC-SHA-256), no reseeding: deterministic bytes from a seed.

The simulator derives every key from its seed so that two processes (an agent and a verifier)
re-create the same test PKI. This is *not* a source of secrets: the seed is public.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["HmacDrbg", "derive_bytes"]

_MAX_REQUEST = 1 << 16


class HmacDrbg:
    """HMAC_DRBG with SHA-256; instantiated from ``seed`` (entropy input) and ``label``
    (personalization string)."""

    def __init__(self, seed: bytes, label: bytes) -> None:
        self._key = bytes(32)
        self._value = b"\x01" * 32
        self._update(bytes(seed) + b"\0cube-sim\0" + bytes(label))

    def _mac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    def _update(self, provided: bytes) -> None:
        self._key = self._mac(self._key, self._value + b"\x00" + provided)
        self._value = self._mac(self._key, self._value)
        if provided:
            self._key = self._mac(self._key, self._value + b"\x01" + provided)
            self._value = self._mac(self._key, self._value)

    def generate(self, size: int) -> bytes:
        """The next ``size`` bytes (at most 64 KiB per request)."""
        if not 0 <= size <= _MAX_REQUEST:
            raise ValueError(f"HMAC_DRBG: request of {size} bytes")
        out = bytearray()
        while len(out) < size:
            self._value = self._mac(self._key, self._value)
            out += self._value
        self._update(b"")
        return bytes(out[:size])

    def integer(self, bits: int) -> int:
        """A ``bits``-bit non-negative integer (top bit not forced)."""
        raw = int.from_bytes(self.generate((bits + 7) // 8), "big")
        return raw >> ((8 - bits % 8) % 8)

    def below(self, bound: int) -> int:
        """A uniform integer in ``[0, bound)`` (rejection sampling)."""
        if bound <= 0:
            raise ValueError("HMAC_DRBG: empty range")
        bits = bound.bit_length()
        while True:
            value = self.integer(bits)
            if value < bound:
                return value


def derive_bytes(seed: bytes, label: str, size: int) -> bytes:
    """``size`` deterministic bytes for ``label`` (one DRBG instance per call)."""
    return HmacDrbg(seed, label.encode()).generate(size)
