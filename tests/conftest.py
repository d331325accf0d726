"""Shared pytest fixtures.

The read-only test fixtures (checkpoints, images, TensorFlow goldens) live
outside the repository, at ``$MNV2REF_SHARED`` or ``<repo>/../shared/mnv2``.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared ``mnv2`` fixtures folder; skip (fail on CI) when it is missing."""
    path = Path(os.environ.get("MNV2REF_SHARED") or REPO_ROOT.parent / "shared" / "mnv2")
    if not path.is_dir():
        message = (f"shared test fixtures not found at {path}: set MNV2REF_SHARED or place "
                   "the fixtures at ../shared/mnv2; get real weights with `mnv2ref fetch`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
