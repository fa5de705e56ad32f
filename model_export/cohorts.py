"""The evaluation's inputs and how one of them is scored through the service's own code path.

A phantom job is written as real DICOM (``service.phantoms.write_dicom_series``) into a
temporary folder, read back by the service's volume builder, preprocessed with the model's own
metadata and run by :class:`service.pipeline.engine.Engine`; every map is brought back to the
source grid
with :func:`service.pipeline.overlay.cam_to_source` and scored there against the phantom's truth. A
real
job reads a scanner series the same way, or one time point of a NIfTI when the volume builder
rejects the series (4D, mosaic).
"""

from __future__ import annotations

import inspect
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from model_export import seeds
from model_export.data import load_nifti
from model_export.scoring import dilate_lesions, map_stats
from service import phantoms
from service.core.contract import EXPLANATIONS, Output
from service.core.preprocess import preprocess
from service.pipeline.engine import Engine
from service.pipeline.overlay import cam_to_source

if TYPE_CHECKING:
    from service.core.volume import SeriesVolume

MAPS: tuple[str, ...] = tuple(EXPLANATIONS)  # hirescam, gradcam, attention
RADIUS_MM = 7.5
EDGE_PX = 4
# NIfTI stores RAS; DICOM and the service's affines are LPS (as model_export.data.load_volume).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Cohort:
    """One block of evaluation phantoms; ``index`` fixes its seed block for good."""

    name: str
    index: int
    n: int
    kind: str  # "classification" | "must_flag" | "no_goal"
    description: str
    variant: str = "axial"
    slices: int | None = None  # None: 20–30 drawn per series for axial (as training), else default
    compress: tuple[str, ...] = ()  # rotated over the series
    shift: dict[str, Any] = field(default_factory=dict)
    matrix: int | None = None
    pixel_mm: float | None = None
    slice_thickness_mm: float | None = None

    def seed(self, i: int) -> int:
        return seeds.evaluation_seed(self.index, i)

    def acquisition(self) -> dict[str, Any]:
        slices: Any = self.slices
        if slices is None:
            slices = "20–30 (drawn per series, as in training)" if self.variant == "axial" \
                else "variant default"
        return {"variant": self.variant, "slices": slices, "compress": list(self.compress),
                "shift": dict(self.shift), "matrix": self.matrix, "pixel_mm": self.pixel_mm,
                "slice_thickness_mm": self.slice_thickness_mm}


_SHIFTED = 40
COHORTS: tuple[Cohort, ...] = (
    Cohort("test", 0, 200, "classification",
           "held-out axial phantoms, 20–30 × 5 mm slices (the training distribution)"),
    Cohort("noise", 1, _SHIFTED, "classification", "noise ×2", shift={"noise_scale": 2.0}),
    Cohort("fat", 2, _SHIFTED, "classification", "fat ×1.25", shift={"fat_scale": 1.25}),
    Cohort("thin", 3, _SHIFTED, "classification", "3 mm × 40 axial slices", slices=40,
           slice_thickness_mm=3.0),
    Cohort("fov288", 4, _SHIFTED, "classification", "288² matrix, 230 mm field of view",
           matrix=288, pixel_mm=230.0 / 288.0),
    Cohort("oblique", 5, _SHIFTED, "classification", "oblique axial (10–20° tilt)",
           variant="oblique"),
    Cohort("sagittal", 6, _SHIFTED, "classification", "3D sagittal, 152 × 1.2 mm",
           variant="sagittal"),
    Cohort("compressed", 7, _SHIFTED, "classification", "JPEG-LS / JPEG 2000 / RLE lossless",
           compress=("jpegls", "jpeg2000", "rle")),
    Cohort("mass", 8, 40, "must_flag", "one large mass instead of WM lesions",
           shift={"lesions": "mass"}),
    Cohort("t1", 9, 40, "must_flag", "T1-weighted contrast under a FLAIR header",
           shift={"contrast": "t1"}),
    Cohort("lesion_free", 10, 40, "no_goal", "no lesions (outside the intended use)",
           shift={"lesions": "none"}),
)
BY_NAME = {c.name: c for c in COHORTS}


