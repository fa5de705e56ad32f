"""Prometheus metrics (prefix ``flaircad_``). Names are a contract with dashboards and alerts
(``docker/grafana/dashboards/flaircad.json``): change them only with a release note.

Works in one process and with several uvicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set
(``flaircad serve --workers N`` sets it) prometheus-client keeps every value in a file there and
``/metrics`` merges the files of all processes. Gauges say how they merge: per-process
quantities (queue depth, in-flight) are summed over live processes, the model info is the same
in every process and merged with ``livemax``. Values that describe shared state (the spool on
disk, the GPU) come from collectors that compute them when scraped, in whichever process
answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.storage.sqlite import DATABASE

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The *_created series double the series count and no dashboard here uses them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# -- HTTP ---------------------------------------------------------------------------------------
HTTP_DURATION = Histogram(
    "flaircad_http_request_duration_seconds",
    "HTTP request duration by route template; its _count is the request count",
    ("route", "method", "status"), buckets=_LATENCY_BUCKETS)

# -- pipeline -----------------------------------------------------------------------------------
STAGE_DURATION = Histogram(
    "flaircad_stage_duration_seconds",
    "Duration of each analysis stage (decode, volume, preprocess, inference, render, encode, "
    "total) of analyses that finished ok",
    ("stage",), buckets=_LATENCY_BUCKETS)
SERIES_ANALYSED = Counter(
    "flaircad_series_analysed_total", "Series analysed, by outcome (ok, rejected:<code>, failed)",
    ("outcome",))
PREDICTIONS = Counter("flaircad_predictions_total", "Predictions by class", ("class",))
INSTANCES_RECEIVED = Counter(
    "flaircad_instances_received_total", "DICOM instances received, by source (stow, upload)",
    ("source",))
INSTANCES_REFUSED = Counter(
    "flaircad_instances_refused_total", "DICOM instances refused, by reason", ("reason",))

# -- inference and queue ------------------------------------------------------------------------
MODEL_INFO = Gauge("flaircad_model_info", "The loaded model and its execution provider (value 1)",
                   ("name", "version", "provider"), multiprocess_mode="livemax")
QUEUE_DEPTH = Gauge("flaircad_queue_depth", "Analyses waiting for a worker",
                    multiprocess_mode="livesum")
QUEUE_WAIT = Histogram("flaircad_queue_wait_seconds", "Time from queueing to a worker",
                       buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("flaircad_inferences_in_flight", "Analyses running now",
                  multiprocess_mode="livesum")
SERIES_ARRIVING = Gauge(
    "flaircad_series_in_stability_window",
    "Series still receiving instances (inside the stability window); with several processes "
    "a series that reached two of them counts twice", multiprocess_mode="livesum")
DRAINING = Gauge("flaircad_draining", "1 while the process drains on SIGTERM",
                 multiprocess_mode="livemax")


# -- collectors computed at scrape time ---------------------------------------------------------
class SpoolCollector(Collector):
    """``flaircad_spool_bytes{area}`` and ``flaircad_spool_free_bytes``.

    Walking the spool costs one ``stat`` per file, so the walk runs at most once every
    ``min_interval_s`` and scrapes in between get the last figures."""

    AREAS = ("incoming", "uploads", "results", "database", "other")

    def __init__(self, root: Path, min_interval_s: float = 15.0) -> None:
        self.root = root
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._scanned_at = -float("inf")
        self._sizes: dict[str, int] = dict.fromkeys(self.AREAS, 0)

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("flaircad_spool_bytes", "", labels=["area"])
        yield GaugeMetricFamily("flaircad_spool_free_bytes", "")

    def _scan(self) -> dict[str, int]:
        sizes = dict.fromkeys(self.AREAS, 0)
        for entry in _walk(self.root):
            relative = Path(entry).relative_to(self.root).parts
            if relative[0] in ("incoming", "uploads", "results"):
                area = relative[0]
            elif relative[0].startswith(DATABASE):  # and its -wal, -shm
                area = "database"
            else:
                area = "other"
            with contextlib.suppress(OSError):  # gone between listing and stat: fine
                sizes[area] += entry.stat(follow_symlinks=False).st_size
        return sizes

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._scanned_at >= self.min_interval_s:
                self._sizes = self._scan()
                self._scanned_at = time.monotonic()
            sizes = dict(self._sizes)
        used = GaugeMetricFamily("flaircad_spool_bytes",
                                 "Bytes of files in the spool, by area", labels=["area"])
        for area, size in sizes.items():
            used.add_metric([area], size)
        yield used
        with contextlib.suppress(OSError):
            yield GaugeMetricFamily("flaircad_spool_free_bytes",
                                    "Free bytes on the spool's file system",
                                    value=shutil.disk_usage(self.root).free)


def _walk(root: Path) -> Iterator[os.DirEntry[str]]:
    stack = [str(root)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry


class GpuCollector(Collector):
    """Memory and utilisation of the GPU onnxruntime's CUDA provider runs on, from NVML
    (``nvidia-ml-py``, the optional ``gpu`` extra). :meth:`create` returns ``None`` where that
    cannot work (no CUDA provider, no NVML, no GPU), and then nothing is exported."""

    NAMES = ("flaircad_gpu_memory_used_bytes", "flaircad_gpu_memory_total_bytes",
             "flaircad_gpu_utilization_ratio")

    def __init__(self, nvml: Any, handle: Any, index: str, uuid: str) -> None:
        self._nvml, self._handle, self._labels = nvml, handle, [index, uuid]

    @classmethod
    def create(cls, provider: str, device_id: int = 0) -> GpuCollector | None:
        if provider != "CUDAExecutionProvider":
            return None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            handle, index = _nvml_device(pynvml, device_id)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except Exception as error:  # ImportError, NVMLError_*, odd CUDA_VISIBLE_DEVICES
            log.info("no GPU metrics: %s", type(error).__name__)
            return None
        return cls(pynvml, handle, index, uuid)

    def describe(self) -> Iterable[Metric]:
        for name in self.NAMES:
            yield GaugeMetricFamily(name, "", labels=["gpu", "uuid"])

    def collect(self) -> Iterable[Metric]:
        labels = ["gpu", "uuid"]
        try:  # a GPU that falls off the bus must not take /metrics with it
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception as error:
            log.warning("NVML query failed: %s", type(error).__name__)
            return
        for name, documentation, value in (
            (self.NAMES[0], "GPU memory in use (all processes)", memory.used),
            (self.NAMES[1], "GPU memory in all", memory.total),
            (self.NAMES[2], "GPU busy fraction over the last sample period",
             utilization.gpu / 100.0),
        ):
            family = GaugeMetricFamily(name, documentation, labels=labels)
            family.add_metric(self._labels, float(value))
            yield family


def _nvml_device(nvml: Any, device_id: int) -> tuple[Any, str]:
    """NVML handle and index of CUDA device ``device_id``: NVML numbers every GPU of the host,
    CUDA only those in CUDA_VISIBLE_DEVICES (indices or UUIDs)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(device_id), str(device_id)
    chosen = visible[device_id]
    if chosen.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(chosen)), chosen
    handle = nvml.nvmlDeviceGetHandleByUUID(chosen)
    return handle, str(nvml.nvmlDeviceGetIndex(handle))


# -- exposition ---------------------------------------------------------------------------------
def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


class _DefaultRegistry(Collector):
    """The process-global registry (our metrics, process_* and python_*), as one collector."""

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()


def exposition(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition for ``/metrics``: this process's metrics, or every process's in
    multiprocess mode (process_* and python_* are per process and then left out), plus
    ``extra`` collectors."""
    registry = CollectorRegistry()
    if multiprocess_dir() is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def forget_dead_processes() -> list[int]:
    """Multiprocess mode: drop the live-gauge files of processes that are gone without saying
    so (killed, crashed), as ``mark_process_dead`` would have; returns their pids."""
    folder = multiprocess_dir()
    if folder is None or not folder.is_dir():
        return []
    from prometheus_client import multiprocess

    dead = []
    for path in folder.iterdir():
        match = _LIVE_GAUGE_FILE.match(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.append(pid)
        except PermissionError:  # alive, someone else's
            pass
    for pid in sorted(set(dead)):
        multiprocess.mark_process_dead(pid, str(folder))
    return sorted(set(dead))


def mark_this_process_dead() -> None:
    folder = multiprocess_dir()
    if folder is not None and folder.is_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(folder))
