"""The Parametric Map against the standard with ``dciodvfy``: axial, sagittal and oblique
phantoms and a real enhanced multi-frame series, 0 errors.

Allowed warnings, and why:

* ``Unrecognized defined term <99FLAIRCAD>``: the private coding scheme of the map's quantity,
  declared in the Coding Scheme Identification Sequence (as in the SR);
* ``Unrecognized defined term <QUANTITY> for value 4``: Derived Pixel Contrast QUANTITY is a
  Parametric Map term the Debian (2022) dicom3tools list lacks; later releases accept it.

The palette option (COLOR_RANGE) draws two errors that are dciodvfy's own: it checks the FD
attributes Minimum / Maximum Stored Value Mapped against string values. The last test pins
exactly those two, so that a dciodvfy that stops reporting them shows up here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from service.pipeline import pm, sc
from tests.conftest import PhantomFactory, require
from tests.unit.test_pm import ENHANCED, build, inputs

ALLOWED_WARNINGS = (
    "Warning - Unrecognized defined term <99FLAIRCAD>",
    "Warning - Unrecognized defined term <QUANTITY> for value 4",
)


def dciodvfy(path: Path) -> tuple[list[str], set[str]]:
    binary = shutil.which("dciodvfy")
    require(binary, "dciodvfy is not on PATH (apt-get install dicom3tools)")
    assert binary is not None
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            {line for line in lines if line.startswith("Warning")})


def _write(folder: Path, target: Path, explanation: str = "hirescam",
           palette: bool = False) -> Path:
    path = target / "pm.dcm"
    path.write_bytes(sc.encode_part10(build(inputs(folder), explanation, palette)))
    return path


@pytest.mark.parametrize(("variant", "explanation"), [
    ("axial", "hirescam"), ("sagittal", "gradcam"), ("oblique", "attention")])
def test_parametric_map_passes_dciodvfy(phantom_series: PhantomFactory, tmp_path: Path,
                                        variant: str, explanation: str) -> None:
    errors, warnings = dciodvfy(_write(phantom_series(variant=variant), tmp_path,
                                       explanation=explanation))
    assert errors == []
    assert {w for w in warnings if not w.startswith(ALLOWED_WARNINGS)} == set()


def test_parametric_map_of_an_enhanced_multiframe_source_passes_dciodvfy(
        dicom_samples: Path, tmp_path: Path) -> None:
    errors, warnings = dciodvfy(_write(dicom_samples / ENHANCED / "dicom", tmp_path))
    assert errors == []
    assert {w for w in warnings if not w.startswith(ALLOWED_WARNINGS)} == set()


def test_palette_draws_only_dciodvfys_own_two_errors(phantom_series: PhantomFactory,
                                                     tmp_path: Path) -> None:
    errors, warnings = dciodvfy(_write(phantom_series(), tmp_path, palette=True))
    assert sorted(errors) == sorted(pm.DCIODVFY_COLOR_RANGE_ERRORS)
    assert {w for w in warnings if not w.startswith(ALLOWED_WARNINGS)} == set()
