"""An ordered record of every check a verification made, for ``--explain`` and ``--json``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from attestation.errors import AttestationError

__all__ = ["Check", "Checks", "show"]


def show(value: object) -> str:
    """Render a value for a check line: bytes as lowercase hex, everything else with ``str``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


@dataclass(frozen=True)
class Check:
    """One check: what was compared, what was expected, what was found, and the outcome."""

    name: str
    passed: bool
    expected: str | None = None
    actual: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "passed": self.passed}
        if self.expected is not None:
            out["expected"] = self.expected
        if self.actual is not None:
            out["actual"] = self.actual
        if self.detail:
            out["detail"] = self.detail
        return out


class Checks:
    """Collects :class:`Check` entries in order.

    Verifiers take an optional ``checks`` argument; pass one in to see every check made, including
    the one that failed (it is recorded before the error is raised).
    """

    def __init__(self) -> None:
        self._items: list[Check] = []

    def __iter__(self) -> Iterator[Check]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> tuple[Check, ...]:
        return tuple(self._items)

    def ok(
        self,
        name: str,
        *,
        expected: object = None,
        actual: object = None,
        detail: str = "",
    ) -> None:
        """Record a check that passed."""
        self._items.append(
            Check(
                name,
                True,
                None if expected is None else show(expected),
                None if actual is None else show(actual),
                detail,
            )
        )

    def fail(
        self,
        name: str,
        error: type[AttestationError],
        message: str,
        *,
        expected: object = None,
        actual: object = None,
    ) -> NoReturn:
        """Record a failed check and raise ``error(message)``."""
        self._items.append(
            Check(
                name,
                False,
                None if expected is None else show(expected),
                None if actual is None else show(actual),
                message,
            )
        )
        raise error(message, check=name)

    def require(
        self,
        condition: bool,
        name: str,
        error: type[AttestationError],
        message: str,
        *,
        expected: object = None,
        actual: object = None,
        detail: str = "",
    ) -> None:
        """Record ``name``; raise ``error(message)`` unless ``condition`` holds."""
        if not condition:
            self.fail(name, error, message, expected=expected, actual=actual)
        self.ok(name, expected=expected, actual=actual, detail=detail)

    def equal(
        self,
        name: str,
        expected: object,
        actual: object,
        error: type[AttestationError],
        what: str,
    ) -> None:
        """Require ``actual == expected``; the message names ``what`` and both values."""
        self.require(
            expected == actual,
            name,
            error,
            f"{what}: expected {show(expected)}, got {show(actual)}",
            expected=expected,
            actual=actual,
        )
