"""DICOM series → 3D volume: flaircad (service.core.volume) vs dcm2niix, on the same files.

    .venv/bin/python bench/volume_speed.py [--runs 7] [--samples ../shared/dicom-samples]

What is timed, median of ``--runs`` after one warm-up each:
  - ours: ``service.core.volume.load_folder(folder)`` in this process: read every file, group,
    check, sort, decode, rescale to float32, affine. Python start-up and imports not counted.
  - dcm2niix: the ``dcm2niix -z n -b n`` subprocess, wall clock, writing an *uncompressed*
    NIfTI into a temporary folder (``-z n``: gzip would only slow it down). Its process start
    and its NIfTI write are inside its time; ours writes nothing.
The ratio is ours / dcm2niix (goal ≤ 1.0).

Series: phantom FLAIR series written by service.phantoms (axial 30 slices 256², sagittal
200 slices 200²), uncompressed and JPEG-LS lossless (axial also JPEG 2000 lossless), and the
real Siemens XA30 MPRAGE in JPEG Lossless SV1 (96 slices 128², and its first 30). pydicom
cannot *write* JPEG Lossless SV1, so that codec is only benchmarked on the real sample;
Debian's dcm2niix cannot read the sample's fragmented frames, so the benchmark joins each
frame's fragments into one (same bitstream) in a temporary copy that both tools read.
Debian's dcm2niix has no JPEG-LS decoder: no ratio there.

Memory, per series, in a fresh subprocess: (a) tracemalloc's peak during ``load_folder`` (every
allocation through Python's allocators, numpy buffers and pydicom's bytes included; not the
C libraries' private buffers) and (b) the peak RSS during the call minus the RSS before it (Linux:
VmHWM reset through /proc/self/clear_refs), which also counts those, in a run of its own
(tracemalloc's bookkeeping would inflate it). RSS also holds memory the allocator has not
returned, so it is the pessimistic figure. Both are divided by the decoded voxel data: the
float32 volume returned (slices × rows × columns × 4 bytes). Goal ≤ 3. (dcm2niix's memory is
not reported: a child's ru_maxrss on Linux includes the parent's pages from before its exec.)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from service.core.volume import load_folder

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up (page cache, lazy imports)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def ours(folder: Path) -> tuple[int, ...]:
    outcomes, _ = load_folder(folder)
    (outcome,) = outcomes
    if outcome.volume is None:
        raise RuntimeError(f"{folder}: {outcome.rejection}")
    return tuple(outcome.volume.array.shape)


def run_dcm2niix(binary: str, folder: Path, out: Path) -> bool:
    """One conversion; True when dcm2niix wrote the NIfTI."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run([binary, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return (out / "out.nii").is_file()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(folder: Path) -> dict[str, float | str]:
    """Run in a fresh interpreter (``--memory FOLDER``)."""
    from service.core.volume import load_sources

    # imports and codecs loaded, as in a running service, before anything is measured
    load_sources(sorted(folder.iterdir())[:2])
    import gc

    gc.collect()
    try:
        # Linux: writing 5 resets the peak-RSS mark (VmHWM) to the current RSS, so the peak
        # read afterwards belongs to this call alone.
        Path("/proc/self/clear_refs").write_text("5")
        rss_before, method = _status_kib("VmRSS"), "VmHWM after clear_refs"
    except OSError:
        rss_before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    shape = ours(folder)
    rss_peak = (_status_kib("VmHWM") if method.startswith("VmHWM")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    gc.collect()
    tracemalloc.start()  # a second run: tracemalloc's bookkeeping would inflate the RSS one
    ours(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    voxel_bytes = 4 * shape[0] * shape[1] * shape[2]
    return {"voxel_mib": voxel_bytes / 2**20, "tracemalloc_peak_x": peak / voxel_bytes,
            "rss_growth_x": (rss_peak - rss_before) * 1024 / voxel_bytes, "rss_method": method}


def defragment(source: Path, target: Path, first: int | None = None) -> Path:
    """Copy a JPEG Lossless series with each frame's fragments joined into one fragment."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    target.mkdir(parents=True, exist_ok=True)
    paths = sorted(source.iterdir())
    datasets = [pydicom.dcmread(p) for p in paths]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    for ds in datasets[:first]:
        frames = list(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate(frames)
        ds.save_as(target / f"{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)
    return target


def cases(workdir: Path, samples: Path) -> list[tuple[str, Path]]:
    from service.phantoms import write_dicom_series

    found = []
    names = {None: "uncompressed", "jpegls": "JPEG-LS", "jpeg2000": "JPEG 2000"}
    for variant, slices, codecs in (("axial", 30, (None, "jpegls", "jpeg2000")),
                                    ("sagittal", 200, (None, "jpegls"))):
        for compress in codecs:
            folder = workdir / f"{variant}-{compress}"
            write_dicom_series("MS", 7, folder, variant=variant, slices=slices, compress=compress)
            found.append((f"phantom {variant} {slices} sl, {names[compress]}", folder))
    jpeg = samples / "siemens_xa30_t1w_mprage_jpeglossless" / "dicom"
    if jpeg.is_dir():
        found.append(("XA30 MPRAGE 30 sl, JPEG Lossless SV1",
                      defragment(jpeg, workdir / "xa30-30", first=30)))
        found.append(("XA30 MPRAGE 96 sl, JPEG Lossless SV1",
                      defragment(jpeg, workdir / "xa30-96")))
        found.append(("XA30 MPRAGE 96 sl, JPEG Lossless SV1, fragmented (original)", jpeg))
    else:
        print(f"{samples} absent: no JPEG Lossless SV1 series", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "dicom-samples")
    parser.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory is not None:
        print(json.dumps(measure_memory(args.memory)))
        return 0
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    binary = shutil.which("dcm2niix")
    if binary is None:
        print("dcm2niix not on PATH: only our times are measured", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, folder in cases(workdir, args.samples):
            shape = ours(folder)
            result: dict[str, object] = {"series": name, "shape": list(shape),
                                         "ours_ms": median_ms(lambda f=folder: ours(f), args.runs)}
            if binary is not None:
                out = workdir / "dcm2niix-out"
                if run_dcm2niix(binary, folder, out):
                    result["dcm2niix_ms"] = median_ms(
                        lambda f=folder, o=out: run_dcm2niix(binary, f, o), args.runs)
                    result["ratio_ours_over_dcm2niix"] = (
                        float(result["ours_ms"]) / float(result["dcm2niix_ms"]))  # type: ignore[arg-type]
                else:
                    result["dcm2niix_ms"] = None
                    result["dcm2niix_note"] = "dcm2niix could not convert this series"
            memory = subprocess.run([sys.executable, __file__, "--memory", str(folder)],
                                    capture_output=True, text=True, check=True)
            result.update(json.loads(memory.stdout))
            result["runs"] = args.runs
            print(json.dumps(result), flush=True)
            ratio = result.get("ratio_ours_over_dcm2niix")
            print(f"{name}: ours {result['ours_ms']:.1f} ms, dcm2niix "
                  + (f"{result['dcm2niix_ms']:.1f} ms → ratio {ratio:.2f}"
                     if ratio is not None else "n/a")
                  + f"; memory peak {result['tracemalloc_peak_x']:.2f}× (tracemalloc), "
                  f"{result['rss_growth_x']:.2f}× (RSS growth) of "
                  f"{result['voxel_mib']:.1f} MiB voxels", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
