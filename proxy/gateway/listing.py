"""Model listings of a domain with several agents.

``GET /v1/models``, ``/api/tags`` and ``/api/ps`` name no model, so any agent of the domain
could answer, and each knows only its own backend: the answer changed from call to call, and
listed models the proxy then refused to route (a backend registered for fewer models than
its server has). The gateway asks each agent (:func:`proxy.gateway.forward.merged_listing`)
and :func:`merge` keeps, of each answer, the models the proxy would route to that agent, each
model once, in the order first seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = ["LISTING_ROUTES", "merge"]

#: route → the key of the list in the answer, and of a model's name in an entry.
LISTING_ROUTES: Final = {
    "/v1/models": ("data", "id"),
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
}


def merge(route: str, answers: Sequence[tuple[bytes, Callable[[str], bool]]]) -> bytes | None:
    """One listing from each agent's answer body and the test of the models the proxy routes
    to that agent; None if no answer is a listing (then the first is relayed as it is). A
    single answer that loses nothing is returned unchanged, byte for byte."""
    list_key, name_key = LISTING_ROUTES[route]
    first: dict[str, Any] | None = None
    seen: set[str] = set()
    entries: list[Any] = []
    dropped = False
    for body, serves in answers:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            continue
        items = document.get(list_key) if isinstance(document, dict) else None
        if not isinstance(items, list):
            continue
        if first is None:
            first = document
        for entry in items:
            name = entry.get(name_key) if isinstance(entry, dict) else None
            if not isinstance(name, str) or not serves(name) or name in seen:
                dropped = True
                continue
            seen.add(name)
            entries.append(entry)
    if first is None:
        return None
    if len(answers) == 1 and not dropped:
        return answers[0][0]
    return json.dumps({**first, list_key: entries}).encode()