@dataclass(frozen=True)
class Job:
    """One input: a phantom (cohort, i) or a real source (path, time point)."""

    cohort: str
    i: int = 0
    source: str | None = None  # real inputs: a DICOM folder or a NIfTI file
    time_index: int | None = None  # NIfTI time point (4D), None for a 3D input
    group: str | None = None  # real inputs: the sample folder they come from
    cost: float = 1.0  # rough relative seconds, to start the long jobs first

    @property
    def label(self) -> str | None:
        return None if self.source is not None else phantoms.CLASS_NAMES[self.i % 2]


def phantom_jobs(cohort: Cohort, n: int | None = None) -> list[Job]:
    cost = {"sagittal": 6.0, "oblique": 1.2}.get(cohort.variant, 1.0)
    cost *= (cohort.slices or 24) / 24
    return [Job(cohort.name, i, cost=cost) for i in range(cohort.n if n is None else n)]


def phantom_kwargs(cohort: Cohort, i: int) -> dict[str, Any]:
    """Keyword arguments of write_dicom_series/series_truth for phantom ``i`` (Nones left out,
    so a cohort at the defaults calls the generator exactly as training does)."""
    slices = cohort.slices
    if slices is None and cohort.variant == "axial":
        slices = int(np.random.default_rng([cohort.seed(i), 11]).integers(20, 31))
    kwargs: dict[str, Any] = {"variant": cohort.variant, "slices": slices,
                              "matrix": cohort.matrix, "pixel_mm": cohort.pixel_mm,
                              "slice_thickness_mm": cohort.slice_thickness_mm}
    if cohort.shift:
        kwargs["shift"] = phantoms.Shift(**cohort.shift)
    return {k: v for k, v in kwargs.items() if v is not None}


def _write_with_truth(label: str, seed: int, folder: Path, kwargs: dict[str, Any],
                      compress: str | None) -> Any:
    """Write the series; its SeriesTruth (from the same call where the generator offers it)."""
    if "truth" in inspect.signature(phantoms.write_dicom_series).parameters:
        _, truth = phantoms.write_dicom_series(label, seed, folder, compress=compress,
                                               truth=True, **kwargs)
        return truth
    phantoms.write_dicom_series(label, seed, folder, compress=compress, **kwargs)
    return phantoms.series_truth(label, seed, **kwargs)


def analyse(engine: Engine, array: npt.NDArray[np.float32], affine: npt.NDArray[np.float64]
            ) -> tuple[Any, Any]:
    prepared = preprocess(array, affine, engine.info.preprocessing)
    return prepared, engine.run(prepared.model_input[None])


def _outputs(out: Any) -> dict[str, Any]:
    return {Output.PROBABILITIES.value: [float(v) for v in out.probabilities[0]],
            Output.LOGITS.value: [float(v) for v in out.logits[0]],
            Output.OOD_SCORE.value: float(out.ood_score[0])}


def score_phantom(engine: Engine, job: Job) -> dict[str, Any]:
    from service.core.volume import load_series_volume

    cohort = BY_NAME[job.cohort]
    label, seed = job.label, cohort.seed(job.i)
    assert label is not None
    kwargs = phantom_kwargs(cohort, job.i)
    compress = cohort.compress[job.i % len(cohort.compress)] if cohort.compress else None
    with tempfile.TemporaryDirectory(prefix="flaircad-eval-") as tmp:
        truth = _write_with_truth(label, seed, Path(tmp), kwargs, compress)
        volume = load_series_volume(tmp)
    prepared, out = analyse(engine, volume.array, volume.affine_lps)
    # volume slice k is the file whose InstanceNumber is n: truth index n - 1
    order = _truth_order(volume)
    lesion = np.asarray(truth.lesion_mask, dtype=bool)[order]
    brain = np.asarray(truth.brain_mask, dtype=bool)[order]
    if lesion.shape != volume.array.shape:
        raise ValueError(f"truth {lesion.shape} does not match the volume {volume.array.shape}")
    pixel = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    dilated = dilate_lesions(lesion, pixel, RADIUS_MM)
    maps = {}
    for name in MAPS:
        cam = cam_to_source(out.explanation(name)[0], prepared)
        maps[name] = map_stats(cam, lesion, brain, pixel_mm=pixel, radius_mm=RADIUS_MM,
                               edge_px=EDGE_PX, dilated=dilated).to_dict()
    return {"cohort": job.cohort, "i": job.i, "seed": seed, "label": label,
            "compress": compress, "slices": int(volume.array.shape[0]), **_outputs(out),
            "maps": maps}


