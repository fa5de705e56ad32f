"""The explanation map's peak (service.pipeline.peak): the voxel, its source image and frame,
its patient position through the volume's affine, and no peak for a zero map."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.volume import SliceSource
from service.pipeline.peak import Peak, peak_of

# (k, r, c) -> LPS: columns 0.9 mm along -x, rows 1.1 mm along y, slices 3 mm along z
AFFINE = np.array([[0.0, 0.0, -0.9, 100.0],
                   [0.0, 1.1, 0.0, -50.0],
                   [3.0, 0.0, 0.0, 20.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _slices(n: int, multiframe: bool = False) -> list[SliceSource]:
    if multiframe:
        return [SliceSource("1.2.3.9", k + 1, 1, "enhanced.dcm") for k in range(n)]
    return [SliceSource(f"1.2.3.{k + 10}", None, k + 1, f"{k}.dcm") for k in range(n)]


def test_peak_is_the_argmax_on_its_source_image_at_its_patient_position() -> None:
    cam = np.random.default_rng(3).random((5, 12, 10), dtype=np.float32) * 0.5
    cam[3, 7, 2] = 1.0
    peak = peak_of(cam, _slices(5), AFFINE, {"1.2.3.13": "1.2.840.10008.5.1.4.1.1.4"})
    assert peak == Peak(
        k=3, row=7, column=2, sop_instance_uid="1.2.3.13",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", frame_number=None,
        point_lps=(100.0 - 0.9 * 2, -50.0 + 1.1 * 7, 20.0 + 3.0 * 3), value=1.0,
        image_size=(12, 10), pixel_spacing=(pytest.approx(1.1), pytest.approx(0.9)))


def test_peak_of_a_multiframe_source_names_its_frame() -> None:
    cam = np.zeros((4, 6, 6), np.float32)
    cam[2, 1, 5] = 0.75
    peak = peak_of(cam, _slices(4, multiframe=True), AFFINE)
    assert peak is not None
    assert (peak.sop_instance_uid, peak.frame_number, peak.sop_class_uid) == (
        "1.2.3.9", 3, None)
    assert peak.value == pytest.approx(0.75)


def test_ties_take_the_first_voxel_and_a_zero_map_has_no_peak() -> None:
    cam = np.zeros((3, 4, 4), np.float32)
    assert peak_of(cam, _slices(3), AFFINE) is None
    cam[2, 0, 0] = cam[1, 3, 3] = 1.0
    peak = peak_of(cam, _slices(3), AFFINE)
    assert peak is not None and (peak.k, peak.row, peak.column) == (1, 3, 3)


def test_a_map_that_does_not_fit_the_slices_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        peak_of(np.ones((3, 4, 4), np.float32), _slices(2), AFFINE)
