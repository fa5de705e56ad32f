"""Synthetic T2-FLAIR brain phantoms, MS or cSVD, with exact lesion ground truth.

The project has no patient data, so training, the export checks, the benches and every DICOM
test start here. A phantom is defined analytically in patient millimetres (DICOM's LPS) instead
of on a voxel grid: the same phantom can then be sampled on any acquisition (2D axial, 3D
sagittal, oblique) and every sampling agrees with the others, with the DICOM geometry written
for it, and with its lesion mask. By job:

* :mod:`.anatomy`: the head's shapes (:class:`Anatomy`, ventricles, deep structures, contrast);
* :mod:`.lesions`: where each class's lesions lie, and :func:`make_anatomy`;
* :mod:`.shift`: :class:`Shift`, a phantom moved off the training distribution;
* :mod:`.rendering`: intensities, bias field and noise at any points (:func:`render`);
* :mod:`.geometry`: acquisition grids (:func:`generate_phantom`) and one series' truth
  (:class:`SeriesTruth`, :func:`series_truth`);
* :mod:`.writer`: the DICOM series (:func:`write_dicom_series`) and its lesion SEG
  (:func:`write_lesion_seg`).

numpy and pydicom only (of ours, ``service.core`` at most): training imports this in
data-loader workers, and the service tests use it without torch (highdicom is imported by
:func:`write_lesion_seg` alone). Import from here; the modules' private names may move.
"""

from __future__ import annotations

from service.phantoms.anatomy import (
    CLASS_NAMES,
    LESION_SITES,
    Anatomy,
    Band,
    BoolArray,
    Contrast,
    F64Array,
    FloatArray,
    Lesion,
    Ventricles,
)
from service.phantoms.geometry import (
    VARIANTS,
    PhantomVolume,
    SeriesTruth,
    generate_phantom,
    lesion_slices,
    series_truth,
)
from service.phantoms.lesions import make_anatomy
from service.phantoms.rendering import render, render_with_sites
from service.phantoms.shift import SHIFT_CONTRASTS, SHIFT_LESIONS, Shift
from service.phantoms.writer import COMPRESSIONS, write_dicom_series, write_lesion_seg

__all__ = [
    "CLASS_NAMES",
    "COMPRESSIONS",
    "LESION_SITES",
    "SHIFT_CONTRASTS",
    "SHIFT_LESIONS",
    "VARIANTS",
    "Anatomy",
    "Band",
    "BoolArray",
    "Contrast",
    "F64Array",
    "FloatArray",
    "Lesion",
    "PhantomVolume",
    "SeriesTruth",
    "Shift",
    "Ventricles",
    "generate_phantom",
    "lesion_slices",
    "make_anatomy",
    "render",
    "render_with_sites",
    "series_truth",
    "write_dicom_series",
    "write_lesion_seg",
]
