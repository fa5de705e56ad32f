"""End to end on loopback: a phantom FLAIR series in, the result out, against model-only time.

    .venv/bin/python bench/e2e.py [--runs 7] [--clients 1 2 4 8] [--seconds 20]

Starts ``flaircad serve`` as a subprocess (bundled model, CPU unless CUDA is present, auth off,
fresh spool) and, side by side in the same run:

1. model-only: onnxruntime on the preprocessed volume in this process, with the service's thread
   settings (the floor the service can approach);
2. ``POST /v1/analyses`` (synchronous) with a 24-slice axial series and a 200-slice sagittal 3D
   series: latency median / p95 and the ratio end-to-end ÷ model-only (goal ≤ 1.10 on CPU);
3. STOW-RS of the 24-slice series, until its analysis is done (the stability window is set to
   ``--window`` seconds and reported separately, since it is a waiting time by design);
4. the service's own per-stage timings (decode, volume, preprocess, inference, render, encode);
5. throughput in series/s with 1, 2, 4, 8 concurrent clients posting the 24-slice series;
6. time from process start to ready (session creation + warm-up).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.config import BUNDLED_MODEL  # noqa: E402
from service.core.preprocess import preprocess  # noqa: E402
from service.core.volume import load_series_volume  # noqa: E402
from service.phantoms import write_dicom_series  # noqa: E402
from service.pipeline.engine import Engine  # noqa: E402

STAGES = ("decode", "volume", "preprocess", "inference", "render", "encode", "total")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def related_body(folder: Path, boundary: str) -> bytes:
    out = b""
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        out += (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def model_only_ms(engine: Engine, folder: Path, runs: int) -> float:
    volume = load_series_volume(folder)
    prepared = preprocess(volume.array, volume.affine_lps, engine.info.preprocessing)
    batch = prepared.model_input[None]
    engine.run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.run(batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def batch_sweep(engine: Engine, folder: Path, batches: list[int], runs: int) -> list[dict]:
    """Model-only series/s when several series share one onnxruntime call: the most that
    batching across requests could give, before any waiting for a batch to fill."""
    volume = load_series_volume(folder)
    one = preprocess(volume.array, volume.affine_lps, engine.info.preprocessing).model_input
    out = []
    for size in batches:
        batch = np.repeat(one[None], size, axis=0)
        engine.run(batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - start)
        per_call = statistics.median(times)
        out.append({"batch": size, "ms_per_call": per_call * 1000,
                    "series_per_s": size / per_call})
    return out


class Service:
    def __init__(self, spool: Path, window: float, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, FLAIRCAD_SPOOL_DIR=str(spool), FLAIRCAD_AUTH_DISABLED="true",
                   FLAIRCAD_STABILITY_WINDOW_S=str(window), FLAIRCAD_WORKERS=str(workers),
                   FLAIRCAD_MAX_QUEUE="64")
        flaircad = Path(sys.executable).with_name("flaircad")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(flaircad), "serve", "--port", str(self.port)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("the service did not become ready")
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def post_series(client: httpx.Client, url: str, body: bytes) -> tuple[float, dict[str, Any]]:
    # no-cache: the service answers a re-sent identical series from its earlier analysis
    headers = {"Content-Type": "multipart/related; type=application/dicom; boundary=bench",
               "Cache-Control": "no-cache"}
    start = time.perf_counter()
    response = client.post(url + "/v1/analyses", content=body, headers=headers, timeout=300)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed, response.json()


def sync_latency(service: Service, body: bytes, runs: int) -> dict[str, Any]:
    latencies, stages = [], {stage: [] for stage in STAGES}
    with httpx.Client() as client:
        post_series(client, service.url, body)  # warm-up
        for _ in range(runs):
            elapsed, result = post_series(client, service.url, body)
            latencies.append(elapsed)
            for stage in STAGES:
                stages[stage].append(result["timings_ms"][stage])
    return {"median_ms": statistics.median(latencies), "p95_ms": percentile(latencies, 95),
            "stages_ms": {k: statistics.median(v) for k, v in stages.items()}}


def stow_latency(service: Service, folder: Path, runs: int) -> dict[str, Any]:
    """Fresh UIDs per run (a re-sent series is not analysed twice): new phantom seeds."""
    latencies = []
    with httpx.Client() as client, tempfile.TemporaryDirectory() as tmp:
        for run in range(runs + 1):
            series = Path(tmp) / str(run)
            write_dicom_series("MS", 5000 + run, series)
            body = related_body(series, "stow")
            study = json.loads(subprocess.run(
                [str(Path(sys.executable).with_name("flaircad")), "inspect", str(series)],
                capture_output=True, text=True).stdout.splitlines()[0])
            start = time.perf_counter()
            response = client.post(service.url + "/dicomweb/studies", content=body, headers={
                "Content-Type": "multipart/related; type=application/dicom; boundary=stow"})
            response.raise_for_status()
            while True:
                found = client.get(service.url + "/v1/analyses").json()["analyses"]
                done = [a for a in found if a.get("series_instance_uid")
                        == study["series_instance_uid"] and a["status"] == "done"]
                if done:
                    break
                time.sleep(0.01)
            if run:  # the first run warms up
                latencies.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(latencies), "p95_ms": percentile(latencies, 95)}


def throughput(service: Service, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = 0

    def client_loop() -> None:
        nonlocal errors
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                try:
                    elapsed, _ = post_series(client, service.url, body)
                    latencies.append(elapsed)
                except httpx.HTTPError:
                    errors += 1

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    wall = time.monotonic() - start
    return {"clients": clients, "series_per_s": len(latencies) / wall,
            "p50_ms": percentile(latencies, 50) if latencies else None,
            "p95_ms": percentile(latencies, 95) if latencies else None, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--window", type=float, default=0.2, help="stability window, s")
    parser.add_argument("--workers", type=int, default=1, help="FLAIRCAD_WORKERS")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        axial, sagittal = Path(tmp) / "axial", Path(tmp) / "sagittal"
        write_dicom_series("MS", 1, axial)
        write_dicom_series("cSVD", 2, sagittal, variant="sagittal", slices=200)
        service = Service(Path(tmp) / "spool", args.window, args.workers)
        try:
            engine = Engine(BUNDLED_MODEL, ["CUDAExecutionProvider", "CPUExecutionProvider"])
            report["provider"] = engine.provider
            report["time_to_ready_s"] = round(service.ready_s, 2)
            for name, folder in (("axial_24", axial), ("sagittal_200", sagittal)):
                body = related_body(folder, "bench")
                model_ms = model_only_ms(engine, folder, args.runs)
                e2e = sync_latency(service, body, args.runs)
                report[name] = {"model_only_ms": model_ms, "v1_analyses": e2e,
                                "ratio_e2e_over_model": e2e["median_ms"] / model_ms}
            report["batching"] = batch_sweep(engine, axial, [1, 2, 4, 8], args.runs)
            report["axial_24"]["stow_rs"] = stow_latency(service, axial, args.runs)
            report["axial_24"]["stow_rs"]["stability_window_s"] = args.window
            body = related_body(axial, "bench")
            report["throughput"] = [throughput(service, body, n, args.seconds)
                                    for n in args.clients]
        finally:
            service.stop()

    print(f"provider {report['provider']}, time to ready {report['time_to_ready_s']} s")
    for name in ("axial_24", "sagittal_200"):
        item = report[name]
        e2e = item["v1_analyses"]
        print(f"{name}: model-only {item['model_only_ms']:.1f} ms | /v1/analyses median "
              f"{e2e['median_ms']:.1f} ms p95 {e2e['p95_ms']:.1f} ms | ratio e2e/model "
              f"{item['ratio_e2e_over_model']:.2f} (goal <= 1.10)")
        total = e2e["stages_ms"]["total"]
        print("   stages: " + ", ".join(
            f"{stage} {ms:.1f} ms ({100 * ms / total:.0f} %)"
            for stage, ms in e2e["stages_ms"].items() if stage != "total"))
    stow = report["axial_24"]["stow_rs"]
    print(f"STOW-RS axial_24 until done: median {stow['median_ms']:.1f} ms, p95 "
          f"{stow['p95_ms']:.1f} ms (stability window {args.window} s included)")
    for item in report["batching"]:
        print(f"model-only batch {item['batch']}: {item['ms_per_call']:.1f} ms per call, "
              f"{item['series_per_s']:.2f} series/s")
    for item in report["throughput"]:
        print(f"throughput {item['clients']} client(s): {item['series_per_s']:.2f} series/s, "
              f"p50 {item['p50_ms']:.0f} ms, p95 {item['p95_ms']:.0f} ms, "
              f"errors {item['errors']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
