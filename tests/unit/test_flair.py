"""FLAIR selection: rules are data (the packaged JSON or another file), with AND/OR/NOT, regex
and numeric ranges; the API-side decision and its research override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.core.codes import Code
from service.core.config import Settings
from service.core.flair import (
    DEFAULT_RULES_PATH,
    FlairMatch,
    RulesError,
    flair_rejection,
    is_flair,
    load_rules,
    parse_rules,
    selection_attributes,
)
from tests.conftest import PhantomFactory


def attrs(**values: Any) -> dict[str, Any]:
    return {"Modality": "MR", **values}


@pytest.mark.parametrize("variant", ["axial", "sagittal", "oblique"])
def test_phantom_series_are_flair_by_name(phantom_series: PhantomFactory, variant: str) -> None:
    ds = pydicom.dcmread(next(phantom_series(variant).iterdir()), stop_before_pixels=True)
    assert is_flair(selection_attributes(ds)) == FlairMatch(True, "flair_by_name")


@pytest.mark.parametrize(
    ("attributes", "rule"),
    [
        (attrs(SeriesDescription="t2_tirm_tra_dark-fluid"), "flair_by_name"),
        (attrs(ProtocolName="Sag CUBE FLAIR"), "flair_by_name"),
        (attrs(SeriesDescription="3D_Brain_VIEW_FLAIR_SHC"), "flair_by_name"),
        (attrs(SeriesDescription="t2_tirm_tra", InversionTime=2500.0), "tirm_long_ti"),
        (attrs(SeriesDescription="AX T2 IR", ScanningSequence=["SE", "IR"], InversionTime=2500.0,
               EchoTime=100.0), "inversion_recovery_long_ti_long_te"),
        (attrs(SeriesDescription="anon", SequenceName="*spcir_278", InversionTime=1800.0,
               EchoTime=388.0), "inversion_recovery_long_ti_long_te"),
        # not FLAIR
        (attrs(SeriesDescription="AX T1 FLAIR", InversionTime=860.0), None),
        (attrs(SeriesDescription="t2_tirm_cor_stir", InversionTime=150.0), None),
        (attrs(SeriesDescription="t2_spc_da-fl_DIR", InversionTime=3000.0,
               ScanningSequence=["SE", "IR"], EchoTime=300.0), None),
        (attrs(SeriesDescription="MPRAGE", ScanningSequence=["GR", "IR"], InversionTime=900.0,
               EchoTime=2.4), None),
        ({"Modality": "CT", "SeriesDescription": "FLAIR"}, None),
        (attrs(SeriesDescription="AX T2 TSE", EchoTime=100.0), None),
    ],
)
def test_default_rules(attributes: dict[str, Any], rule: str | None) -> None:
    assert is_flair(attributes) == FlairMatch(rule is not None, rule)


def test_enhanced_header_attributes(dicom_samples: Path) -> None:
    """Enhanced MR keeps sequence facts in functional groups; the rules still see them."""
    (path,) = (dicom_samples / "siemens_xa30_t1w_mprage_enhanced" / "dicom").iterdir()
    values = selection_attributes(pydicom.dcmread(path, stop_before_pixels=True))
    assert values["SequenceName"] == "*tfl3d1_16ns"
    assert values["InversionTime"] == 900.0 and "IR" in values["ScanningSequence"]
    assert values["EchoTime"] == pytest.approx(2.41)
    assert is_flair(values) == FlairMatch(False, None)  # a T1 MPRAGE


def test_samples_are_not_flair(dicom_samples: Path) -> None:
    for folder in sorted(dicom_samples.glob("*/dicom")):
        ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        assert not is_flair(selection_attributes(ds)).is_flair, folder


def test_condition_semantics() -> None:
    rules = parse_rules({"version": 1, "rules": [
        {"name": "both", "when": {"all": [
            {"attribute": "A", "range": [1, None]},
            {"any": [{"attribute": "B", "equals": "x"}, {"attribute": "C", "present": True}]},
            {"not": {"attribute": "D", "regex": "^no"}},
        ]}},
        {"name": "list", "when": {"attribute": "L", "contains": "IR"}},
    ]})
    assert rules.evaluate({"A": "2", "B": "X"}).rule == "both"  # numbers from strings, case
    assert rules.evaluate({"A": 2, "C": "anything"}).rule == "both"
    assert rules.evaluate({"A": 0.5, "B": "x"}).rule is None  # below the range
    assert rules.evaluate({"A": 2, "B": "x", "D": "NOPE"}).rule is None  # regex ignores case
    assert rules.evaluate({"B": "x"}).rule is None  # missing attribute: leaf false
    assert rules.evaluate({"L": ["SE", "IR"]}).rule == "list"
    assert rules.evaluate({"L": ["SE", "GR"]}).rule is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rules": []}, "version"),
        ({"version": 1, "rules": []}, "non-empty"),
        ({"version": 1, "rules": [{"when": {}}]}, "name"),
        ({"version": 1, "rules": [{"name": "a"}]}, "when"),
        ({"version": 1, "rules": [{"name": "a", "when": {"attribute": "X"}}]}, "exactly one"),
        ({"version": 1, "rules": [{"name": "a", "when": {"attribute": "X", "regex": "("}}]},
         "bad regex"),
        ({"version": 1, "rules": [{"name": "a", "when": {"attribute": "X", "range": [1]}}]},
         "range"),
        ({"version": 1, "rules": [{"name": "a", "when": {"all": []}}]}, "non-empty list"),
    ],
)
def test_invalid_rules_are_refused_with_a_reason(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(raw)


def test_rules_file_from_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = tmp_path / "rules.json"
    custom.write_text(json.dumps({"version": 1, "rules": [
        {"name": "t1_for_research", "when": {"attribute": "SeriesDescription",
                                             "regex": "mprage"}}]}))
    monkeypatch.setenv("FLAIRCAD_FLAIR_RULES", str(custom))
    monkeypatch.setenv("FLAIRCAD_ACCEPT_NON_FLAIR", "1")
    settings = Settings()
    assert settings.flair_rules == custom and settings.accept_non_flair is True
    rules = load_rules(settings.flair_rules)
    assert rules.evaluate(attrs(SeriesDescription="MPRAGE")) == FlairMatch(
        True, "t1_for_research")
    assert load_rules().source == str(DEFAULT_RULES_PATH)


def test_the_default_rules_ship_in_the_package() -> None:
    assert DEFAULT_RULES_PATH.is_file()
    names = [rule.name for rule in load_rules().rules]
    assert names == ["flair_by_name", "tirm_long_ti", "inversion_recovery_long_ti_long_te"]


def test_api_decision_and_research_override() -> None:
    rejection = flair_rejection(FlairMatch(False, None))
    assert rejection is not None and rejection.code == Code.NOT_FLAIR
    assert "FLAIRCAD_ACCEPT_NON_FLAIR" in rejection.message
    assert flair_rejection(FlairMatch(False, None), accept_non_flair=True) is None
    assert flair_rejection(FlairMatch(True, "flair_by_name")) is None