def score_real(engine: Engine, job: Job) -> dict[str, Any]:
    assert job.source is not None
    path = Path(job.source)
    if path.is_dir():
        from service.core.volume import load_series_volume

        volume = load_series_volume(path)
        array, affine = volume.array, volume.affine_lps
    else:
        image = load_nifti(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., job.time_index or 0]
        elif data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D or 4D NIfTI, got shape {data.shape}")
        array, affine = data, _RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    _, out = analyse(engine, array, affine)
    return {"cohort": job.cohort, "group": job.group, "source": job.source,
            "time_index": job.time_index,
            "shape": [int(v) for v in array.shape], **_outputs(out)}


def _truth_order(volume: SeriesVolume) -> list[int]:
    """The truth index of each volume slice: InstanceNumber n is the phantom's slice n - 1."""
    order = []
    for s in volume.slices:
        if s.instance_number is None:  # the phantom writer numbers every file
            raise ValueError("a phantom slice without InstanceNumber")
        order.append(s.instance_number - 1)
    return order


def real_jobs(samples: Path, *, first_only: bool = False) -> tuple[list[Job], list[dict[str, Any]]]:
    """One job per single-volume DICOM series (the service's reader) and, where the reader
    rejects a folder (4D, mosaic), one per 3D time point of its reference NIfTI files."""
    from service.core.volume import load_folder

    jobs: list[Job] = []
    notes: list[dict[str, Any]] = []
    for folder in sorted(p for p in samples.iterdir() if p.is_dir()):
        outcomes, _ = load_folder(folder / "dicom")
        if len(outcomes) == 1 and outcomes[0].volume is not None:
            jobs.append(Job("real", source=str(folder / "dicom"), group=folder.name, cost=2.0))
            notes.append({"source": folder.name, "read": "dicom", "inputs": 1})
            continue
        codes = sorted({str(o.rejection.code) for o in outcomes if o.rejection is not None})
        count = 0
        for nii in sorted((folder / "ref").glob("*.nii")):
            shape = load_nifti(nii).shape
            times = [None] if len(shape) == 3 else list(range(shape[3]))
            for t in times[:1] if first_only else times:
                jobs.append(Job("real", source=str(nii), time_index=t, group=folder.name,
                                cost=0.5))
                count += 1
            if first_only:
                break
        notes.append({"source": folder.name, "read": "reference NIfTI", "rejected": codes,
                      "inputs": count})
    return jobs, notes


_ENGINE: Engine | None = None


def init_worker(model_path: str) -> None:
    global _ENGINE
    _ENGINE = Engine(Path(model_path), ["CPUExecutionProvider"])


def run_job(job: Job) -> dict[str, Any]:
    """Score one job with this process's engine (see :func:`init_worker`)."""
    assert _ENGINE is not None, "init_worker was not called"
    start = time.perf_counter()
    try:
        record = (score_real(_ENGINE, job) if job.source is not None
                  else score_phantom(_ENGINE, job))
    except Exception as error:  # say which input; an input that fails is never dropped
        raise RuntimeError(f"evaluation input {job} failed: {error}") from error
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record
