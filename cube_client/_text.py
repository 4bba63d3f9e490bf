"""Text from a server or from evidence, made safe to show on a terminal."""

from __future__ import annotations

__all__ = ["printable"]


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every character a terminal could act on escaped (``"\\x1b"`` becomes the
    four characters ``\\x1b``): control characters, line breaks, bidirectional and other format
    characters, except those in ``keep``. What a server says is then shown, never obeyed: an
    error message cannot move the cursor, recolour, or paint a line of the report."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escaped(c) for c in text)
