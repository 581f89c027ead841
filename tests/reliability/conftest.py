"""Fixtures of the reliability suite (the ``sandbox`` fixture comes from ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.support import Figures


@pytest.fixture(scope="session")
def figures() -> Figures:
    """Where tests record the figures of the results table (``$RELIABILITY_FIGURES``)."""
    return Figures.from_env()


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Let the ``reconciler`` processes these tests start cache their bytecode.

    Where PYTHONDONTWRITEBYTECODE=1 is set (this machine sets it), every CLI
    run compiled its imports from source, about 0.6 s each: a second per
    ``status`` call, many times per test, and timings no installed copy has.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield
