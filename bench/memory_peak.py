"""Peak memory of one whole analysis, per decoded voxel: what ``service.core.limits`` admits by.

    .venv/bin/python bench/memory_peak.py [--shapes 24x256,60x1024,60x2048,sag200x512]

Each shape (``SLICESxMATRIX``; ``sag`` = the sagittal phantom, 200 slices) is written once as
an uncompressed 16-bit MR FLAIR series (the axial or sagittal phantom of
``service.phantoms``, its slices resized to the matrix, pixel spacing scaled to keep the
field of view). Uncompressed is the worst case: the series' pixel bytes are held while the
volume is built, where RLE would hold a few MiB; after the decode the pipeline is the same.

Each analysis runs in a fresh interpreter (``--child FOLDER``): the bundled model loaded and
one small analysis run first (imports, codecs, onnxruntime arenas: what a running service
already holds), then the peak-RSS mark reset (Linux ``/proc/self/clear_refs`` = 5) and
:func:`service.pipeline.analysis.analyse` run on the series
 with the outputs written as the scheduler
writes them. Reported: RSS before, peak RSS growth (VmHWM − RSS before), and that growth per
voxel (slices × rows × columns) and per decoded byte (2 per voxel for 16-bit data). A line
fitted through the shapes gives ``growth ≈ base + k × voxels``, the constants of
:data:`service.core.limits.ANALYSIS_BASE_BYTES` and
:data:`service.core.limits.ANALYSIS_BYTES_PER_VOXEL`.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = "24x256,60x1024,60x2048,sag200x512"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_series(folder: Path, slices: int, matrix: int, *, sagittal: bool = False) -> Path:
    """A phantom FLAIR series of ``slices`` slices of ``matrix``² 16-bit pixels."""
    import cv2
    import numpy as np
    import pydicom

    from service.phantoms import write_dicom_series

    variant = "sagittal" if sagittal else "axial"
    paths = write_dicom_series("MS", 1, folder, variant=variant, slices=slices)
    for path in paths:
        ds = pydicom.dcmread(path)
        rows, columns = int(ds.Rows), int(ds.Columns)
        if (rows, columns) != (matrix, matrix):
            pixels = cv2.resize(ds.pixel_array, (matrix, matrix), interpolation=cv2.INTER_LINEAR)
            ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
            ds.Rows = ds.Columns = matrix
            ds.PixelSpacing = [f"{float(ds.PixelSpacing[0]) * rows / matrix:.6g}",
                               f"{float(ds.PixelSpacing[1]) * columns / matrix:.6g}"]
            ds.save_as(path, enforce_file_format=True)
    return folder


def child(folder: Path, warm: Path) -> dict[str, Any]:
    """One analysis of ``folder`` in this (fresh) interpreter, after a warm-up on ``warm``."""
    from service.core.config import BUNDLED_MODEL
    from service.core.limits import decoded_bytes
    from service.core.reading import iter_folder
    from service.pipeline.analysis import analyse
    from service.pipeline.engine import Engine
    from service.storage.results import write_outputs

    engine = Engine(BUNDLED_MODEL, ["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as out:
        write_outputs(analyse(iter_folder(warm), engine), out)
    files = sorted(iter_folder(folder))
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    voxels = int(first.Rows) * int(first.Columns) * len(files)
    decoded = sum(decoded_bytes(pydicom.dcmread(f, stop_before_pixels=True)) for f in files)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        analysis = analyse(files, engine)
        write_outputs(analysis, out)
        timings = analysis.timings_ms
        del analysis
    peak = _status_kib("VmHWM")
    growth = (peak - before) * 1024
    return {"voxels": voxels, "decoded_bytes": decoded, "rss_before_mib": before / 1024,
            "peak_growth_mib": growth / 2**20, "per_voxel": growth / voxels,
            "per_decoded_byte": growth / decoded, "timings_ms": timings}


def measure(folder: Path, warm: Path) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter."""
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), "--warm", str(warm)],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _shape(text: str) -> tuple[int, int, bool]:
    sagittal = text.startswith("sag")
    slices, matrix = text.removeprefix("sag").split("x")
    return int(slices), int(matrix), sagittal


def fit(results: list[dict[str, Any]]) -> tuple[float, float]:
    """Least squares ``growth = base + k × voxels``: (base bytes, k bytes per voxel)."""
    import numpy as np

    x = np.array([r["voxels"] for r in results], dtype=np.float64)
    y = np.array([r["peak_growth_mib"] * 2**20 for r in results], dtype=np.float64)
    if len(x) < 2:
        return 0.0, float(y[0] / x[0])
    k, base = np.polyfit(x, y, 1)
    return float(base), float(k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--child", type=Path)
    parser.add_argument("--warm", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.warm)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = write_series(Path(tmp) / "warm", 6, 256)
        for text in args.shapes.split(","):
            slices, matrix, sagittal = _shape(text)
            folder = write_series(Path(tmp) / text, slices, matrix, sagittal=sagittal)
            result = {"shape": text, **measure(folder, warm)}
            results.append(result)
            print(json.dumps(result), flush=True)
    base, k = fit(results)
    print(json.dumps({"fit_base_mib": base / 2**20, "fit_bytes_per_voxel": k}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
