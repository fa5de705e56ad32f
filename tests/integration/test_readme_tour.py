"""README's 60-second tour, run as written (paths and port moved to this test's own), against
`flaircad serve` with authentication off, as `make serve` runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from tests._server import ServerProcess
from tests.conftest import REPO, require


def _tour() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## A 60-second tour"):]
    start = section.index("```sh\n") + len("```sh\n")
    return section[start:section.index("\n```\n", start)]


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    require(shutil.which("curl") is not None, "curl is not installed")
    server = ServerProcess(tmp_path / "server").start()
    try:
        work = tmp_path / "tour"
        work.mkdir()
        script = (_tour().replace("http://127.0.0.1:8000", server.url)
                  .replace("/tmp/", f"{work}/")
                  .replace(".venv/bin/flaircad", str(Path(sys.executable).with_name("flaircad")))
                  .replace("python3 ", f"{sys.executable} "))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (work / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = sorted(work.glob("output-*.dcm"))
    classes = [str(pydicom.dcmread(path).SOPClassUID) for path in outputs]
    # 24 Secondary Captures, the Parametric Map, the SR
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 24, classes
    assert classes.count("1.2.840.10008.5.1.4.1.1.30") == 1, classes
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1 and len(classes) == 26, classes
    assert f"{len(outputs)} DICOM files" in result.stdout


def test_the_tour_fails_loudly_on_a_refusal() -> None:
    """Every curl of the tour uses -f, so a problem+json answer stops the script."""
    lines = [line for line in _tour().splitlines() if line.lstrip().startswith("curl ")]
    assert len(lines) == 3 and all(" -sSf " in line for line in lines)
