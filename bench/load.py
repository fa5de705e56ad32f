"""Load test on loopback: N concurrent clients posting phantom series for a bounded time.

    .venv/bin/python bench/load.py [--clients 1 2 4 8] [--seconds 30] [--warmup-s 10]
                                   [--workers 1] [--json out.json]

Starts ``flaircad serve`` once as a subprocess (bundled model, authentication ON with a
generated API key, fresh spool, CPU unless CUDA is present) and runs the client counts one
after the other against it. Each client loops for ``--seconds``: ``POST /v1/analyses``
(synchronous, ``Cache-Control: no-cache`` so that every request is analysed and not answered
from an earlier identical upload) with one of four distinct 24-slice phantom series. Reported
per client count:

* throughput (analyses per second), latency p50/p95/p99 (ms), errors (non-2xx answers and
  transport failures; 503 refusals, which tell a client to come back, are counted apart);
* the server's RSS (``/proc/<pid>/status`` VmRSS) sampled every 0.5 s; over the whole run,
  the growth from the end of the warm-up (``--warmup-s`` at the first client count) to the end.

Then, with ``--huge-mib N`` (default 512), one STOW-RS request of N MiB sent chunked, in 1 MiB
DICOM parts (one instance, so the rest are duplicates), while the server's RSS is sampled every
0.1 s: the body is spooled part by part as it streams in, so the server's peak should grow by
about one part, not by N MiB.

Not a unit test: it takes minutes. Figures go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.phantoms import write_dicom_series  # noqa: E402

BOUNDARY = "flaircad-load"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def related_body(folder: Path) -> bytes:
    out = b""
    for path in sorted(folder.glob("*.dcm")):
        out += (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + path.read_bytes() + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


class Server:
    def __init__(self, spool: Path, key: str, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAIRCAD_")}
        env.update(FLAIRCAD_SPOOL_DIR=str(spool), FLAIRCAD_API_KEYS=f"load:{key}",
                   FLAIRCAD_WORKERS=str(workers), FLAIRCAD_PORT=str(self.port),
                   FLAIRCAD_LOG_LEVEL="warning")
        self.log = open(spool.parent / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([str(Path(sys.executable).with_name("flaircad")),
                                         "serve"], env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("flaircad serve exited; see " + self.log.name)
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the service did not become ready")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@dataclass
class Run:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    refused_503: int = 0
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (time, MiB)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([0.0])
        rss = [m for _, m in self.rss_mib]
        return {
            "clients": self.clients, "seconds": round(self.seconds, 1),
            "analyses": len(self.latencies_ms),
            "throughput_per_s": round(len(self.latencies_ms) / self.seconds, 2),
            "p50_ms": round(float(np.percentile(latencies, 50))),
            "p95_ms": round(float(np.percentile(latencies, 95))),
            "p99_ms": round(float(np.percentile(latencies, 99))),
            "errors": sum(self.errors.values()), "error_kinds": self.errors,
            "refused_503": self.refused_503,
            "rss_mib_start": round(rss[0], 1) if rss else None,
            "rss_mib_end": round(rss[-1], 1) if rss else None,
            "rss_mib_max": round(max(rss), 1) if rss else None,
        }


def client_loop(url: str, key: str, bodies: list[bytes], run: Run, stop_at: float,
                index: int) -> None:
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache",
               "Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={BOUNDARY}"}
    n = index
    with httpx.Client(timeout=600) as client:
        while time.monotonic() < stop_at:
            body = bodies[n % len(bodies)]
            n += 1
            started = time.perf_counter()
            try:
                response = client.post(url + "/v1/analyses", content=body, headers=headers)
            except httpx.HTTPError as error:
                with run.lock:
                    kind = type(error).__name__
                    run.errors[kind] = run.errors.get(kind, 0) + 1
                continue
            elapsed = (time.perf_counter() - started) * 1000
            with run.lock:
                if response.status_code == 200 and response.json().get("status") == "done":
                    run.latencies_ms.append(elapsed)
                elif response.status_code == 503:
                    run.refused_503 += 1
                    time.sleep(float(response.headers.get("retry-after", "1")))
                else:
                    kind = f"http_{response.status_code}"
                    run.errors[kind] = run.errors.get(kind, 0) + 1


def run_clients(server: Server, key: str, bodies: list[bytes], clients: int, seconds: float,
                samples: list[tuple[float, float]], t0: float) -> Run:
    run = Run(clients, seconds)
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(server.url, key, bodies, run,
                                                          stop_at, i)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        sample = (round(time.monotonic() - t0, 1), rss_mib(server.process.pid))
        samples.append(sample)
        run.rss_mib.append(sample)
        time.sleep(0.5)
    for thread in threads:
        thread.join()
    run.seconds = time.monotonic() - started  # the last requests end after stop_at
    return run


def _one_mib_instance() -> bytes:
    """A 1 MiB MR image (724 x 724, 16 bit): every part of the huge body is this instance, so
    the first is stored and the rest are acknowledged duplicates (parsed, hashed, compared)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
    ds.Rows = ds.Columns = 724
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(724 * 724 * 2)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_body(server: Server, key: str, mib: int) -> dict[str, Any]:
    """One STOW-RS body of ``mib`` 1 MiB instances, chunked; the server's RSS before and at
    its peak, and the rate at which the body was taken in."""
    instance = _one_mib_instance()

    def chunks() -> Any:
        part = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + instance + b"\r\n")
        for _ in range(mib):
            yield part
        yield f"--{BOUNDARY}--\r\n".encode()

    before = rss_mib(server.process.pid)
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(server.process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    response = httpx.post(server.url + "/dicomweb/studies", content=chunks(), timeout=600,
                          headers={"Authorization": f"Bearer {key}",
                                   "Content-Type": f"multipart/related; "
                                                   f"type=application/dicom; boundary={BOUNDARY}"})
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"mib": mib, "status": response.status_code, "seconds": round(seconds, 1),
            "mib_per_s": round(mib / seconds, 1), "rss_mib_before": round(before, 1),
            "rss_mib_peak": round(peak, 1), "rss_mib_growth": round(peak - before, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=10.0,
                        help="RSS growth is measured from this long into the first run")
    parser.add_argument("--workers", type=int, default=1, help="FLAIRCAD_WORKERS")
    parser.add_argument("--huge-mib", type=int, default=512,
                        help="size of the one large STOW-RS body (0: skip)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="flaircad-load-") as tmp:
        root = Path(tmp)
        bodies = []
        for label, seed in (("MS", 1), ("cSVD", 2), ("MS", 3), ("cSVD", 4)):
            folder = root / f"{label}-{seed}"
            write_dicom_series(label, seed, folder)
            bodies.append(related_body(folder))
        (root / "spool").mkdir()
        server = Server(root / "spool", key, args.workers)
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        runs = []
        try:
            for clients in args.clients:
                run = run_clients(server, key, bodies, clients, args.seconds, samples, t0)
                runs.append(run.summary())
                print(json.dumps(runs[-1]), flush=True)
            huge = huge_body(server, key, args.huge_mib) if args.huge_mib else None
            print(json.dumps({"huge_body": huge}), flush=True)
        finally:
            server.stop()
    after_warmup = [m for t, m in samples if t >= args.warmup_s]
    growth = (after_warmup[-1] / after_warmup[0] - 1) * 100 if len(after_warmup) > 1 else None
    report = {"runs": runs, "rss_mib_after_warmup": round(after_warmup[0], 1)
              if after_warmup else None, "rss_mib_final": round(samples[-1][1], 1),
              "rss_growth_after_warmup_pct": round(growth, 1) if growth is not None else None,
              "rss_timeline": samples[::max(1, len(samples) // 40)],
              "huge_body": huge, "cpu_count": os.cpu_count(), "workers": args.workers}
    print(json.dumps({k: v for k, v in report.items() if k != "rss_timeline"}))
    print("\n| clients | analyses/s | p50 ms | p95 ms | p99 ms | errors | 503 | RSS MiB end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['clients']} | {r['throughput_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['p99_ms']} | {r['errors']} | {r['refused_503']} | {r['rss_mib_end']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
