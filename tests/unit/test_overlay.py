"""Grad-CAM back on the source slices: geometry per acquisition plane, slice weights, pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.core.preprocess import PreprocessingConfig, preprocess
from service.core.volume import load_series_volume
from service.pipeline.overlay import (
    RESEARCH_BANNER,
    Banner,
    blend,
    burn_banner,
    cam_to_source,
    most_attended,
    normalise_volume,
    preview_png,
    source_slice_weights,
    window,
)
from tests.conftest import PhantomFactory

CONFIG = PreprocessingConfig()  # the bundled model's grid: 24 slices of 256 x 256
CAM_GRID = (24, 16, 16)  # its Grad-CAM grid
# (slice, row, column) cells on the CAM grid, inside the volume, off the clamped edges
CELLS = [(5, 4, 11), (18, 12, 3), (12, 8, 8)]


def _cell_centre_lps(cell: tuple[int, int, int], canonical_affine: np.ndarray,
                     canonical_shape: tuple[int, ...]) -> np.ndarray:
    """Where a CAM cell's centre is in the patient: its centre in canonical voxel indices (cell
    i of N covers canonical voxels [i n/N, (i+1) n/N)), through the canonical affine."""
    centre = [(c + 0.5) * n / g - 0.5 for c, n, g in zip(cell, canonical_shape, CAM_GRID,
                                                          strict=True)]
    return (canonical_affine @ np.array([*centre, 1.0]))[:3]


@pytest.mark.parametrize("variant", ["axial", "sagittal", "oblique"])
def test_a_hot_cam_cell_lands_at_its_patient_position(phantom_series: PhantomFactory,
                                                     variant: str) -> None:
    """One hot cell on the model's CAM grid, mapped to the source grid: the peak voxel, placed
    in the patient by the *source* affine, is where the cell is in the patient (through the
    canonical affine). A missed flip or a swapped axis moves it by centimetres."""
    volume = load_series_volume(phantom_series(variant=variant))
    prepared = preprocess(volume.array, volume.affine_lps, CONFIG)
    canonical = prepared.canonical
    voxel = np.linalg.norm(volume.affine_lps[:3, :3], axis=0)  # source spacing per axis
    for cell in CELLS:
        cam = np.zeros(CAM_GRID, dtype=np.float32)
        cam[cell] = 1.0
        mapped = cam_to_source(cam, prepared)
        assert mapped.shape == volume.array.shape
        peak = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
        found = (volume.affine_lps @ np.array([*peak, 1.0]))[:3]
        expected = _cell_centre_lps(cell, canonical.affine, canonical.array.shape)
        # the peak is the source voxel nearest the cell centre: half a voxel along each axis
        assert np.linalg.norm(found - expected) <= 0.5 * np.linalg.norm(voxel) + 1e-6, (
            variant, cell, found, expected)


def test_the_cam_is_normalised_over_the_volume_not_per_slice() -> None:
    cam = np.zeros((3, 4, 4), dtype=np.float32)
    cam[0, 1, 1], cam[2, 2, 2] = 4.0, 1.0
    out = normalise_volume(cam)
    assert out[0].max() == 1.0 and out[2].max() == pytest.approx(0.25)
    assert not normalise_volume(np.zeros((2, 3, 3), dtype=np.float32)).any()


@pytest.mark.parametrize("variant", ["axial", "sagittal"])
def test_slice_weights_follow_the_model_onto_source_slices(phantom_series: PhantomFactory,
                                                           variant: str) -> None:
    volume = load_series_volume(phantom_series(variant=variant))
    prepared = preprocess(volume.array, volume.affine_lps, CONFIG)
    n = volume.array.shape[0]
    uniform = np.full(CAM_GRID, 1.0 / 256, dtype=np.float32)
    weights = np.zeros(24, dtype=np.float32)
    weights[7] = 1.0
    out = source_slice_weights(weights, uniform, prepared)
    assert out.shape == (n,) and out.sum() == pytest.approx(1.0)
    if variant == "axial":
        # 24 slices, one per model slice: all the weight on the source slice at model slice 7,
        # i.e. the 8th from the bottom; this volume's axis 0 runs superior to inferior
        assert volume.orientation[0] == "I"
        assert out[n - 1 - 7] == pytest.approx(1.0)
    else:
        # sagittal slices each cut through every model slice: uniform attention in-plane
        # spreads the weight evenly over them
        np.testing.assert_allclose(out, 1.0 / n, rtol=1e-6)
        # attention on one left-right column of the CAM grid picks the sagittal slices there
        column = np.zeros(CAM_GRID, dtype=np.float32)
        column[:, :, 3] = 1.0
        out = source_slice_weights(np.full(24, 1 / 24, dtype=np.float32), column, prepared)
        hot = np.flatnonzero(out > 1e-9)
        centre = (3 + 0.5) * n / 16 - 0.5  # canonical index of the column centre
        canonical_axis = prepared.canonical.source_axes.index(0)
        flipped = prepared.canonical.flipped[canonical_axis]
        expected = n - 1 - centre if flipped else centre
        assert out.sum() == pytest.approx(1.0)
        assert abs(hot.mean() - expected) < 0.6 and len(hot) <= n / 16 + 2


def test_window_blend_and_banner_pixels() -> None:
    volume = np.linspace(0, 1000, 2 * 64 * 80, dtype=np.float32).reshape(2, 64, 80)
    grey = window(volume)
    assert grey.dtype == np.uint8 and grey.min() == 0 and grey.max() == 255
    cam = np.zeros((64, 80), dtype=np.float32)
    plain = blend(grey[0], cam)
    assert plain.shape == (64, 80, 3)
    np.testing.assert_array_equal(plain[..., 0], grey[0])  # no CAM, no colour
    cam[30:34, 40:44] = 1.0
    hot = blend(grey[0], cam)
    assert (hot[32, 42].astype(int) != grey[0, 32, 42]).any()
    banner = Banner("MS", {"MS": 0.91, "cSVD": 0.09}, "demo-\u00e9", "1.0")
    assert all(line.isascii() for line in banner.lines())
    assert "P(MS)=0.910" in banner.lines()[1] and "P(cSVD)=0.090" in banner.lines()[1]
    stamped = burn_banner(np.full((200, 200, 3), 128, dtype=np.uint8), banner)
    assert stamped.shape == (200, 200, 3)
    # text at the top (white) and the research notice at the bottom (yellow)
    assert (stamped[:30] == 255).all(axis=2).any()
    bottom = stamped[-20:]
    assert ((bottom[..., 0] > 200) & (bottom[..., 2] < 60)).any()


def test_preview_png_is_a_montage_of_the_chosen_slices() -> None:
    images = [np.full((64, 48, 3), i * 20, dtype=np.uint8) for i in range(10)]
    weights = [0.0, 0.3, 0.1, 0.0, 0.2, 0.05, 0.05, 0.1, 0.15, 0.05]
    chosen = sorted(most_attended(weights, 3))
    assert chosen == [1, 4, 8]
    banner = Banner("cSVD", {"MS": 0.2, "cSVD": 0.8}, "m", "v")
    data = preview_png(images, chosen, ["a", "b", "c"], banner, (1.0, 1.0), tile=64)
    png = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert png is not None and png.shape[1] == 3 * 64
    assert RESEARCH_BANNER.isascii()
