"""Shared fixtures: the toy dataset (made once per session, and a private copy per test) and
the raccoon set when present. Shared helper functions live in ``spp_detect.testing``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy dataset (12 trainval + 6 test images, seed 0) in VOC layout; do not modify it."""
    from spp_detect.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy") / "toy"
    make_toy_dataset(root, num_train=12, num_test=6, seed=0)
    return root


@pytest.fixture
def toy_copy(toy_root: Path, tmp_path: Path) -> Path:
    """A private copy of the toy set (in ``tmp_path / "toy"``) that a test may change."""
    return Path(shutil.copytree(toy_root, tmp_path / "toy"))


@pytest.fixture(scope="session")
def raccoon_root() -> Path:
    """``../shared/datasets/raccoon`` (200 real photos, one class); skips when it is absent."""
    if not (RACCOON / "ImageSets" / "Main").is_dir():
        pytest.skip(f"{RACCOON} not present")
    return RACCOON


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """CLI commands install their own handler on the ``spp_detect`` logger and stop propagation;
    put it back after each test so that ``caplog`` keeps seeing the package's records."""
    logger = logging.getLogger("spp_detect")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
