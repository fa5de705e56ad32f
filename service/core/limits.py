"""Size limits on what one series may cost: checked on headers, before any pixel is decoded.

The pixel data of a DICOM instance may be compressed (JPEG 2000, RLE, deflate), so its size on
the wire says little about the memory its decoded volume takes: a few kilobytes of RLE can
declare a 65535 × 65535 matrix. The limits are therefore on what the headers declare:

* ``max_matrix``: Rows and Columns, each;
* ``max_series_bytes``: the decoded size, Rows × Columns × frames × samples × bytes per
  sample, summed over the instances of one series (the float32 volume built from it takes up
  to twice that for 16-bit data);
* ``max_instances_per_series``: instances (files) in one series;
* ``analysis_memory_bytes``: what one analysis may add to its process's memory. The decoded
  size is not that memory: the float32 volume, the CAM mapped back onto it, the 8-bit window,
  the RGB overlays and their encoded Secondary Captures each cost bytes per *voxel*,
  whatever the bits per sample. :func:`estimated_peak_bytes` is the measured peak RSS growth
  of a whole analysis (``bench/memory_peak.py``), ``ANALYSIS_BASE_BYTES +
  ANALYSIS_BYTES_PER_VOXEL × voxels``; a series whose estimate exceeds the budget is refused
  like one beyond ``max_series_bytes`` (``series_too_large``), before any pixel is decoded,
  instead of taking the process past its memory limit (killed, restarted, the analysis resumed:
  a crash loop).

STOW-RS and C-STORE refuse a single instance that breaks the matrix, decoded-size or memory
limit on arrival (:func:`instance_refusal`); the series totals are checked again when the
series is analysed (:func:`series_refusal`), because a series can arrive over many requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from service.core.codes import Code

# the refusal codes (service.core.codes), under the names callers and tests know
MATRIX_TOO_LARGE = Code.MATRIX_TOO_LARGE
SERIES_TOO_LARGE = Code.SERIES_TOO_LARGE
TOO_MANY_INSTANCES = Code.TOO_MANY_INSTANCES

# Peak RSS growth of one analysis ≈ ANALYSIS_BASE_BYTES + ANALYSIS_BYTES_PER_VOXEL × voxels
# (bench/memory_peak.py, fresh process, model loaded and warmed, uncompressed 16-bit input).
# Measured: 13.0-13.9 bytes a voxel over 40 × 1024², 60 × 1024², 60 × 2048² and a sagittal
# 200 × 512² (23-24 before the copies were cut; 60 × 2048²: +3,110 MiB, was +5,589 MiB), a line
# fit of 27 MiB + 12.8 bytes a voxel: the float32 volume (4) and
# its intensity-scaled copy (4) with the resize's temporaries while preprocessing; the volume
# (4), the CAM on the source grid (4), the 8-bit window (1) and the RGB overlays (3) while
# rendering. The constants round that up by ~15 %, so that the estimate is not optimistic
# (tests/integration/test_memory_limits.py measures it); the base covers the model run and
# the outputs' fixed costs (a 24 × 256² series grows RSS by ~41 MiB). The Parametric Map
# (issue 15) added ~4.5 bytes a voxel: the CAM kept while highdicom builds the float pixel
# data and Part 10 encodes it (40 × 1024²: +766 MiB, 17.5 bytes a voxel above the base), so
# the constant went from 16 to 20.
ANALYSIS_BYTES_PER_VOXEL = 20
ANALYSIS_BASE_BYTES = 64 * 1024**2
# FLAIRCAD_ANALYSIS_MEMORY_BYTES, the default: sized for the shipped pod (k8s/base, 4 GiB
# memory limit, FLAIRCAD_WORKERS=1, FLAIRCAD_HTTP_WORKERS=1): 4096 MiB − ~400 MiB the
# process holds before any analysis (the server measured 376 MiB with the model loaded) −
# ~1.1 GiB headroom (uploads and STOW bodies being parsed, WADO responses, allocator
# fragmentation) = 2.5 GiB for the analyses of the pod, shared by workers × http_workers. One
# analysis of 2.5 GiB admits (2560 − 64) MiB / 20 ≈ 131 M voxels: 2048² × 31 slices, 1024² ×
# 124, 512² × 499 (16-bit: ~250 MiB decoded).
DEFAULT_ANALYSIS_MEMORY_BYTES = 2560 * 1024**2


class LimitSettings(Protocol):
    """What :meth:`Limits.of` reads of :class:`service.core.config.Settings` (a Protocol:
    config imports this module for its defaults). ``analysis_memory_bytes``, ``workers`` and
    ``http_workers`` are read when present."""

    max_matrix: int
    max_series_bytes: int
    max_instances_per_series: int


@dataclass(frozen=True)
class Limits:
    max_matrix: int = 2048
    max_series_bytes: int = 1024**3
    max_instances_per_series: int = 5000
    # what one analysis may add to the process's RSS; None: not checked
    analysis_memory_bytes: int | None = DEFAULT_ANALYSIS_MEMORY_BYTES

    @classmethod
    def of(cls, settings: LimitSettings) -> Limits:
        """The limits ``settings`` set; the analyses' memory budget is shared by every
        analysis that can run at once (``workers`` threads in each of ``http_workers``)."""
        budget = getattr(settings, "analysis_memory_bytes", DEFAULT_ANALYSIS_MEMORY_BYTES)
        concurrent = (max(1, int(getattr(settings, "workers", 1)))
                      * max(1, int(getattr(settings, "http_workers", 1))))
        return cls(settings.max_matrix, settings.max_series_bytes,
                   settings.max_instances_per_series,
                   int(budget) // concurrent if budget else None)  # 0 or None: unchecked


def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def decoded_bytes(ds: Any) -> int:
    """What the instance's pixels take once decoded, as its header declares them."""
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = max(1, _int(ds, "NumberOfFrames", 1))
    samples = max(1, _int(ds, "SamplesPerPixel", 1))
    bits = max(1, _int(ds, "BitsAllocated", 16))
    return rows * columns * frames * samples * math.ceil(bits / 8)


