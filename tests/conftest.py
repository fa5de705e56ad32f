"""Shared test helpers.

Tests that need something outside the project (the real DICOM samples in ../shared, Debian tools)
skip with a reason on a user's machine; under FLAIRCAD_STRICT_TESTS=1 (set by .ci/run) a missing
prerequisite fails instead, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("FLAIRCAD_STRICT_TESTS") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip (or, in strict mode, fail) when a prerequisite is missing."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"FLAIRCAD_STRICT_TESTS=1 and a prerequisite is missing: {reason}")
    pytest.skip(reason)
