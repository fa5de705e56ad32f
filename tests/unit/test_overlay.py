"""Grad-CAM back on the source slices: geometry per acquisition plane, slice weights, pixels,
and the banner and colour bar of the Secondary Capture overlays."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from service.core.preprocess import PreprocessingConfig, preprocess
from service.core.volume import load_series_volume
from service.phantoms import generate_phantom
from service.pipeline.overlay import (
    BANNER_MAX_ROWS,
    RESEARCH_BANNER,
    Banner,
    BannerLayout,
    banner_layout,
    blend,
    burn_banner,
    cam_to_source,
    colour_bar_box,
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
    # text at the top (white) and the research notice at the bottom (yellow), each in the
    # tenth of the rows the strips may take (the text is small on a 200-row image: anti-aliased
    # white, no longer pure 255 as the old full-width band's large font was)
    assert (stamped[:20] > 180).all(axis=2).any()
    bottom = stamped[-20:]
    assert ((bottom[..., 0] > 180) & (bottom[..., 2] < 60)).any()


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


# --------------------------------------------------------------------------------------------
# The Secondary Capture's banner and colour bar (issue 15: no band over the anatomy, a legend)
# --------------------------------------------------------------------------------------------

PLAIN = Banner("MS", {"MS": 0.91, "cSVD": 0.09}, "flaircad-demo", "0.3.1")
ALERTS = Banner("cSVD", {"MS": 0.2, "cSVD": 0.8}, "flaircad-demo", "0.3.1",
                in_distribution=False, flair_recognised=False)
# the longest texts Banner lets through (clean_ascii's limits), one word each
LONG = Banner("p" * 32, {"n" * 16: 0.5, "c" * 16: 0.5}, "m" * 40, "v" * 40,
              explanation="gradcam", in_distribution=False, flair_recognised=False)
SIZES = [(256, 256), (512, 512), (1024, 1024), (256, 320), (320, 256), (512, 384), (192, 512)]


def _words(lines: list[str]) -> str:
    return " ".join(" ".join(lines).replace(";", " ").split())  # ";" joins two alerts


def _assert_lines_whole(layout: BannerLayout) -> None:
    """Each line drawn alone on a canvas larger than the image: all its ink lies inside its
    strip and the image, i.e. nothing of it is cut off by an edge or covered by another line."""
    pad = 64
    for block in layout.blocks:
        box = block.box
        assert 0 <= box.top < box.bottom <= layout.rows and box.right <= layout.columns
        for line in block.lines:
            canvas = np.zeros((layout.rows + 2 * pad, layout.columns + 2 * pad), np.uint8)
            x, y = line.origin
            cv2.putText(canvas, line.text, (x + pad, y + pad), cv2.FONT_HERSHEY_SIMPLEX,
                        layout.scale, 255, 1, cv2.LINE_AA)
            ink_rows, ink_cols = np.nonzero(canvas)
            assert ink_rows.size, line.text
            assert box.top <= ink_rows.min() - pad and ink_rows.max() - pad < box.bottom, (
                line.text, box)
            assert ink_cols.min() - pad >= 0 and ink_cols.max() - pad < box.right, (
                line.text, box)


@pytest.mark.parametrize(("rows", "columns"), SIZES)
@pytest.mark.parametrize("banner", [PLAIN, ALERTS, LONG], ids=["plain", "alerts", "long"])
def test_banner_and_colour_bar_take_a_small_part_of_any_matrix(rows: int, columns: int,
                                                                banner: Banner) -> None:
    """The old banner was a full-width band over the top 22-29 % of the rows (more with the
    alerts); now the text strips take at most a tenth of the rows, the colour bar a few per cent
    of the width, everything else stays as it was, and every line is whole."""
    layout = banner_layout(banner, rows, columns)
    top, bottom = layout.blocks
    assert layout.strip_rows() <= math.floor(BANNER_MAX_ROWS * rows)
    assert top.box.top == 0 and bottom.box.bottom == rows  # at the edges
    _assert_lines_whole(layout)
    # every word of the result and the alerts is drawn, in order; the notice in one piece
    assert _words([line.text for line in top.lines]) == _words([*banner.lines(),
                                                               *banner.alerts()])
    assert any("RESEARCH USE ONLY" in line.text for line in bottom.lines)
    assert _words([line.text for line in bottom.lines]) == RESEARCH_BANNER

    flat = np.full((rows, columns, 3), 128, np.uint8)  # every pixel the banner touches changes
    stamped = burn_banner(flat, banner)
    changed = (stamped != flat).any(axis=2)
    bar = layout.bar
    assert bar.right - bar.left <= 0.03 * columns + 1
    assert changed.mean() <= BANNER_MAX_ROWS + 0.02, changed.mean()
    # between the strips, nothing changes left of the legend (the bar and its labels)
    legend = bar.left - max(8, columns // 20)
    assert not changed[top.box.bottom:bottom.box.top, :legend].any()
    # the notice in yellow, the alerts in orange, in their strips
    pixels = stamped.astype(np.int32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    yellow = (red > 150) & (green > 150) & (blue < 70)
    orange = (red > 150) & (red - green > 40) & (green > 40) & (blue < 70)
    assert yellow[bottom.box.top:, :bottom.box.right].any()
    assert bool(orange[:top.box.bottom, :top.box.right].any()) is bool(banner.alerts())


@pytest.mark.parametrize(("rows", "columns"), [(256, 256), (512, 384), (1024, 1024)])
def test_colour_bar_runs_from_jet_0_at_the_bottom_to_jet_1_at_the_top(rows: int,
                                                                      columns: int) -> None:
    stamped = burn_banner(np.full((rows, columns, 3), 128, np.uint8), PLAIN)
    bar = colour_bar_box(rows, columns)
    assert bar == banner_layout(PLAIN, rows, columns).bar
    assert bar.right <= columns and bar.left >= 0.95 * columns  # at the right edge
    assert 0.4 * rows <= bar.bottom - bar.top <= 0.6 * rows
    strip = stamped[bar.top:bar.bottom, bar.left:bar.right].astype(np.int32)
    assert (strip == strip[:, :1]).all()  # one colour per row
    # OpenCV's JET, the colour map blend() uses, as RGB, index 0..255
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)
    jet = jet[:, 0, ::-1].astype(np.int32)
    distance = np.abs(strip[:, 0, None, :] - jet[None]).sum(axis=2)
    index = distance.argmin(axis=1)
    assert (distance.min(axis=1) == 0).all()  # exactly JET colours
    assert index[0] == 255 and index[-1] == 0  # JET(1) on top, JET(0) at the bottom
    assert (np.diff(index) <= 0).all()  # in order
    assert len(set(index.tolist())) >= min(200, bar.bottom - bar.top)  # the whole range


@pytest.mark.parametrize("matrix", [256, 512])
@pytest.mark.parametrize("banner", [PLAIN, ALERTS], ids=["plain", "alerts"])
def test_the_anatomy_is_untouched_by_the_banner(matrix: int, banner: Banner) -> None:
    """A phantom head at 24 cm field of view: no pixel of the head changes (the old band
    darkened 7-8 % of the head's pixels, 24-28 % with the alerts), nor the image's middle."""
    phantom = generate_phantom("MS", 1, slices=6, matrix=matrix, pixel_mm=240.0 / matrix)
    grey = window(phantom.volume)[3]
    cam = np.zeros(grey.shape, np.float32)
    cam[matrix // 3: matrix // 2, matrix // 3: matrix // 2] = 1.0
    image = blend(grey, cam)
    changed = (burn_banner(image, banner) != image).any(axis=2)
    head = grey > 30
    assert head.mean() > 0.3
    assert not changed[head].any(), changed[head].mean()
    middle = slice(matrix // 10, matrix - matrix // 10)
    assert not changed[middle, middle].any()
