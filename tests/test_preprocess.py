"""The shared preprocessing: orientation, intensity, area resize, config round trip."""

from __future__ import annotations

import numpy as np
import pytest

from service.preprocess import (
    PreprocessingConfig,
    area_matrix,
    preprocess,
    reorient_to_canonical,
    resize_area,
    scale_intensity,
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
