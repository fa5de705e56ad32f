"""The ONNX contract exists once: no module but ``service/core/contract.py`` spells an input or
output name or a metadata key as a string; the export and the engine import them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from service.core import contract
from service.core.contract import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    REQUIRED_METADATA,
    Explanation,
    Meta,
    PreprocessingConfig,
)
from service.core.preprocess import PreprocessingConfig as ReExported
from tests.conftest import REPO

CONTRACT = REPO / "service" / "core" / "contract.py"
# ``name`` and ``outputs`` are metadata keys too, but also ordinary words (a rule's name, a
# metric label; an analysis' result outputs): they are not contract names anywhere else
_ORDINARY = {Meta.NAME.value, Meta.OUTPUTS.value}
# the same word for another thing, where a contract member would say something false:
# (file, string, what it is there)
_ELSEWHERE = {
    ("service/pipeline/analysis.py", "volume", "a timing stage"),
    ("service/pipeline/analysis.py", "probabilities", "a field of the result JSON"),
    ("service/pipeline/analysis.py", "slice_weights", "a field of the result JSON"),
    ("service/pipeline/analysis.py", "calibration", "a field of the result JSON"),
    ("service/runtime/app.py", "model_version", "a field of the 'ready' log line"),
    ("model_export/evaluate.py", "class_names", "a field of the evaluation report"),
    ("model_export/evaluate.py", "source_checkpoint_sha256", "a field of the evaluation report"),
    ("model_export/model.py", "spatial_attention", "the pretrain checkpoint's attention weights"),
    ("model_export/pretrain.py", "spatial_attention", "the pretrain checkpoint's attention "
     "weights"),
    ("model_export/train.py", "calibration", "a field of a fold's report (metrics.json)"),
    ("model_export/train.py", "out_of_distribution", "a field of a fold's report"),
    ("model_export/train.py", "class_names", "a field of metrics.json"),
}


def _contract_names() -> set[str]:
    return ({*INPUT_NAMES, *OUTPUT_NAMES, *REQUIRED_METADATA, *(m.value for m in Meta)}
            - _ORDINARY)


def _spelled(path: Path, names: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in docstrings}


def test_no_module_but_the_contract_spells_a_contract_name() -> None:
    names = _contract_names()
    allowed = {(file, text) for file, text, _ in _ELSEWHERE}
    offenders: dict[str, list[str]] = {}
    for folder in ("service", "model_export"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == CONTRACT:
                continue
            relative = path.relative_to(REPO).as_posix()
            spelled = {text for text in _spelled(path, names) if (relative, text) not in allowed}
            if spelled:
                offenders[relative] = sorted(spelled)
    assert offenders == {}, "spell these through service.core.contract"


def test_the_exceptions_are_still_needed() -> None:
    """An allowance that no longer matches anything is removed, so none hides a new use."""
    for file, text, _ in _ELSEWHERE:
        assert text in _spelled(REPO / file, _contract_names()), (file, text)


def test_the_contract_holds_the_preprocessing_and_the_explanations() -> None:
    assert ReExported is PreprocessingConfig and PreprocessingConfig.__module__ == contract.__name__
    assert set(contract.EXPLANATIONS) == {e.value for e in Explanation}
    assert contract.DEFAULT_EXPLANATION in contract.EXPLANATIONS
    # the maps a model offers are outputs of the graph, except attention (computed from two)
    assert {Explanation.HIRESCAM.value, Explanation.GRADCAM.value} <= set(OUTPUT_NAMES)
    # the outputs metadata describes every output and the target_class input, as shipped
    described = contract.io_descriptions()
    assert set(described) == {*OUTPUT_NAMES, INPUT_NAMES[1]}
    assert all(type(key) is str for key in described)
    json.dumps(described)
