"""The layers of issue 14 are enforced, not hoped for: ``lint-imports`` keeps every contract of
pyproject.toml's ``[tool.importlinter]``, each layer under ``service/`` is named by one, and
mypy's strict overrides cover service.core and service.pipeline. mypy itself runs in
``make lint`` (too slow for the suite); these checks are cheap, so a removed contract or a
dropped strict override fails here too."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def _contracts() -> list[dict[str, Any]]:
    contracts: list[dict[str, Any]] = _pyproject()["tool"]["importlinter"]["contracts"]
    return contracts


def _layers() -> set[str]:
    """Every package directly under service/ (a new one must be placed in the contracts)."""
    return {f"service.{path.parent.name}" for path in (REPO / "service").glob("*/__init__.py")}


def _forbidden(source: str) -> set[str]:
    """What the forbidden contracts say ``source`` must not import."""
    return {module for contract in _contracts() if contract["type"] == "forbidden"
            and source in contract["source_modules"] for module in contract["forbidden_modules"]}


def test_lint_imports_keeps_every_contract() -> None:
    assert LINT_IMPORTS.exists(), "import-linter is in the dev extra: `make test` installs it"
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout


def test_core_imports_no_other_layer() -> None:
    assert _forbidden("service.core") >= (_layers() - {"service.core"}) | {
        "service.cli", "model_export"}


def test_phantoms_pipeline_and_storage_import_only_core() -> None:
    others = _layers() | {"service.cli", "model_export"}
    assert _forbidden("service.phantoms") >= others - {"service.core", "service.phantoms"}
    for layer in ("service.pipeline", "service.storage"):
        # each other's independence is a contract of its own (below)
        assert _forbidden(layer) >= others - {"service.core", "service.pipeline",
                                              "service.storage"}
    assert any(contract["type"] == "independence"
               and set(contract["modules"]) == {"service.pipeline", "service.storage"}
               for contract in _contracts())


def test_the_service_never_imports_model_export_or_torch() -> None:
    assert _pyproject()["tool"]["importlinter"]["include_external_packages"] is True
    assert _forbidden("service") >= {"model_export", "torch"}


def test_only_the_app_imports_the_api() -> None:
    (contract,) = [contract for contract in _contracts() if contract["type"] == "protected"
                   and contract["protected_modules"] == ["service.api"]]
    assert contract["allowed_importers"] == ["service.runtime.app"]


def test_model_export_uses_only_core_phantoms_and_pipeline() -> None:
    allowed = {"service.core", "service.phantoms", "service.pipeline"}
    assert _forbidden("model_export") >= (_layers() - allowed) | {"service.cli"}


def test_the_layers_run_in_one_line_with_few_exceptions() -> None:
    """The data path as a layers contract (api over intake over runtime over pipeline,
    storage and phantoms over core), every package in it, and only the composition imports
    named as exceptions: a new upward import breaks the contract instead of joining a list."""
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    named = {part.strip() for layer in layers["layers"] for part in layer.split("|")}
    assert named == _layers() | {"service.cli"}
    assert [layer.split("|")[0].strip() for layer in layers["layers"]] == [
        "service.cli", "service.api", "service.intake", "service.runtime", "service.pipeline",
        "service.core"]
    assert sorted(layers["ignore_imports"]) == [
        "service.runtime.app -> service.api.**",
        "service.runtime.forward -> service.intake.multipart",
        "service.runtime.pacs -> service.intake.dimse"]


def test_mypy_is_strict_for_core_and_pipeline() -> None:
    mypy = _pyproject()["tool"]["mypy"]
    assert mypy["plugins"] == ["pydantic.mypy"]
    assert mypy["warn_unused_ignores"] is True
    assert "ignore-without-code" in mypy["enable_error_code"]
    assert "ignore_missing_imports" not in mypy  # per untyped package, never for all
    strict = {module for override in mypy["overrides"] if override.get("strict") is True
              for module in override["module"]}
    assert {"service.core.*", "service.pipeline.*"} <= strict


def test_make_lint_runs_before_the_tests_in_ci() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nlint: $(STAMP)\n", 1)[1].split("\n\n", 1)[0]
    for tool in ("ruff check", "lint-imports", "mypy service model_export"):
        assert tool in recipe
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci.index("make lint") < ci.index("make test")
