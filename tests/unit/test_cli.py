"""The flaircad command line, run as a user would (the installed console script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

# the console script installed beside this interpreter (make test does not put it on PATH)
FLAIRCAD = Path(sys.executable).with_name("flaircad")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert FLAIRCAD.is_file(), "the flaircad console script is not installed (pip install -e .)"
    return subprocess.run([str(FLAIRCAD), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["phantom"], ["serve"], ["inspect"]])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: flaircad" in result.stdout


def test_phantom_writes_a_flair_series(tmp_path: Path) -> None:
    result = run("phantom", "--label", "cSVD", "--seed", "3", "--slices", "22",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 22
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and "IR" in ds.ScanningSequence
    assert "FLAIR" in ds.SeriesDescription.upper()


def test_phantom_refuses_an_unavailable_codec_cleanly(tmp_path: Path) -> None:
    result = run("phantom", "--label", "MS", "--compress", "jpeg-lossless", "--out",
                 str(tmp_path))
    if result.returncode == 0:  # pydicom learnt to encode it: then the files must say so
        ds = pydicom.dcmread(sorted(tmp_path.glob("*.dcm"))[0])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        return
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "JPEG" in result.stderr


def test_unknown_label_is_a_usage_error(tmp_path: Path) -> None:
    result = run("phantom", "--label", "AD", "--out", str(tmp_path))
    assert result.returncode == 2 and "invalid choice" in result.stderr
