"""The series limit means memory (issue 13, item 4): a 60 × 2048² 16-bit series, half the
decoded-size limit, took a server from 376 to 5,413 MiB RSS, past the 4 GiB pod limit. The
admission estimate (service.core.limits.estimated_peak_bytes) refuses it under the default budget,
and the estimate is checked against a measured analysis so that it cannot be optimistic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset

from service.core.config import Settings
from service.core.limits import (
    ANALYSIS_BYTES_PER_VOXEL,
    DEFAULT_ANALYSIS_MEMORY_BYTES,
    SERIES_TOO_LARGE,
    Limits,
    estimated_peak_bytes,
    instance_refusal,
    series_refusal,
)
from service.core.reading import iter_folder
from service.pipeline.analysis import AnalysisRejected, analyse
from tests.conftest import PhantomFactory

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
# What the server process holds before any analysis (issue 13 measured 376 MiB), and what the
# pod needs besides the analyses (request bodies, responses, allocator slack).
BASE_RSS = 400 * MiB
HEADROOM = 1024 * MiB


def _settings(**overrides: Any) -> SimpleNamespace:
    defaults = {name: field.default for name, field in Settings.model_fields.items()
                if name in ("max_matrix", "max_series_bytes", "max_instances_per_series",
                            "analysis_memory_bytes", "workers", "http_workers")}
    return SimpleNamespace(**{**defaults, **overrides})


def _header(rows: int, columns: int, frames: int | None = None, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = rows, columns, bits, 1
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def test_the_issues_series_is_refused_under_the_default_budget() -> None:
    series = [_header(2048, 2048) for _ in range(60)]  # 480 MiB decoded, 251 M voxels
    limits = Limits.of(_settings())
    assert limits.analysis_memory_bytes == DEFAULT_ANALYSIS_MEMORY_BYTES
    # within the decoded-size limit: what the old limits alone let through
    assert series_refusal(series, Limits(analysis_memory_bytes=None)) is None
    assert estimated_peak_bytes(60 * 2048**2) > DEFAULT_ANALYSIS_MEMORY_BYTES
    refused = series_refusal(series, limits)
    assert refused is not None and refused[0] == SERIES_TOO_LARGE
    assert "FLAIRCAD_ANALYSIS_MEMORY_BYTES" in refused[1]


def test_a_normal_series_is_admitted() -> None:
    assert series_refusal([_header(256, 256) for _ in range(24)], Limits.of(_settings())) is None
    assert series_refusal([_header(512, 512) for _ in range(200)], Limits.of(_settings())) is None


def test_one_multiframe_instance_is_refused_on_arrival() -> None:
    refused = instance_refusal(_header(2048, 2048, frames=60), Limits.of(_settings()))
    assert refused is not None and refused[0] == SERIES_TOO_LARGE


def test_concurrent_analyses_share_the_budget() -> None:
    series = [_header(1024, 1024) for _ in range(60)]  # 63 M voxels: ~1 GiB estimated
    assert series_refusal(series, Limits.of(_settings(workers=1))) is None
    for shared in ({"workers": 4}, {"http_workers": 2, "workers": 2}):
        refused = series_refusal(series, Limits.of(_settings(**shared)))
        assert refused is not None and refused[0] == SERIES_TOO_LARGE
    assert Limits.of(_settings(analysis_memory_bytes=0)).analysis_memory_bytes is None


def test_the_memory_is_counted_per_voxel_not_per_decoded_byte() -> None:
    # 8-bit data decodes to half the bytes but builds the same float32 volume and overlays
    eight = [_header(2048, 2048, bits=8) for _ in range(60)]
    refused = series_refusal(eight, Limits.of(_settings()))
    assert refused is not None and refused[0] == SERIES_TOO_LARGE


def _quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", text.strip().strip('"')).groups()  # type: ignore[union-attr]
    return int(number) * (MiB if unit == "Mi" else 1024 * MiB)


def test_the_default_fits_the_shipped_pod_with_headroom() -> None:
    deployment = (ROOT / "k8s/base/deployment.yaml").read_text()
    limit = _quantity(re.search(r"limits:\s*\n(?:\s+\S+: .*\n)*?\s+memory: (\S+)",
                                deployment).group(1))  # type: ignore[union-attr]
    budget = int(re.search(r"name: FLAIRCAD_ANALYSIS_MEMORY_BYTES\s*\n\s*value: \"?(\d+)",
                           deployment).group(1))  # type: ignore[union-attr]
    assert budget == DEFAULT_ANALYSIS_MEMORY_BYTES
    assert BASE_RSS + budget + HEADROOM <= limit


def test_analyse_refuses_before_decoding(phantom_series: PhantomFactory) -> None:
    folder = phantom_series(slices=6)
    tiny = Limits(analysis_memory_bytes=estimated_peak_bytes(6 * 256 * 256) - 1)
    with pytest.raises(AnalysisRejected) as refused:
        analyse(iter_folder(folder), engine=None, limits=tiny)  # type: ignore[arg-type]
    assert refused.value.code == SERIES_TOO_LARGE


@pytest.mark.slow
def test_a_measured_analysis_stays_within_its_estimate(tmp_path: Path) -> None:
    """A 40 × 1024² series through the whole pipeline, in a fresh interpreter: its peak RSS
    growth must not exceed what admission estimated (fails if ANALYSIS_BYTES_PER_VOXEL were
    set below the ~14 bytes a voxel measured)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import memory_peak
    finally:
        sys.path.remove(str(ROOT / "bench"))
    series = memory_peak.write_series(tmp_path / "series", 40, 1024)
    warm = memory_peak.write_series(tmp_path / "warm", 6, 256)
    done = subprocess.run([sys.executable, str(ROOT / "bench/memory_peak.py"), "--child",
                           str(series), "--warm", str(warm)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["voxels"] == 40 * 1024**2
    growth = measured["peak_growth_mib"] * MiB
    estimate = estimated_peak_bytes(measured["voxels"])
    assert growth <= estimate, (growth / MiB, estimate / MiB)
    # the measurement saw the analysis (not a peak mark that failed to reset)
    assert growth >= 0.5 * ANALYSIS_BYTES_PER_VOXEL * measured["voxels"], (growth / MiB,
                                                                            estimate / MiB)
