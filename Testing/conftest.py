"""Shared fixtures: paths to the reference data and skip markers for what a machine lacks."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared(*parts) -> Path:
    """Path under ../shared/data, or skip the test when the reference data are absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data (reference data not present: {path})")
    return path


@pytest.fixture
def shared_data():
    return shared