def voxels(ds: Any) -> int:
    """The samples the instance's header declares (Rows × Columns × frames × samples): what
    an analysis' memory grows with, whatever the bits per sample."""
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = max(1, _int(ds, "NumberOfFrames", 1))
    return rows * columns * frames * max(1, _int(ds, "SamplesPerPixel", 1))


def estimated_peak_bytes(n_voxels: int) -> int:
    """What an analysis of ``n_voxels`` adds to its process's RSS at its peak (measured:
    see :data:`ANALYSIS_BYTES_PER_VOXEL`)."""
    return ANALYSIS_BASE_BYTES + ANALYSIS_BYTES_PER_VOXEL * n_voxels


def _memory_refusal(n_voxels: int, limits: Limits) -> tuple[str, str] | None:
    budget = limits.analysis_memory_bytes
    if budget is None or estimated_peak_bytes(n_voxels) <= budget:
        return None
    return SERIES_TOO_LARGE, (
        f"{n_voxels} voxels need an estimated {estimated_peak_bytes(n_voxels) // 2**20} MiB "
        f"to analyse, over the {budget // 2**20} MiB one analysis may take "
        "(FLAIRCAD_ANALYSIS_MEMORY_BYTES shared by FLAIRCAD_WORKERS x FLAIRCAD_HTTP_WORKERS)")


def instance_refusal(ds: Any, limits: Limits) -> tuple[str, str] | None:
    """``(code, message)`` when one instance alone breaks a limit, else None."""
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows > limits.max_matrix or columns > limits.max_matrix:
        return MATRIX_TOO_LARGE, (f"matrix {rows} x {columns} exceeds {limits.max_matrix} "
                                  "(FLAIRCAD_MAX_MATRIX)")
    size = decoded_bytes(ds)
    if size > limits.max_series_bytes:
        return SERIES_TOO_LARGE, (f"decoded size {size} bytes exceeds "
                                  f"{limits.max_series_bytes} (FLAIRCAD_MAX_SERIES_BYTES)")
    return _memory_refusal(voxels(ds), limits)


def series_refusal(datasets: Iterable[Any], limits: Limits) -> tuple[str, str] | None:
    """``(code, message)`` when a series breaks a limit, else None."""
    count, total, n_voxels = 0, 0, 0
    for ds in datasets:
        refused = instance_refusal(ds, limits)
        if refused is not None:
            return refused
        count += 1
        total += decoded_bytes(ds)
        n_voxels += voxels(ds)
    if count > limits.max_instances_per_series:
        return TOO_MANY_INSTANCES, (f"{count} instances exceed "
                                    f"{limits.max_instances_per_series} "
                                    "(FLAIRCAD_MAX_INSTANCES_PER_SERIES)")
    if total > limits.max_series_bytes:
        return SERIES_TOO_LARGE, (f"decoded size {total} bytes exceeds "
                                  f"{limits.max_series_bytes} (FLAIRCAD_MAX_SERIES_BYTES)")
    return _memory_refusal(n_voxels, limits)
