"""Strict readers for JSON documents (policy, evidence, claims): unknown keys, wrong types fail."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import TypeVar

from attestation.errors import AttestationError, MalformedError

__all__ = [
    "ObjectReader",
    "decode_b64",
    "decode_hex",
    "loads_object",
    "lone_surrogate",
    "refuse_lone_surrogates",
    "refuse_nulls",
]

T = TypeVar("T")

_MAX_DOCUMENT = 4 * 1024 * 1024
_HEX_DIGITS = re.compile(r"(?:[0-9a-fA-F]{2})*")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: A JSON escape of a UTF-16 surrogate: the only way decoded JSON can hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def lone_surrogate(value: object, *, text: str | None = None) -> str | None:
    """Where decoded JSON ``value`` holds a lone UTF-16 surrogate, or None.

    JSON's ``"\\ud800"`` escape decodes to a str that cannot be encoded as UTF-8, so it would
    fail later wherever the string is encoded (signed collateral bytes, a database, a
    terminal). The answer names the member: ``tcb_info``, ``keys[0].kid``, ``a key in x``.
    ``text``, the JSON it came from, lets the usual document skip the walk.
    """
    if text is not None and not _SURROGATE_ESCAPE.search(text):
        return None  # no escape that could produce one
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "the document"
        elif isinstance(item, Mapping):
            for key, member in item.items():
                if _SURROGATE.search(key):
                    return f"a key in {where or 'the document'}"
                stack.append((f"{where}.{key}" if where else key, member))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", member) for i, member in enumerate(item))
    return None


def loads_object(
    data: bytes, *, what: str, error: type[AttestationError] = MalformedError
) -> dict[str, object]:
    """Parse ``data`` as one JSON object (UTF-8; duplicate keys, NaN and huge inputs refused)."""
    if len(data) > _MAX_DOCUMENT:
        raise error(f"{what}: larger than {_MAX_DOCUMENT} bytes")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise error(f"{what}: expected a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        refuse_lone_surrogates(value, what, error)
    return value


def decode_hex(
    value: object,
    *,
    what: str,
    length: int | None = None,
    error: type[AttestationError] = MalformedError,
) -> bytes:
    """Lowercase or uppercase hex, with its byte length checked when ``length`` is given."""
    # Hex digits only: bytes.fromhex also takes spaces, and one value must have one spelling.
    if not isinstance(value, str) or not _HEX_DIGITS.fullmatch(value):
        raise error(f"{what}: expected a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise error(f"{what}: not valid hex") from exc
    if length is not None and len(raw) != length:
        raise error(f"{what}: expected {length} bytes of hex, got {len(raw)}")
    return raw


def decode_b64(
    value: object, *, what: str, error: type[AttestationError] = MalformedError
) -> bytes:
    """Standard base64 (padding required); URL-safe alphabet accepted."""
    if not isinstance(value, str):
        raise error(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{what}: not valid base64") from exc


class ObjectReader:
    """Reads the keys of one JSON object; :meth:`finish` fails on keys nobody asked for."""

    def __init__(
        self,
        obj: object,
        *,
        what: str,
        error: type[AttestationError] = MalformedError,
    ) -> None:
        if not isinstance(obj, Mapping):
            raise error(f"{what}: expected a JSON object")
        self._obj: Mapping[str, object] = obj
        self._seen: set[str] = set()
        self.what = what
        self.error = error

    def __contains__(self, key: str) -> bool:
        return key in self._obj

    def raw(self, key: str, *, required: bool = False) -> object:
        """The value of ``key``; None when absent. JSON null also reads as None, which is
        why a ``required`` key refuses it: null is no value for a key that must have one."""
        self._seen.add(key)
        if key not in self._obj:
            if required:
                raise self.error(f"{self.what}: missing required key {key!r}")
            return None
        value = self._obj[key]
        if value is None and required:
            raise self.error(f"{self.what}.{key}: null is not a valid value (the key is required)")
        return value

    def typed(self, key: str, kind: type[T], *, required: bool = False) -> T | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        # bool is an int in Python; never accept it where a number is expected.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{self.what}.{key}: expected {kind.__name__}")
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        return self.typed(key, str, required=required)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.typed(key, bool)
        return default if value is None else value

    def integer(
        self, key: str, *, minimum: int = 0, maximum: int = 2**63 - 1, required: bool = False
    ) -> int | None:
        value = self.typed(key, int, required=required)
        if value is not None and not minimum <= value <= maximum:
            raise self.error(f"{self.what}.{key}: must be from {minimum} to {maximum}")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{self.what}.{key}: expected a list of strings")
        return tuple(value)

    def hex(self, key: str, length: int, *, required: bool = False) -> bytes | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        return decode_hex(value, what=f"{self.what}.{key}", length=length, error=self.error)

    def hex_list(self, key: str, length: int) -> tuple[bytes, ...] | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(f"{self.what}.{key}: expected a list of hex strings")
        return tuple(
            decode_hex(v, what=f"{self.what}.{key}[{i}]", length=length, error=self.error)
            for i, v in enumerate(value)
        )

    def b64(self, key: str, *, required: bool = False) -> bytes | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        return decode_b64(value, what=f"{self.what}.{key}", error=self.error)

    def finish(self) -> None:
        unknown = sorted(set(self._obj) - self._seen)
        if unknown:
            raise self.error(f"{self.what}: unknown key(s) {', '.join(map(repr, unknown))}")


def refuse_lone_surrogates(obj: object, what: str, error: type[AttestationError]) -> None:
    """Refuse a string anywhere in ``obj`` that is not encodable text (see lone_surrogate)."""
    surrogate = lone_surrogate(obj)
    if surrogate is not None:
        raise error(f"{what}: {surrogate}: a lone UTF-16 surrogate escape is not valid text")


def refuse_nulls(obj: object, what: str, error: type[AttestationError]) -> None:
    """Refuse JSON null among ``obj``'s values. :class:`ObjectReader` reads null as "absent";
    in a policy null is a mistake, and read as absent it would switch a check off
    (``"mr_td": null`` = any MRTD)."""
    if isinstance(obj, Mapping):
        nulls = sorted(str(k) for k, v in obj.items() if v is None)
        if nulls:
            raise error(f"{what}: null is not a valid value for {', '.join(nulls)}")
