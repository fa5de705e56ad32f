"""Which map the overlays show (FLAIRCAD_EXPLANATION), that every output names it, and the
out-of-distribution flag in the result JSON, the SR, the SC series and the banners.

A stand-in engine whose HiResCAM, Grad-CAM and attention peak in different places: the overlay
must follow the chosen map, found on the Secondary Capture pixels of the source slice the map
peaks on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import cv2
import highdicom
import numpy as np
import pytest
from highdicom.sr.utils import find_content_items
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service import cli
from service.core.config import Settings
from service.core.contract import DEFAULT_EXPLANATION, EXPLANATIONS
from service.core.preprocess import PreprocessingConfig, preprocess
from service.core.reading import iter_folder
from service.core.volume import load_series_volume
from service.pipeline.analysis import Analysis, analyse
from service.pipeline.overlay import (
    OUTSIDE_DISTRIBUTION_BANNER,
    RESEARCH_BANNER,
    Banner,
    burn_banner,
    cam_to_source,
    colour_bar_box,
)
from service.runtime.scheduler import Scheduler
from service.storage.spool import Spool
from service.storage.store import AnalysisStore, Status
from tests.conftest import PhantomFactory
from tests.integration.test_sc_sr import CAM_GRID, OOD_THRESHOLD, FakeEngine

LABELS = {"hirescam": "HiResCAM", "gradcam": "Grad-CAM", "attention": "attention"}
PEAKS = {"hirescam": (6, 5, 5), "gradcam": (12, 10, 10), "attention": (18, 7, 11)}


def _three_maps_engine(**options: Any) -> FakeEngine:
    """HiResCAM, Grad-CAM and spatial attention each with all their mass in one cell of
    ``PEAKS`` (the slice weights are uniform, so the attention map peaks there too)."""
    maps = {}
    for name, cell in PEAKS.items():
        cam = np.zeros(CAM_GRID, np.float32)
        cam[cell] = 1.0
        maps[name] = cam
    attention = np.full(CAM_GRID, 1.0 / (CAM_GRID[1] * CAM_GRID[2]), np.float32)
    attention[PEAKS["attention"][0]] = maps["attention"][PEAKS["attention"][0]]
    return FakeEngine(hirescam=maps["hirescam"], gradcam=maps["gradcam"],
                      spatial_attention=attention, **options)


def _without_legend(rgb: np.ndarray) -> np.ndarray:
    """The overlay with its colour bar (the JET legend at the right edge, the same on every
    image: not the map) blacked out."""
    bar = colour_bar_box(rgb.shape[0], rgb.shape[1])
    out = rgb.copy()
    out[bar.top:bar.bottom, bar.left:bar.right] = 0
    return out


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Colourfulness of the overlay, without the yellow notice at the bottom, the colour bar
    and the faint background colour of the attention map."""
    pixels = _without_legend(rgb).astype(np.int32)
    out = pixels.max(axis=2) - pixels.min(axis=2)
    out[int(0.85 * out.shape[0]):] = 0
    out[out < 8] = 0
    return out


def _orange(rgb: np.ndarray) -> int:
    """Pixels of the orange warning line (R high, G clearly lower, B low)."""
    pixels = rgb.astype(np.int32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((red > 180) & (red - green > 60) & (red - green < 170) & (blue < 80)).sum())


def _algorithm_parameters(analysis: Analysis) -> set[str]:
    items = find_content_items(analysis.sr_dataset(), name=codes.DCM.AlgorithmParameters,
                               recursive=True)
    return {str(item.TextValue) for item in items}


def _evaluations(analysis: Analysis) -> dict[str, Any]:
    report = highdicom.sr.Comprehensive3DSR.from_dataset(analysis.sr_dataset())
    (group,) = highdicom.sr.MeasurementReport.from_sequence(
        report.content).get_image_measurement_groups()
    return {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}


