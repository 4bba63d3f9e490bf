"""Simulator tests run with their own RSA key cache: hermetic (nothing read from or written to
~/.cache) and fast (the prime-search offsets of the test seeds are checked in under keycache/;
the default seed's are built into attestation.sim)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

KEYCACHE = Path(__file__).parent / "keycache"


@pytest.fixture(scope="session", autouse=True)
def _sim_key_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("cube-sim-cache")
    for entry in KEYCACHE.glob("*.json"):
        shutil.copy(entry, cache / entry.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUBE_SIM_CACHE_DIR", str(cache))
        yield cache
