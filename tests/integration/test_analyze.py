"""The analysis pipeline end to end: refusals with stable codes, ``flaircad analyze``, and where
the bundled model's Grad-CAM lands on phantom lesions."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model_export import seeds
from model_export.metrics import cam_peak_hits
from service.cli import main
from service.core.config import BUNDLED_MODEL
from service.core.preprocess import preprocess
from service.core.reading import iter_folder
from service.core.volume import load_series_volume
from service.phantoms import generate_phantom
from service.pipeline.analysis import AnalysisRejected, analyse
from service.pipeline.engine import Engine
from service.pipeline.overlay import cam_to_source
from tests.conftest import PhantomFactory
from tests.integration.test_sc_sr import FakeEngine

FLAIRCAD = Path(sys.executable).with_name("flaircad")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(BUNDLED_MODEL, ["CPUExecutionProvider"])


def _rewrite(source: Path, target: Path, skip: frozenset[int] = frozenset(), **attributes: object
             ) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, path in enumerate(sorted(source.glob("*.dcm"))):
            if index in skip:
                continue
            ds = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            ds.save_as(target / path.name)
    return target


def _refusal(sources: object, **options: object) -> AnalysisRejected:
    with pytest.raises(AnalysisRejected) as caught:
        analyse(sources, FakeEngine(), **options)  # type: ignore[arg-type]
    return caught.value


def test_refusals_have_stable_codes(phantom_series: PhantomFactory, tmp_path: Path) -> None:
    axial = phantom_series(slices=6)
    assert _refusal([]).code == "no_series"
    note = tmp_path / "note.txt"
    note.write_text("not DICOM")
    nothing = _refusal([note])
    assert nothing.code == "no_series" and "not_dicom (1)" in nothing.warnings[0]
    both = _refusal([*iter_folder(axial), *iter_folder(phantom_series("oblique"))])
    assert both.code == "multiple_series" and "AX T2 FLAIR OBL" in both.message
    gap = _rewrite(axial, tmp_path / "gap", skip=frozenset({3}))
    assert _refusal(iter_folder(gap)).code == "missing_slices"
    ct = _rewrite(axial, tmp_path / "ct", Modality="CT")
    assert _refusal(iter_folder(ct)).code == "not_mr"
    assert AnalysisRejected("x", "y", ["z"]).to_json() == {"code": "x", "message": "y",
                                                          "warnings": ["z"]}


def test_non_flair_is_refused_unless_overridden(phantom_series: PhantomFactory,
                                                tmp_path: Path) -> None:
    t2 = _rewrite(phantom_series(slices=6), tmp_path / "t2", SeriesDescription="AX T2 TSE",
                  ProtocolName="AX T2 TSE", SequenceName="*tse2d1_15", ScanningSequence="SE",
                  SequenceVariant="SK", ScanOptions=None, InversionTime=None)
    refused = _refusal(iter_folder(t2))
    assert refused.code == "not_flair"
    # bytes in, as the HTTP layer passes them, with the research override
    parts = [(path.read_bytes(), path.name) for path in iter_folder(t2)]
    analysis = analyse(parts, FakeEngine(), accept_non_flair=True)
    assert any(w.startswith("not_flair") for w in analysis.warnings)
    assert len(analysis.sc_instances) == 6
    # the outputs must not look like those of a FLAIR analysis: JSON, SC and SR say so
    assert analysis.to_json()["input"]["flair_recognised"] is False
    sc_comments = str(analysis.sc_datasets()[0].ImageComments)
    assert "NOT RECOGNISED AS FLAIR" in sc_comments and "FLAIRCAD_ACCEPT_NON_FLAIR" in sc_comments
    report = analysis.sr_dataset()
    assert "NOTFLAIR" in _sr_codes(report)
    assert b"accept_non_flair=true" in analysis.sr_instance
    # a FLAIR series says it was recognised, and its SC carries no override sentence
    flair = analyse(iter_folder(phantom_series(slices=6)), FakeEngine())
    assert flair.to_json()["input"]["flair_recognised"] is True
    assert "NOT RECOGNISED" not in str(flair.sc_datasets()[0].ImageComments)
    assert "FLAIR" in _sr_codes(flair.sr_dataset()) and "NOTFLAIR" not in _sr_codes(
        flair.sr_dataset())


def _sr_codes(report: pydicom.Dataset) -> set[str]:
    codes: set[str] = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for concept in item.get("ConceptCodeSequence", []):
                codes.add(str(concept.CodeValue))
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return codes


def test_a_study_folder_with_several_series(phantom_series: PhantomFactory,
                                            tmp_path: Path) -> None:
    """`flaircad analyze` on a study folder: the only FLAIR series is picked (the HTTP API,
    without pick_flair, still refuses), --series picks any, and a refusal lists the series
    with their descriptions."""
    flair = phantom_series(slices=6)
    study = tmp_path / "study"
    _rewrite(flair, study / "flair")
    t2_uid = "1.2.826.0.1.3680043.8.498.7001"
    _rewrite(flair, study / "t2", SeriesInstanceUID=t2_uid, SeriesDescription="AX T2 TSE",
             ProtocolName="AX T2 TSE", SequenceName="*tse2d1_15", ScanningSequence="SE",
             SequenceVariant="SK", ScanOptions=None, InversionTime=None,
             SOPInstanceUID=None)
    for index, path in enumerate(sorted((study / "t2").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{t2_uid}.{index + 1}"
        ds.save_as(path)
    refused = _refusal(iter_folder(study))
    assert refused.code == "multiple_series"
    assert "AX T2 TSE" in refused.message and t2_uid in refused.message
    assert "--series" in refused.message
    picked = analyse(iter_folder(study), FakeEngine(), pick_flair=True)
    assert picked.series_instance_uid != t2_uid
    assert any("the only one the FLAIR rules recognise" in w for w in picked.warnings)
    chosen = analyse(iter_folder(study), FakeEngine(), series_uid=t2_uid,
                     accept_non_flair=True)
    assert chosen.series_instance_uid == t2_uid and len(chosen.sc_instances) == 6
    with pytest.raises(AnalysisRejected) as missing:
        analyse(iter_folder(study), FakeEngine(), series_uid="1.2.3.4")
    assert missing.value.code == "no_series" and t2_uid in missing.value.message
    out = tmp_path / "out"
    assert main(["analyze", str(study), "--out", str(out), "--series", t2_uid,
                 "--accept-non-flair"]) == 0
    assert json.loads((out / "result.json").read_text())["series_instance_uid"] == t2_uid


def test_flaircad_analyze_end_to_end(phantom_series: PhantomFactory, tmp_path: Path) -> None:
    folder = phantom_series()
    out = tmp_path / "out"
    result = subprocess.run([str(FLAIRCAD), "analyze", str(folder), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert json.loads((out / "result.json").read_text()) == printed
    assert printed["prediction"] == max(printed["probabilities"],
                                        key=printed["probabilities"].get)
    assert set(printed["probabilities"]) == {"MS", "cSVD"}
    assert len(printed["slice_weights"]) == 24
    assert sum(printed["slice_weights"]) == pytest.approx(1.0)
    assert printed["model"]["name"] == "flaircad-demo"
    assert set(printed["timings_ms"]) == {"decode", "volume", "preprocess", "inference",
                                          "render", "encode", "total"}
    captures = sorted((out / "sc").glob("*.dcm"))
    assert len(captures) == 24
    assert pydicom.dcmread(captures[0]).SeriesInstanceUID == \
        printed["outputs"]["secondary_capture_series_instance_uid"]
    assert pydicom.dcmread(out / "sr.dcm").SOPInstanceUID == \
        printed["outputs"]["sr_sop_instance_uid"]
    assert (out / "preview.png").read_bytes()[:4] == b"\x89PNG"
    assert "RESEARCH USE ONLY" in result.stderr


def test_flaircad_analyze_refusals_and_usage(phantom_series: PhantomFactory, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    t2 = _rewrite(phantom_series(slices=6), tmp_path / "t2", SeriesDescription="AX T2 TSE",
                  ProtocolName="AX T2 TSE", SequenceName="*tse2d1_15", ScanningSequence="SE",
                  SequenceVariant="SK", ScanOptions=None, InversionTime=None)
    assert main(["analyze", str(t2), "--out", str(tmp_path / "refused")]) == 3
    problem = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert problem["code"] == "not_flair" and problem["message"]
    assert not (tmp_path / "refused" / "result.json").exists()
    assert main(["analyze", str(t2), "--out", str(tmp_path / "ok"), "--accept-non-flair"]) == 0
    assert (tmp_path / "ok" / "result.json").is_file()
    assert main(["analyze", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert main(["analyze", str(t2), "--out", str(tmp_path / "y"),
                 "--model", str(tmp_path / "none.onnx")]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["analyze", str(t2)])  # --out is required
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as shown:
        main(["analyze", "--help"])
    assert shown.value.code == 0 and "SERIES_DIR" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Where the bundled model looks
# --------------------------------------------------------------------------------------------

# Held-out phantoms: seeds no training, pretraining, export check or evaluation cohort uses.
SEEDS = tuple(seeds.held_out_test_seed(i) for i in range(4))
CAM_RADIUS_PX = 8  # as the model card's localisation score (model_export.train)
# Floors of the HiResCAM pointing rate (the service's default map) on these seeds, on the
# source grid, set a little under what the bundled model measures (FLOOR_MEASURED); raise
# them when a better model is bundled.
# Measured (the bundled network of `make model`, air = 0, no padding frame): HiResCAM cSVD 22
# of 34 lesion slices (0.65), MS 15 of 31 (0.48); Grad-CAM on the same slices 0 and 0. The
# evaluation's 200 held-out phantoms give 70.5 % and 50.3 % (MODEL_CARD.md); the target
# is 0.85 for each class, which this network misses (the card says by how much and why).
FLOOR_MEASURED = {"cSVD": 22 / 34, "MS": 15 / 31}
FLOOR = {"cSVD": 0.55, "MS": 0.4}


def test_bundled_model_tests_use_only_held_out_seeds(engine: Engine) -> None:
    seeds.assert_disjoint(SEEDS, "held_out_tests")
    seen = {name: range(*span) for name, span in engine.info.training_summary["seeds"].items()}
    seeds.assert_disjoint(SEEDS, "held_out_tests", seen=seen)


def _mask_on_source_grid(label: str, seed: int, affine_lps: np.ndarray,
                         shape: tuple[int, ...]) -> np.ndarray:
    """The phantom's ground-truth lesion mask sampled at each source voxel's patient position
    (nearest voxel), through the two affines only: independent of the code under test."""
    phantom = generate_phantom(label, seed)
    index = np.indices(shape).reshape(3, -1)
    lps = affine_lps @ np.vstack([index, np.ones(index.shape[1])])
    phantom_index = np.rint(np.linalg.solve(phantom.affine, lps)[:3]).astype(int)
    inside = np.all((phantom_index >= 0) & (phantom_index < np.array(
        phantom.lesion_mask.shape)[:, None]), axis=0)
    mask = np.zeros(index.shape[1], dtype=bool)
    mask[inside] = phantom.lesion_mask[tuple(phantom_index[:, inside])]
    return mask.reshape(shape)


@pytest.fixture(scope="module")
def cam_hits(phantom_series: PhantomFactory, engine: Engine
             ) -> dict[str, dict[str, tuple[int, int]]]:
    """Per map and class: (lesion slices whose map peak lies in the dilated lesion mask, lesion
    slices), over axial DICOM phantoms, with the map brought back to the source slices."""
    counts: dict[str, dict[str, tuple[int, int]]] = {m: {} for m in ("hirescam", "gradcam")}
    for label in ("cSVD", "MS"):
        hits = dict.fromkeys(counts, 0)
        total = 0
        for seed in SEEDS:
            volume = load_series_volume(phantom_series(label=label, seed=seed))
            prepared = preprocess(volume.array, volume.affine_lps, engine.info.preprocessing)
            output = engine.run(prepared.model_input[None])
            mask = _mask_on_source_grid(label, seed, volume.affine_lps, volume.array.shape)
            for name in counts:
                cam = cam_to_source(output.explanation(name)[0], prepared)
                h, n = cam_peak_hits(cam, mask, CAM_RADIUS_PX)
                hits[name] += h
            total += n
        for name in counts:
            counts[name][label] = (hits[name], total)
    return counts


def test_bundled_model_hirescam_peaks_in_lesions_for_each_class(
        cam_hits: dict[str, dict[str, tuple[int, int]]]) -> None:
    rates = {label: hits / total for label, (hits, total) in cam_hits["hirescam"].items()}
    print(f"map peak in the dilated lesion mask: {cam_hits}")
    assert all(total >= 20 for _, total in cam_hits["hirescam"].values())
    for label, floor in FLOOR.items():
        assert rates[label] >= floor, rates
    # HiResCAM is the faithful map of this head: it beats Grad-CAM on each class
    for label, (hits, _) in cam_hits["gradcam"].items():
        assert cam_hits["hirescam"][label][0] > hits
