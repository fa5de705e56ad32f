"""Size limits on what one series may cost: checked on headers, before any pixel is decoded.

The pixel data of a DICOM instance may be compressed (JPEG 2000, RLE, deflate), so its size on
the wire says little about the memory its decoded volume takes: a few kilobytes of RLE can
declare a 65535 × 65535 matrix. The limits are therefore on what the headers declare:

* ``max_matrix``: Rows and Columns, each;
* ``max_series_bytes``: the decoded size, Rows × Columns × frames × samples × bytes per
  sample, summed over the instances of one series (the float32 volume built from it takes up
  to twice that for 16-bit data);
* ``max_instances_per_series``: instances (files) in one series.

STOW-RS and C-STORE refuse a single instance that breaks the first two on arrival
(:func:`instance_refusal`); the series totals are checked again when the series is analysed
(:func:`series_refusal`), because a series can arrive over many requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MATRIX_TOO_LARGE = "matrix_too_large"
SERIES_TOO_LARGE = "series_too_large"
TOO_MANY_INSTANCES = "too_many_instances"


@dataclass(frozen=True)
class Limits:
    max_matrix: int = 2048
    max_series_bytes: int = 1024**3
    max_instances_per_series: int = 5000

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.max_matrix, settings.max_series_bytes,
                   settings.max_instances_per_series)


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
    return None


def series_refusal(datasets: Iterable[Any], limits: Limits) -> tuple[str, str] | None:
    """``(code, message)`` when a series breaks a limit, else None."""
    count, total = 0, 0
    for ds in datasets:
        refused = instance_refusal(ds, limits)
        if refused is not None:
            return refused
        count += 1
        total += decoded_bytes(ds)
    if count > limits.max_instances_per_series:
        return TOO_MANY_INSTANCES, (f"{count} instances exceed "
                                    f"{limits.max_instances_per_series} "
                                    "(FLAIRCAD_MAX_INSTANCES_PER_SERIES)")
    if total > limits.max_series_bytes:
        return SERIES_TOO_LARGE, (f"decoded size {total} bytes exceeds "
                                  f"{limits.max_series_bytes} (FLAIRCAD_MAX_SERIES_BYTES)")
    return None
