"""Shared test constants, prerequisites and fixtures.

Tests that need something outside the repository (the ``../shared/dicom-samples`` folder, the
``dcm2niix`` binary) ask for it through :func:`require` or the fixtures below: missing, the test
is skipped with the reason; under ``FLAIRCAD_STRICT_TESTS=1`` (``.ci/run``) it fails instead, so
CI can never go green by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests by kind, one folder each, marked by their folder: `pytest -m "not training"` (no torch
# run), `-m unit` (no server, no external tool), ...
KINDS = ("unit", "integration", "training", "deploy")
SHARED = REPO.parent / "shared"
DICOM_SAMPLES = SHARED / "dicom-samples"
STRICT = os.environ.get("FLAIRCAD_STRICT_TESTS") == "1"


def require(condition: object, reason: str) -> None:
    """Skip with ``reason`` unless ``condition`` holds; fail instead under strict mode."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"{reason} (FLAIRCAD_STRICT_TESTS=1: a missing prerequisite fails)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def dicom_samples() -> Path:
    """``../shared/dicom-samples``: real scanner series with dcm2niix references."""
    require(DICOM_SAMPLES.is_dir(), f"DICOM sample folder {DICOM_SAMPLES} is absent")
    return DICOM_SAMPLES


@pytest.fixture(scope="session")
def dcm2niix() -> str:
    """The ``dcm2niix`` executable (Debian package ``dcm2niix``; ``.ci/run`` installs it)."""
    path = shutil.which("dcm2niix")
    require(path, "dcm2niix is not on PATH (apt-get install dcm2niix)")
    assert path is not None
    return path


PhantomFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> PhantomFactory:
    """``phantom_series(variant="axial", compress=None, slices=None, label="MS", seed=1)`` → a
    folder holding that phantom DICOM series, written once per test session."""
    from service.phantoms import write_dicom_series

    cache: dict[tuple[object, ...], Path] = {}
    root = tmp_path_factory.mktemp("phantoms")

    def make(variant: str = "axial", compress: str | None = None, slices: int | None = None,
             label: str = "MS", seed: int = 1) -> Path:
        key = (variant, compress, slices, label, seed)
        if key not in cache:
            folder = root / "-".join(str(part) for part in key)
            write_dicom_series(label, seed, folder, variant=variant, slices=slices,
                               compress=compress)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def no_server_process_left_behind() -> Iterator[None]:
    """Every `flaircad serve` a test started (tests/_server.py, each in its own process
    group) is gone when the session ends; a leftover is killed and reported as an error."""
    yield
    from tests._server import live_groups

    left = live_groups()
    for group in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    assert not left, f"server process groups left running after the tests: {left}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        kind = Path(str(item.path)).resolve().relative_to(tests).parts[0]
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))
