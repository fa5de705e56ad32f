"""``flaircad serve`` in a subprocess, as operators run it: real signals, real logs, real
worker processes. Plus small helpers for multipart bodies, Prometheus scrapes and phantoms
carrying patient identifiers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
from prometheus_client.parser import text_string_to_metric_families

FLAIRCAD = Path(sys.executable).with_name("flaircad")
# process groups of every server started here; conftest checks at the end of the session that
# none of them has a process left
STARTED_GROUPS: list[int] = []


def live_groups() -> list[int]:
    """The started process groups that still have a process in them."""
    alive = []
    for group in STARTED_GROUPS:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(group)
    return alive


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """``flaircad serve`` with ``FLAIRCAD_*`` settings from ``env``; stderr (the JSON logs)
    and stdout go to files under ``folder``."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr_path(self) -> Path:
        return self.folder / "stderr.log"

    @property
    def stdout_path(self) -> Path:
        return self.folder / "stdout.log"

    def start(self, ready_timeout: float = 120) -> ServerProcess:
        assert FLAIRCAD.is_file(), "the flaircad console script is not installed"
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("FLAIRCAD_") and key != "PROMETHEUS_MULTIPROC_DIR"}
        # authentication has its own tests (tests/integration/test_security.py,
        # tests/integration/test_reliability.py)
        env.update({"FLAIRCAD_SPOOL_DIR": str(self.folder / "spool"),
                    "FLAIRCAD_HOST": "127.0.0.1", "FLAIRCAD_PORT": str(self.port),
                    "FLAIRCAD_AUTH_DISABLED": "true"})
        env.update(self.env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # its own process group: with --workers the workers are children of it, and
            # kill() must reach them too (a SIGKILLed parent leaves them listening)
            self.process = subprocess.Popen([str(FLAIRCAD), "serve", *self.args], env=env,
                                            stdout=out, stderr=err, cwd=self.folder,
                                            start_new_session=True)
        STARTED_GROUPS.append(self.process.pid)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flaircad serve exited ({self.process.returncode}):\n"
                                   + self.stderr_path.read_text()[-4000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("flaircad serve did not become ready:\n"
                           + self.stderr_path.read_text()[-4000:])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit status (uvicorn re-raises SIGTERM: -15 is normal)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            status = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        # a worker that outlived its parent would keep the port: the group goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return status

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and any worker processes)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=30)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (its main process, from /proc)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")

    def log_lines(self) -> list[str]:
        return self.stderr_path.read_text(encoding="utf-8",
                                          errors="replace").splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines() if line.strip()]


def related(parts: list[bytes], boundary: str = "ops-boundary") -> tuple[bytes, dict[str, str]]:
    """A multipart/related application/dicom body and its headers."""
    body = b""
    for data in parts:
        body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                 + b"\r\n")
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; '
                                  f"boundary={boundary}"}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """``/metrics`` as {(sample name, labels): value}."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    return parse_samples(response.text)


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a counter not yet incremented)."""
    return samples.get((metric, frozenset(labels.items())), 0.0)


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


@dataclass(frozen=True)
class Identifiers:
    """Patient identifiers written into a phantom series: none may ever reach a log."""

    patient_name: str = "Quuxley^Zebedee^Ottoline"
    patient_id: str = "PID-86753091"
    # invalid as DA on purpose: the outputs must clean it, and pydicom quotes such values
    # in its warnings
    birth_date: str = "1971-02-03"
    accession_number: str = "ACC55512340"

    def needles(self) -> list[str]:
        name_parts = [part for part in self.patient_name.split("^") if len(part) > 3]
        return [self.patient_name, *name_parts, self.patient_id, self.birth_date,
                self.birth_date.replace("-", ""), self.accession_number]


def with_identifiers(folder: Path, out: Path, ids: Identifiers,
                     **changes: Any) -> list[Path]:
    """Copies of the series under ``folder`` carrying ``ids`` (and ``changes``)."""
    import warnings

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the invalid DA is the point
            ds.PatientName = ids.patient_name
            ds.PatientID = ids.patient_id
            ds.PatientBirthDate = ids.birth_date
            ds.AccessionNumber = ids.accession_number
            for keyword, new in changes.items():
                setattr(ds, keyword, new)
            ds.save_as(out / path.name, enforce_file_format=True)
        written.append(out / path.name)
    return written


def wait_for_study(url: str, study: str, count: int = 1, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        analyses = httpx.get(f"{url}/v1/analyses", params={"study_instance_uid": study},
                             timeout=10).json()["analyses"]
        if len(analyses) >= count and all(
                a["status"] in ("done", "rejected", "failed") for a in analyses):
            return analyses
        time.sleep(0.2)
    raise AssertionError(f"no {count} finished analyses of the study within {timeout} s")


def iter_dicom(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        yield path.read_bytes()
