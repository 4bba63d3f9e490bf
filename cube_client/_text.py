"""Text from a server or from evidence, made safe to show on a terminal."""

from __future__ import annotations

import re

__all__ = ["printable", "shown_url"]

#: ``scheme://`` and everything up to the last ``@``: a URL's credentials (a password may hold
#: an unescaped ``/``, ``?`` or ``#``; better to hide too much than a piece of one).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://).*(?=@)", re.DOTALL)
#: From the first ``?`` or ``#`` on.
_QUERY = re.compile(r"([?#]).*", re.DOTALL)


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


def _hidden_part(match: re.Match[str]) -> str:
    return f"{match.group(1)}***"


def shown_url(url: str) -> str:
    """``url`` as an error message may show it: credentials (``user:password@``) and the query
    and fragment (``?api_key=...``) replaced by ``***``, the rest made :func:`printable`.

    Works on text that is no valid URL too (the message is often about that): everything
    between ``scheme://`` and the last ``@`` is taken for credentials.
    """
    text = _USERINFO.sub(_hidden_part, url, count=1)
    text = _QUERY.sub(_hidden_part, text, count=1)
    return printable(text)
