"""Helpers for the PACS tests: a throw-away Orthanc (Debian's ``orthanc`` +
``orthanc-dicomweb``), a flaircad server in a thread on chosen ports, and waiting helpers.

Orthanc 1.10 listens on every interface (it cannot bind to loopback only); with
``RemoteAccessAllowed`` false its REST API answers loopback clients only, and it gets free
ports (not 8042/4242, which Debian's own ``orthanc.service`` may hold). It is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.core.config import Settings
from service.runtime.app import create_app
from tests.conftest import require

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_USER, ORTHANC_PASSWORD = "flaircad-test", "orthanc-test-password"
API_KEY = "pacs-test-key-0123456789abcdef"  # used where the service asks for a bearer token


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file()
                                       else None)
    require(path, "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    require(DICOMWEB_PLUGIN.is_file(),
            f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is absent (apt-get install "
            "orthanc-dicomweb)")
    assert path is not None
    return path


def dcmtk(command: str) -> str:
    path = shutil.which(command)
    require(path, f"{command} is not on PATH (apt-get install dcmtk)")
    assert path is not None
    return path


# -- auth (issue 6): the service may ask for a bearer token on its routes -----------------------
def auth_settings() -> dict[str, Any]:
    """Settings that make test requests pass the service's authentication, whatever it is:
    the key below where the service takes API keys in its settings, authentication switched
    off where it only has that switch, nothing where it has no authentication."""
    fields = Settings.model_fields
    for name in ("api_keys", "api_key"):
        if name in fields:
            return {name: [API_KEY] if "list" in str(fields[name].annotation) else API_KEY}
    if "auth_disabled" in fields:
        return {"auth_disabled": True}
    return {}


def auth_headers() -> dict[str, str]:
    uses_key = any(name in auth_settings() for name in ("api_keys", "api_key"))
    return {"Authorization": f"Bearer {API_KEY}"} if uses_key else {}


# -- flaircad in a thread ---------------------------------------------------------------------
@dataclass
class Flaircad:
    settings: Settings
    port: int
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> Flaircad:
        config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the flaircad server thread ended while starting")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the flaircad server did not become ready")

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=60)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**auth_headers(), **kwargs.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kwargs)

    def analyses(self, study: str) -> list[dict[str, Any]]:
        response = self.get("/v1/analyses", params={"study_instance_uid": study})
        response.raise_for_status()
        return list(response.json()["analyses"])

    def wait_for_study(self, study: str, timeout: float = 90) -> list[dict[str, Any]]:
        """The study's analyses once there is one and all have finished."""
        return wait_until(lambda: _finished(self.analyses(study)), timeout,
                          f"a finished analysis of study {study}")

    def analysis(self, analysis_id: str) -> dict[str, Any]:
        response = self.get(f"/v1/analyses/{analysis_id}")
        response.raise_for_status()
        return dict(response.json())


def _finished(analyses: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if analyses and all(a["status"] in ("done", "rejected", "failed") for a in analyses):
        return analyses
    return None


def wait_until(probe: Callable[[], Any], timeout: float, what: str,
               period: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# -- Orthanc ------------------------------------------------------------------------------------
AUTOROUTE_LUA = """
-- Route every new MR series to flaircad, never flaircad's own results (README, "Connect your
-- PACS"): those are not MR (the Grad-CAM Secondary Capture series is OT, the report SR), their
-- Manufacturer is "flaircad" and their SeriesDescription starts with "flaircad". Any one test
-- stops the loop; all are kept, so that a PACS rewriting one of them cannot open it.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  local manufacturer = tags['Manufacturer'] or ''
  local description = string.lower(tags['SeriesDescription'] or '')
  if modality ~= 'MR' or manufacturer == 'flaircad' or
      string.sub(description, 1, 8) == 'flaircad' then
    print('flaircad autoroute: skipping series ' .. seriesId .. ' (' .. modality .. ', ' ..
          manufacturer .. ')')
    return
  end
  print('flaircad autoroute: sending series ' .. seriesId)
  RestApiPost('/dicom-web/servers/flaircad/stow', '{"Resources": ["' .. seriesId .. '"]}')
end
"""


@dataclass
class Orthanc:
    folder: Path
    flaircad_url: str
    flaircad_dimse_port: int
    autoroute: bool = False
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    flaircad_headers: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self) -> dict[str, Any]:
        server: dict[str, Any] = {"Url": self.flaircad_url.rstrip("/") + "/dicomweb/"}
        if self.flaircad_headers:
            server["HttpHeaders"] = self.flaircad_headers
        config: dict[str, Any] = {
            "Name": f"flaircad-test-{self.http_port}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                         "Servers": {"flaircad": server}},
            "DicomModalities": {"flaircad": {"AET": "FLAIRCAD", "Host": "127.0.0.1",
                                             "Port": self.flaircad_dimse_port}},
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "HttpTimeout": 60,
        }
        if self.autoroute:
            script = self.folder / "autoroute.lua"
            script.write_text(AUTOROUTE_LUA)
            config["LuaScripts"] = [str(script)]
        return config

    def start(self, timeout: float = 60) -> Orthanc:
        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, "--verbose", str(path)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}):\n"
                                   + self.log_path.read_text(errors="replace")[-4000:])
            try:
                if self.get("/system").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start:\n"
                           + self.log_path.read_text(errors="replace")[-4000:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- REST ---------------------------------------------------------------------------------
    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=60,
                         **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=120,
                          **kwargs)

    def upload(self, files: list[Path]) -> str:
        """Store the files; the Orthanc ID of their (one) series."""
        series = set()
        for path in files:
            response = self.post("/instances", content=path.read_bytes())
            response.raise_for_status()
            series.add(response.json()["ParentSeries"])
        assert len(series) == 1, series
        return series.pop()

    def study_series(self, study_instance_uid: str) -> dict[str, dict[str, Any]]:
        """SeriesInstanceUID → Orthanc's series resource (with ``Instances``)."""
        found = self.post("/tools/lookup", content=study_instance_uid).json()
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return {}
        series = self.get(f"/studies/{studies[0]}/series").json()
        return {item["MainDicomTags"]["SeriesInstanceUID"]: item for item in series}

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.get(f"/jobs/{job_id}").json()
            return job if job["State"] in ("Success", "Failure") else None

        return dict(wait_until(finished, timeout, f"Orthanc job {job_id}"))


def flaircad_settings(spool: Path, **overrides: Any) -> Settings:
    """Small, fast settings for the PACS tests (and the auth the service may demand)."""
    values: dict[str, Any] = {"spool_dir": spool, "stability_window_s": 1.0,
                              "max_upload_bytes": 64 * 1024**2, "delivery_backoff_s": 0.5,
                              "delivery_backoff_max_s": 2.0, **auth_settings()}
    values.update(overrides)
    return Settings(**values)


def analyse_upload(server: Flaircad, folder: Path) -> dict[str, Any]:
    """POST a series folder to ``/v1/analyses`` (multipart/form-data) and return the finished
    analysis' JSON."""
    import httpx

    files = [("files", (p.name, p.read_bytes(), "application/dicom"))
             for p in sorted(folder.glob("*.dcm"))]
    response = httpx.post(server.url + "/v1/analyses", files=files, headers=auth_headers(),
                          timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