def _preview_rgb(analysis: Analysis) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(analysis.preview_png, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# The overlay follows the chosen map
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPLANATIONS))
def test_overlay_follows_the_chosen_map_and_every_output_names_it(
        phantom_series: PhantomFactory, name: str) -> None:
    folder = phantom_series()
    engine = _three_maps_engine()
    analysis = analyse(iter_folder(folder), engine, explanation=name)

    # where the chosen map peaks on the source grid: that slice, that row and column
    volume = load_series_volume(folder)
    prepared = preprocess(volume.array, volume.affine_lps, PreprocessingConfig())
    output = engine.run(prepared.model_input[None])
    expected: dict[str, tuple[str, float, float]] = {}
    for other in EXPLANATIONS:
        cam = cam_to_source(output.explanation(other)[0], prepared)
        k, r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
        expected[other] = (str(volume.slices[k].sop_instance_uid), float(r), float(c))
    assert len({uid for uid, _, _ in expected.values()}) == 3  # three different slices

    captures = analysis.sc_datasets()
    hottest = max(captures, key=lambda ds: int(_chroma(ds.pixel_array).sum()))
    uid, row, column = expected[name]
    assert hottest.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    weight = _chroma(hottest.pixel_array).astype(np.float64)
    rows, cols = np.indices(weight.shape)
    found = ((rows * weight).sum() / weight.sum(), (cols * weight).sum() / weight.sum())
    cell = hottest.Rows / CAM_GRID[1]
    assert np.hypot(found[0] - row, found[1] - column) < 0.75 * cell, (found, row, column)
    # and nothing of the other maps shows
    for other in set(EXPLANATIONS) - {name}:
        (elsewhere,) = [ds for ds in captures
                        if ds.SourceImageSequence[0].ReferencedSOPInstanceUID
                        == expected[other][0]]
        assert _chroma(elsewhere.pixel_array).sum() < 0.05 * weight.sum()

    # every output names it
    result = analysis.to_json()
    assert result["explanation"] == {"map": name, "description": EXPLANATIONS[name]}
    label = LABELS[name]
    first = captures[0]
    assert first.SeriesDescription == f"flaircad {label} MS - RESEARCH ONLY"
    assert len(first.SeriesDescription) <= 64
    assert label in first.DerivationDescription
    assert EXPLANATIONS[name] in first.DerivationDescription
    assert f"overlay: {label}" in first.ImageComments
    assert "RESEARCH USE ONLY" in first.ImageComments
    processing = [e for e in first.ContributingEquipmentSequence if e.Manufacturer == "flaircad"]
    assert processing[0].ContributionDescription.startswith(f"{label} overlay")
    parameters = _algorithm_parameters(analysis)
    assert f"explanation_map={name}" in parameters
    assert "calibration_temperature=1.5" in parameters
    assert not any("gradcam_normalisation" in p for p in parameters)
    lines = Banner("MS", analysis.probabilities, "m", "v", explanation=name).lines()
    assert lines[0] == f"flaircad {label}: MS"


def test_unknown_map_is_refused_before_any_work(phantom_series: PhantomFactory) -> None:
    with pytest.raises(ValueError, match="unknown explanation map 'saliency'"):
        analyse(iter_folder(phantom_series()), FakeEngine(), explanation="saliency")


def test_a_map_that_is_zero_everywhere_is_named_in_the_warning(
        phantom_series: PhantomFactory) -> None:
    analysis = analyse(iter_folder(phantom_series()), FakeEngine(), explanation="gradcam")
    assert "the Grad-CAM map is zero everywhere: the overlays show no colour" in analysis.warnings
    assert not any("HiResCAM" in w for w in analysis.warnings)


# --------------------------------------------------------------------------------------------
# Out of distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("score", "inside"), [(OOD_THRESHOLD + 2.5, False),
                                               (OOD_THRESHOLD - 2.5, True)])
