"""Shared fixtures. Real-data tests find ../shared/data through CHESTFED_TEST_DATA, or skip."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# The longest files first. `make test` runs three pytest workers with `--dist loadfile
# --no-loadscope-reorder`: a file goes whole to one worker (its module fixtures, such as the
# deployment cluster, are set up once), in this order. The deployment tests mostly wait on
# Flower's poll intervals and heartbeat, so the other workers fill the cores meanwhile.
# (pytest-xdist's `xdist_group` marks are ignored under pytest 9.2: loadfile it is.)
# The deployment tests are in three files (each with its own processes) so that no one worker
# holds them all.
_FIRST = ("test_privacy.py", "test_deployment_security.py", "test_deployment.py",
          "test_strategies.py", "test_deployment_faults.py", "test_faults.py", "test_resume.py",
          "test_simulate.py", "test_tune.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real-data folder (../shared/data), or skip the test."""
    value = os.environ.get("CHESTFED_TEST_DATA")
    if not value:
        pytest.skip("CHESTFED_TEST_DATA is not set: real-data tests need ../shared/data")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"CHESTFED_TEST_DATA={value} is not a folder")
    return path


@pytest.fixture
def tmp_cache(tmp_path: Path) -> Path:
    """An empty image-cache folder for one test."""
    path = tmp_path / "cache"
    path.mkdir()
    return path
