"""Where the explanation map peaks: the voxel the SR anchors its result at.

The map is the (slices, rows, columns) float map on the source volume's grid, in [0, 1], that
the Parametric Map also holds. Its peak is the first voxel holding the maximum (numpy's argmax
order: slice, then row, then column), so the same map always gives the same anchor. A map that
is zero everywhere has no peak (there is nothing that "most influenced" the result).

Slice ``k`` of the volume is a source image (or a frame of a multi-frame one): its SOP Instance
UID and frame number come from :class:`service.core.volume.SliceSource`; its position in the
patient from the volume's affine, LPS = affine_lps @ (k, r, c, 1) (the centre of the voxel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.core.volume import SliceSource
from service.pipeline.sanitize import clean_uid


@dataclass(frozen=True)
class Peak:
    """The map's maximum: voxel index, source image (and frame), patient position, value."""

    k: int  # slice index in the volume
    row: int
    column: int
    sop_instance_uid: str
    sop_class_uid: str | None  # None when the caller did not know it
    frame_number: int | None  # 1-based, multi-frame sources only
    point_lps: tuple[float, float, float]  # mm, centre of the voxel
    value: float
    # the source image's matrix and pixel spacing (row, column) in mm: the SR's circle
    # around the peak is drawn in pixels of that image
    image_size: tuple[int, int]
    pixel_spacing: tuple[float, float]


def peak_of(cam: npt.NDArray[np.floating], slices: Sequence[SliceSource],
            affine_lps: npt.NDArray[np.float64],
            sop_classes: Mapping[str, str] | None = None) -> Peak | None:
    """The peak of ``cam`` (see the module docstring), or None when the map is all zero.
    ``sop_classes`` maps (clean) SOP Instance UIDs to their SOP Class UIDs."""
    if cam.ndim != 3 or cam.shape[0] != len(slices):
        raise ValueError(f"map of shape {cam.shape} does not fit {len(slices)} slices")
    if not np.any(cam):
        return None
    k, row, column = (int(i) for i in np.unravel_index(int(np.argmax(cam)), cam.shape))
    source = slices[k]
    uid = clean_uid(source.sop_instance_uid) or source.sop_instance_uid
    point = np.asarray(affine_lps, dtype=np.float64) @ np.array([k, row, column, 1.0])
    # the affine's columns 1 and 2 step one row / one column: their lengths are the spacings
    spacing = (float(np.linalg.norm(affine_lps[:3, 1])), float(np.linalg.norm(affine_lps[:3, 2])))
    return Peak(
        k=k, row=row, column=column, sop_instance_uid=uid,
        sop_class_uid=(sop_classes or {}).get(uid), frame_number=source.frame_number,
        point_lps=(float(point[0]), float(point[1]), float(point[2])),
        value=float(cam[k, row, column]),
        image_size=(int(cam.shape[1]), int(cam.shape[2])), pixel_spacing=spacing,
    )
