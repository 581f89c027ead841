"""Fixtures of the reliability suite (the ``sandbox`` fixture comes from ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from tests.reliability.support import Figures


@pytest.fixture(scope="session")
def figures() -> Figures:
    """Where tests record the figures of the results table (``$RELIABILITY_FIGURES``)."""
    return Figures.from_env()
