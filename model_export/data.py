"""Cohorts for training: an index CSV of NIfTI files / DICOM folders, or generated phantoms.

Every volume goes through :func:`service.core.preprocess.preprocess`, the same code the service
runs.
Splits are by patient (stratified group k-fold), never by file.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from model_export.seeds import classifier_seed
from service.core.preprocess import (
    PreprocessingConfig,
    preprocess,
    reorient_to_canonical,
    resize_area,
)
from service.phantoms import CLASS_NAMES, generate_phantom

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

# NIfTI stores RAS; DICOM and our affines are LPS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Sample:
    """One preprocessed volume with its label and patient."""

    # (S, H, W) model grid, stored in float16 (half the memory of a cohort; the network
    # computes in float32, and [0, 1] intensities keep ~3 significant digits)
    volume: npt.NDArray[np.float16]
    label: int
    patient_id: str
    source: str
    lesion_mask: npt.NDArray[np.bool_] | None = None  # phantoms only, on the model grid


def load_nifti(path: Path | str) -> SpatialImage:
    """``nibabel.load`` of an image with voxels and an affine (a NIfTI file): load itself is
    typed as returning any file-based image."""
    import nibabel
    from nibabel.spatialimages import SpatialImage

    image = nibabel.load(path)
    if not isinstance(image, SpatialImage):
        raise ValueError(f"{path}: not a spatial image ({type(image).__name__})")
    return image


def load_volume(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """A NIfTI file or a folder of one DICOM series → (array, affine to LPS)."""
    if path.is_dir():
        # The service's DICOM reader: one implementation, the same typed rejections.
        from service.core.volume import load_series_volume

        volume = load_series_volume(path)
        return volume.array, volume.affine_lps
    image = load_nifti(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, _RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)


def read_index(csv_path: Path, config: PreprocessingConfig) -> list[Sample]:
    """Rows ``path,label,patient_id``; paths relative to the CSV's folder."""
    samples = []
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            label = row["label"].strip()
            if label not in CLASS_NAMES:
                raise ValueError(f"{csv_path}: unknown label {label!r}; expected {CLASS_NAMES}")
            path = (csv_path.parent / row["path"].strip()).resolve()
            array, affine = load_volume(path)
            samples.append(
                Sample(
                    volume=preprocess(array, affine, config).model_input.astype(np.float16),
                    label=CLASS_NAMES.index(label),
                    patient_id=row["patient_id"].strip(),
                    source=str(path),
                )
            )
    return samples


def _phantom_sample(args: tuple[int, str, int, PreprocessingConfig]) -> Sample:
    seed, label, slices, config = args
    phantom = generate_phantom(label, seed, slices=slices)
    prepared = preprocess(phantom.volume, phantom.affine, config)
    mask = resize_area(
        preprocess_mask_canonical(phantom.lesion_mask, phantom.affine), config.model_grid
    )
    return Sample(
        volume=prepared.model_input.astype(np.float16),
        label=CLASS_NAMES.index(label),
        patient_id=f"PHANTOM-{label}-{seed:05d}",
        source=f"phantom:{label}:{seed}",
        lesion_mask=mask >= 0.5,
    )


def preprocess_mask_canonical(
    mask: npt.NDArray[np.bool_], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """A mask through the same reorientation as its volume (no intensity scaling)."""
    return reorient_to_canonical(mask.astype(np.float32), affine).array


def phantom_cohort(
    n: int, config: PreprocessingConfig, seed: int = 0, workers: int = 2
) -> list[Sample]:
    """``n`` phantoms, classes alternating, 20–30 axial slices each; one patient per phantom.
    Phantom seeds come from ``seeds.CLASSIFIER`` (run ``seed``), which nothing else uses."""
    rng = np.random.default_rng(seed)
    jobs = [
        (classifier_seed(seed, i), CLASS_NAMES[i % 2], int(rng.integers(20, 31)), config)
        for i in range(n)
    ]
    if workers <= 1:
        return [_phantom_sample(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_phantom_sample, jobs, chunksize=4))


@dataclass(frozen=True)
class Split:
    train: list[int]
    valid: list[int]
    test: list[int]


def stratified_group_folds(
    labels: Sequence[int], groups: Sequence[str], k: int, seed: int
) -> list[list[int]]:
    """Assign whole patients to ``k`` folds, balancing each class across folds."""
    if k < 2:
        raise ValueError("k must be at least 2")
    patients: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        patients.setdefault(group, []).append(index)
    by_class: dict[int, list[str]] = {}
    for group, members in patients.items():
        majority = int(np.bincount([labels[i] for i in members]).argmax())
        by_class.setdefault(majority, []).append(group)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in sorted(by_class):
        groups = sorted(by_class[cls])
        rng.shuffle(groups)
        for j, group in enumerate(groups):
            folds[(j + offset) % k].extend(patients[group])
        offset += len(groups)
    return [sorted(fold) for fold in folds]


def make_splits(
    labels: Sequence[int], groups: Sequence[str], folds: int, seed: int
) -> list[Split]:
    """``folds`` ≥ 3: k-fold with fold i as test and fold i+1 as validation. ``folds`` = 1: one
    split, 60/20/20 by patient (from a 5-fold assignment)."""
    k = 5 if folds == 1 else folds
    if k < 3:
        raise ValueError("use --folds 1 or at least 3 (test, validation and training folds)")
    assignment = stratified_group_folds(labels, groups, k, seed)
    splits = []
    for i in range(1 if folds == 1 else k):
        test, valid = assignment[i], assignment[(i + 1) % k]
        train = sorted(j for f, fold in enumerate(assignment) if f not in (i, (i + 1) % k)
                       for j in fold)
        splits.append(Split(train=train, valid=valid, test=test))
    return splits
