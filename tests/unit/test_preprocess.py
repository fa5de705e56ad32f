"""The shared preprocessing: orientation, intensity, area resize, config round trip."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.preprocess import (
    PreprocessingConfig,
    area_matrix,
    linear_matrix,
    preprocess,
    reorient_to_canonical,
    resize_area,
    resize_linear,
    restore_to_source,
    scale_intensity,
    source_shape,
)


def test_canonical_axial_affine_is_unchanged() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    # axis0 → +S (slices), axis1 → +P (rows), axis2 → +L (columns): already canonical
    affine = np.array([[0, 0, 0.9, -100], [0, 0.9, 0, -120], [5, 0, 0, -40], [0, 0, 0, 1.0]])
    out = reorient_to_canonical(array, affine)
    np.testing.assert_array_equal(out.array, array)
    np.testing.assert_allclose(out.affine, affine)


def test_reorientation_keeps_every_voxel_at_its_patient_position() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    # a sagittal-ish stack: axis0 → −L (R), axis1 → −S (I), axis2 → +P
    affine = np.array([[-1.1, 0, 0, 80], [0, 0, 0.8, -90], [0, -1.2, 0, 60], [0, 0, 0, 1.0]])
    out = reorient_to_canonical(array, affine)
    assert out.array.shape == (6, 7, 5)
    directions = out.affine[:3, :3] / np.linalg.norm(out.affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.abs(np.diag(directions[[2, 1, 0]])), 1.0)
    assert directions[2, 0] > 0 and directions[1, 1] > 0 and directions[0, 2] > 0
    # every voxel of the output sits where the same value sat in the input
    for idx in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        position = out.affine @ np.array([*idx, 1.0])
        source = np.linalg.solve(affine, position)
        source_idx = tuple(round(v) for v in source[:3])
        assert out.array[idx] == array[source_idx]


def test_scale_intensity_minmax_and_percentiles() -> None:
    data = np.linspace(-5, 95, 101, dtype=np.float32)
    out = scale_intensity(data, PreprocessingConfig())
    assert out.min() == 0.0 and out.max() == 1.0
    robust = scale_intensity(
        data, PreprocessingConfig(intensity={"method": "minmax", "percentiles": [10, 90]})
    )
    assert robust[:10].max() == 0.0 and robust[-10:].min() == 1.0
    assert np.all(scale_intensity(np.ones(5), PreprocessingConfig()) == 0.0)


def test_area_matrix_averages_overlaps() -> None:
    weights = area_matrix(4, 2)
    np.testing.assert_allclose(weights, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    fractional = area_matrix(3, 2)  # output cells cover 1.5 inputs each
    np.testing.assert_allclose(fractional, [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(area_matrix(7, 24).sum(1), 1.0)


def test_resize_area_preserves_mean_and_shape() -> None:
    rng = np.random.default_rng(1)
    data = rng.random((30, 64, 48)).astype(np.float32)
    out = resize_area(data, (24, 32, 32))
    assert out.shape == (24, 32, 32) and out.dtype == np.float32
    assert abs(out.mean() - data.mean()) < 1e-3
    block = resize_area(np.kron(np.eye(2), np.ones((2, 2)))[None], (1, 2, 2))
    np.testing.assert_allclose(block[0], np.eye(2))


def test_preprocess_end_to_end_and_config_round_trip() -> None:
    config = PreprocessingConfig(target_shape=(32, 32, 8))
    assert config.model_grid == (8, 32, 32)
    assert PreprocessingConfig.from_json(config.to_json()) == config
    array = np.random.default_rng(2).random((20, 64, 64)) * 1000
    affine = np.array([[0, 0, 0.9, 0], [0, 0.9, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    prepared = preprocess(array, affine, config)
    assert prepared.model_input.shape == (8, 32, 32)
    assert prepared.model_input.min() >= 0.0 and prepared.model_input.max() <= 1.0


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        PreprocessingConfig(target_shape=(0, 256, 24))
    with pytest.raises(ValueError):
        PreprocessingConfig(intensity={"method": "minmax", "percentiles": [50, 10]})
    with pytest.raises(ValueError):
        PreprocessingConfig(orientation="RAS")


def _random_affine(rng: np.random.Generator, permutation: tuple[int, ...],
                   signs: tuple[float, ...], tilt_deg: float) -> np.ndarray:
    """An affine whose array axes point along ``permutation`` of the LPS axes with ``signs``,
    rotated by ``tilt_deg`` about an arbitrary axis (an oblique acquisition)."""
    directions = np.zeros((3, 3))
    for axis, (lps, sign) in enumerate(zip(permutation, signs, strict=True)):
        directions[lps, axis] = sign
    angle = np.radians(tilt_deg)
    k = rng.normal(size=3)
    k /= np.linalg.norm(k)
    skew = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew
    affine = np.eye(4)
    affine[:3, :3] = rotation @ directions @ np.diag(rng.uniform(0.5, 5.0, size=3))
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


@pytest.mark.parametrize("permutation", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1)])
def test_restore_to_source_inverts_reorientation(permutation: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(permutation) + 10 * permutation[0])
    array = rng.random((5, 6, 7)).astype(np.float32)
    for signs in [(1.0, 1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, -1.0, -1.0)]:
        for tilt in (0.0, 17.0):
            affine = _random_affine(rng, permutation, signs, tilt)
            canonical = reorient_to_canonical(array, affine)
            assert source_shape(canonical) == array.shape
            np.testing.assert_array_equal(restore_to_source(canonical.array, canonical), array)
            # a map computed on the canonical grid lands where its voxel was in the source
            marker = np.zeros_like(canonical.array)
            marker[1, 2, 3] = 1.0
            restored = restore_to_source(marker, canonical)
            source_index = np.argwhere(restored == 1.0)[0]
            np.testing.assert_allclose(canonical.affine @ [1, 2, 3, 1],
                                       affine @ [*source_index, 1], atol=1e-9)
    with pytest.raises(ValueError):
        restore_to_source(np.zeros((1, 2, 3)), canonical)


def test_linear_matrix_matches_opencv_and_keeps_constants() -> None:
    import cv2

    rng = np.random.default_rng(3)
    image = rng.random((16, 12)).astype(np.float32)
    for size in [(256, 200), (16, 12), (7, 5)]:
        ours = linear_matrix(16, size[0]) @ image @ linear_matrix(12, size[1]).T
        theirs = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(linear_matrix(9, 9), np.eye(9))
    np.testing.assert_allclose(linear_matrix(3, 40).sum(1), 1.0)
    constant = resize_linear(np.full((2, 3, 4), 7.0), (24, 30, 5))
    assert constant.shape == (24, 30, 5)
    np.testing.assert_allclose(constant, 7.0, rtol=1e-6)


def test_linear_upsampling_keeps_cell_centres_of_area_resize() -> None:
    # a ramp sampled by the area resize, then brought back: the ramp comes back exactly
    # away from the clamped edges, so the two resizes agree on where each cell lies
    ramp = np.broadcast_to(np.arange(96, dtype=np.float32)[None, :, None], (1, 96, 1))
    coarse = resize_area(ramp, (1, 6, 1))
    back = resize_linear(coarse, (1, 96, 1))[0, :, 0]
    np.testing.assert_allclose(back[8:88], np.arange(96)[8:88], atol=1e-4)
