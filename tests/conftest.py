from __future__ import annotations

import pytest

from tests import vectors


@pytest.fixture(scope="session", autouse=True)
def _vectors_present() -> None:
    # Fail loudly rather than skip: a suite that silently skips every vector proves nothing.
    vectors.manifest()