def test_distribution_assessment_in_json_sr_sc_and_banners(
        phantom_series: PhantomFactory, score: float, inside: bool) -> None:
    analysis = analyse(iter_folder(phantom_series()), FakeEngine(ood_score=score))
    result = analysis.to_json()
    assert result["distribution"] == {
        "in_distribution": inside, "score": pytest.approx(score), "threshold": OOD_THRESHOLD,
        "method": "mahalanobis",
        "statement": ("within" if inside else "outside") + " the training distribution"}
    json.dumps(result)
    flagged = [w for w in analysis.warnings if w.startswith("outside the training")]
    assert len(flagged) == (0 if inside else 1)

    # SR: a coded evaluation, the score as a measurement, method and threshold as parameters
    evaluations = _evaluations(analysis)
    value = evaluations["Training distribution assessment"]
    assert value.scheme_designator == "99FLAIRCAD"
    assert value.meaning == ("Within" if inside else "Outside") + " training distribution"
    assert value.value == ("INDIST" if inside else "OUTDIST")
    report = highdicom.sr.Comprehensive3DSR.from_dataset(analysis.sr_dataset())
    (group,) = highdicom.sr.MeasurementReport.from_sequence(
        report.content).get_image_measurement_groups()
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured["Out-of-distribution score (model output)"] == pytest.approx(score)
    parameters = _algorithm_parameters(analysis)
    assert {"ood_method=mahalanobis", f"ood_threshold={OOD_THRESHOLD:g}"} <= parameters

    # SC: ImageComments, and the orange warning line burned in under the result (the map is
    # zero here: no other colour than the banner's)
    captures: list[Dataset] = analysis.sc_datasets()
    for ds in captures[:3]:
        assert (OUTSIDE_DISTRIBUTION_BANNER in ds.ImageComments) is not inside
        assert "RESEARCH USE ONLY" in ds.ImageComments
    pixels = _without_legend(captures[0].pixel_array)  # the legend's JET has orange in it
    top = pixels[: pixels.shape[0] // 3]
    assert (_orange(top) > 20) is not inside, _orange(top)
    assert _orange(pixels[pixels.shape[0] // 3:]) == 0
    preview = _preview_rgb(analysis)
    assert (_orange(preview) > 20) is not inside  # the map is zero: only the header


def test_banner_lines_and_pixels_say_outside_the_training_distribution() -> None:
    inside = Banner("MS", {"MS": 0.9, "cSVD": 0.1}, "m", "v")
    outside = Banner("MS", {"MS": 0.9, "cSVD": 0.1}, "m", "v", explanation="attention",
                     in_distribution=False)
    assert inside.alerts() == [] and inside.lines()[0] == "flaircad HiResCAM: MS"
    assert outside.alerts() == ["OUTSIDE THE TRAINING DISTRIBUTION"]
    assert outside.lines()[0] == "flaircad attention: MS"
    grey = np.full((256, 256, 3), 100, np.uint8)
    assert _orange(_without_legend(burn_banner(grey, inside))) == 0
    stamped = burn_banner(grey, outside)
    assert _orange(stamped[:80]) > 20
    # the research notice stays, in yellow at the bottom
    bottom = stamped[-20:].astype(np.int32)
    assert ((bottom[..., 0] > 200) & (bottom[..., 1] > 200) & (bottom[..., 2] < 60)).any()
    assert RESEARCH_BANNER == "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


# --------------------------------------------------------------------------------------------
# The setting, and every path that runs an analysis
# --------------------------------------------------------------------------------------------


def test_setting_defaults_to_hirescam_and_takes_each_map(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAIRCAD_EXPLANATION", raising=False)
    assert Settings().explanation == DEFAULT_EXPLANATION == "hirescam"
    for name in EXPLANATIONS:
        monkeypatch.setenv("FLAIRCAD_EXPLANATION", name.upper())
        assert Settings().explanation == name


def test_invalid_setting_is_refused_at_start(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("FLAIRCAD_EXPLANATION", "saliency")
    with pytest.raises(ValidationError, match="must be one of hirescam, gradcam, attention"):
        Settings()
    from service.runtime.app import create_app
    with pytest.raises(ValidationError):
        create_app()
    for command in (["serve"], ["dimse"], ["analyze", str(tmp_path), "--out",
                                           str(tmp_path / "out")]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"flaircad {command[0]}: invalid setting FLAIRCAD_EXPLANATION" in err, err
        assert "Traceback" not in err


def test_flaircad_analyze_explanation_option_and_setting(
        phantom_series: PhantomFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("service.pipeline.engine.Engine",
                        lambda *args, **kwargs: _three_maps_engine())
    folder = phantom_series(slices=6)
    monkeypatch.setenv("FLAIRCAD_EXPLANATION", "gradcam")
    assert cli.main(["analyze", str(folder), "--out", str(tmp_path / "a")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["explanation"]["map"] == "gradcam"
    assert cli.main(["analyze", str(folder), "--out", str(tmp_path / "b"),
                     "--explanation", "attention"]) == 0
    written = json.loads((tmp_path / "b" / "result.json").read_text())
    assert written["explanation"] == {"map": "attention",
                                      "description": EXPLANATIONS["attention"]}
    assert "distribution" in written and "calibration" in written
    with pytest.raises(SystemExit):
        cli.main(["analyze", str(folder), "--out", str(tmp_path / "c"),
                  "--explanation", "saliency"])


def test_scheduler_passes_the_setting_to_every_analysis(tmp_path: Path) -> None:
    """The one path of the HTTP API, STOW-RS and DIMSE: the scheduler's analysis call."""
    settings = Settings(spool_dir=tmp_path, explanation="attention")
    spool, store = Spool(tmp_path), AnalysisStore(tmp_path / "flaircad.sqlite")
    calls: list[dict[str, Any]] = []

    def analyse_stand_in(files: list[Path], *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise RuntimeError("stand-in")

    async def run() -> None:
        scheduler = Scheduler(settings, FakeEngine(), spool, store,  # type: ignore[arg-type]
                              analyse=analyse_stand_in)
        await scheduler.start()
        record = store.create("upload", owner=scheduler.owner)
        (spool.upload_folder(record.id) / "00000.dcm").write_bytes(b"x")
        done = scheduler.submit_upload(sorted(spool.upload_folder(record.id).glob("*")),
                                       record)
        deadline = time.monotonic() + 10
        while not done.done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert store.get(record.id).status is Status.FAILED  # type: ignore[union-attr]
        await scheduler.stop()

    asyncio.run(run())
    store.close()
    assert [call["explanation"] for call in calls] == ["attention"]
