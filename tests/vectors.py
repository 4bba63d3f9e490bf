"""Access to the shared attestation test vectors (read in place from ../shared; never copied).

Set CUBE_ATTESTATION_VECTORS to use another location.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(
    os.environ.get(
        "CUBE_ATTESTATION_VECTORS",
        Path(__file__).resolve().parents[1].parent / "shared" / "attestation-vectors",
    )
)


@cache
def manifest() -> dict[str, Any]:
    path = VECTORS_DIR / "MANIFEST.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"attestation vectors not found at {VECTORS_DIR}; set CUBE_ATTESTATION_VECTORS"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def vectors(*, kind: str | None = None, check: str | None = None) -> list[dict[str, Any]]:
    """Vectors from MANIFEST.json, filtered by ``kind`` and/or ``check``."""
    selected: list[dict[str, Any]] = [
        v
        for v in manifest()["vectors"]
        if (kind is None or v["kind"] == kind) and (check is None or v["check"] == check)
    ]
    return selected


def vector(vector_id: str) -> dict[str, Any]:
    for v in vectors():
        if v["id"] == vector_id:
            return v
    raise KeyError(vector_id)


def path(rel: str) -> Path:
    return VECTORS_DIR / rel


def read(rel: str) -> bytes:
    return path(rel).read_bytes()


def file_of(v: dict[str, Any], role: str) -> bytes:
    """The bytes of the file a vector names under ``files[role]``."""
    return read(v["files"][role]["path"])


def _window(v: dict[str, Any]) -> dict[str, Any]:
    if "collateral" in v and "validity_window" in v["collateral"]:
        w: dict[str, Any] = v["collateral"]["validity_window"]
        return w
    for key in ("validity_window", "pck_validity_window"):
        if key in v:
            w = v[key]
            return w
    raise KeyError(f"{v['id']} has no validity window")


def time_inside(v: dict[str, Any]) -> datetime:
    """A fixed time inside the vector's validity window (its midpoint)."""
    w = _window(v)
    start = datetime.fromisoformat(w["not_before"])
    end = datetime.fromisoformat(w["not_after"])
    if end.year >= 9999:
        end = start.replace(year=start.year + 10)
    return start + (end - start) / 2


def time_after(v: dict[str, Any]) -> datetime:
    """A time just after the window closes (for expiry tests)."""
    from datetime import timedelta

    return datetime.fromisoformat(_window(v)["not_after"]) + timedelta(days=1)


def time_before(v: dict[str, Any]) -> datetime:
    from datetime import timedelta

    return datetime.fromisoformat(_window(v)["not_before"]) - timedelta(days=1)
