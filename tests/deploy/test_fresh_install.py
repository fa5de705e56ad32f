"""``pip install .`` without extras, as the images install flaircad, in a venv of its own:
that install alone serves an analysis and delivers its result to a STOW-RS destination.
httpx, which the delivery code imports, was once only a dev extra (issue 13): the dev venv of
the other tests has it whatever pyproject.toml says, so only a fresh venv can tell.

The venv is built once per pyproject.toml (its hash names the folder, under
``~/.cache/flaircad-tests`` or ``$FLAIRCAD_TEST_CACHE``): about a minute here, from the local
package index; later runs reinstall only the project itself (a few seconds), so that they test
the current code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import _server
from tests._server import ServerProcess, free_port
from tests.conftest import PhantomFactory, require
from tests.integration.test_forward import StowReceiver

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLAIRCAD_TEST_CACHE")
             or Path.home() / ".cache" / "flaircad-tests")
# what `pip install .` reads: the metadata and the packages (pyproject.toml [tool.setuptools])
SOURCES = ("pyproject.toml", "README.md", "service", "model_export")
SLICES = 8
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def _pip(venv: Path, *args: str, timeout: float = 900) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--no-input", *args],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        # pip could not install (no package index reachable, say): a prerequisite, not a
        # finding, unless FLAIRCAD_STRICT_TESTS=1
        require(False, f"pip {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")


def _source_copy(into: Path) -> Path:
    """The project's sources in a folder of their own: pip builds in the tree it is given,
    and build/ or *.egg-info in the working tree would race with other runs."""
    source = into / "flaircad-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    return source


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time for a venv (two test runs on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def fresh_venv(work: Path) -> Path:
    """A venv made by ``python -m venv`` and ``pip install <project>`` (no extras), kept
    while pyproject.toml is unchanged; the project itself reinstalled from the current
    sources on every call."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    venv = CACHE / f"venv-{key}"
    stamp = venv / ".flaircad-installed"
    source = _source_copy(work)
    with _locked(CACHE / f"venv-{key}.lock"):
        if not stamp.is_file():
            shutil.rmtree(venv, ignore_errors=True)
            # the interpreter the tests run on, without its venv's packages
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            started = time.monotonic()
            _pip(venv, "install", "--quiet", str(source))
            stamp.write_text(json.dumps({"pip_install_s": round(time.monotonic() - started)}))
        else:
            _pip(venv, "install", "--quiet", "--no-deps", "--force-reinstall", str(source))
    stamp.touch()  # in use: kept by the clean-up below, in another checkout's run too
    _remove_unused(keep=venv)
    return venv


def _remove_unused(keep: Path, unused_s: float = 86400) -> None:
    """Venvs of other pyproject.toml versions (about 800 MB each) go once unused for a day;
    one still in use by another checkout's runs is kept."""
    for stale in CACHE.glob("venv-*"):
        stamp = stale / ".flaircad-installed"
        if not stale.is_dir() or stale == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            if time.time() - stamp.stat().st_mtime < unused_s:
                continue
        with _locked(stale.with_name(stale.name + ".lock")):
            shutil.rmtree(stale, ignore_errors=True)


def _isolated_env() -> dict[str, str]:
    """No path of the dev venv or the working tree may reach the fresh venv's imports."""
    return {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1", "VIRTUAL_ENV": ""}


def test_pip_install_alone_serves_and_delivers_a_result(
        tmp_path: Path, phantom_series: PhantomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    # the package is the installed copy, and the dev extras are absent, as in an image
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, service; print(service.__file__); "
         "print(u.find_spec('pytest') is None, u.find_spec('dicomweb_client') is None)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, **_isolated_env()})
    assert probe.returncode == 0, probe.stderr
    where, no_dev = probe.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert no_dev == "True True", "the fresh venv has dev extras: it would hide a missing dep"

    monkeypatch.setattr(_server, "FLAIRCAD", venv / "bin" / "flaircad")
    folder = phantom_series(label="MS", seed=23, slices=SLICES)
    files = [("files", (p.name, p.read_bytes(), "application/dicom"))
             for p in sorted(folder.glob("*.dcm"))]
    with StowReceiver() as sink:
        destination = {"name": "sink", "kind": "stow", "url": sink.url}
        server = ServerProcess(tmp_path / "serve", port=free_port(), env={
            **_isolated_env(), "FLAIRCAD_PROVIDERS": '["CPUExecutionProvider"]',
            "FLAIRCAD_DESTINATIONS": json.dumps([destination]),
            "FLAIRCAD_DELIVERY_BACKOFF_S": "0.5", "FLAIRCAD_DELIVERY_BACKOFF_MAX_S": "2"})
        server.start()
        try:
            posted = httpx.post(server.url + "/v1/analyses", files=files, timeout=180)
            assert posted.status_code == 200, posted.text
            analysis = posted.json()
            assert analysis["status"] == "done", analysis
            deadline = time.monotonic() + 60
            deliveries: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                deliveries = httpx.get(f"{server.url}/v1/analyses/{analysis['analysis_id']}",
                                       timeout=30).json().get("deliveries") or []
                if deliveries and deliveries[0]["state"] in ("sent", "failed"):
                    break
                time.sleep(0.2)
        finally:
            server.stop()
    assert [(d["destination"], d["state"]) for d in deliveries] == [("sink", "sent")], (
        deliveries, server.stderr_path.read_text()[-3000:])
    datasets = [ds for request in sink.requests for ds in request["datasets"]]
    outputs = analysis["outputs"]
    captures = [ds for ds in datasets if str(ds.SeriesInstanceUID)
                == outputs["secondary_capture_series_instance_uid"]]
    assert len(captures) == SLICES
    assert [str(ds.SOPInstanceUID) for ds in datasets
            if str(ds.SOPClassUID) == SR_STORAGE] == [outputs["sr_sop_instance_uid"]]
