"""Shared test setup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Entry points configure structlog for the process; no test may leak that into the next."""
    yield
    structlog.reset_defaults()
