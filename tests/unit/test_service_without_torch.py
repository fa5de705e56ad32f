"""The service runs on onnxruntime + numpy: importing it must not need torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, BlockTorch())
import importlib, pkgutil, service
for module in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(module.name)  # every module of the service, routes included
import service.phantoms  # the phantom generator is numpy + pydicom only
assert "torch" not in sys.modules
print("ok")
"""


def test_service_imports_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_torch_import_statement_under_service() -> None:
    offenders = [
        str(path.relative_to(REPO)) for path in (REPO / "service").rglob("*.py")
        if any(line.strip().startswith(("import torch", "from torch"))
               for line in path.read_text().splitlines())
    ]
    assert offenders == []


def _runtime_requirements() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
            for spec in project["dependencies"]}


def test_every_module_the_service_imports_is_a_runtime_dependency() -> None:
    """`pip install .` (what the images do) must be enough to run every code path, the lazy
    imports inside functions included: httpx, used to deliver results, was a dev extra."""
    import ast
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    stdlib = sys.stdlib_module_names
    needed: dict[str, set[str]] = {}
    for path in (REPO / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top in ("service", "__future__"):
                    continue
                for dist in distributions.get(top, [top]):
                    needed.setdefault(dist.lower().replace("_", "-"), set()).add(
                        str(path.relative_to(REPO)))
    runtime = _runtime_requirements()
    # the installed name of a declared requirement, or what a declared one brings for sure
    provided_by = {"onnxruntime": "onnxruntime-gpu", "starlette": "fastapi"}
    # optional by design: pynvml (the `gpu` extra; metrics skip without it), yaml (the
    # developer command that writes openapi.yaml); flaircad itself (model_export, whose import
    # by the CLI is the layering issue's)
    optional = {"nvidia-ml-py", "pynvml", "pyyaml", "flaircad"}
    missing = {dist: sorted(files) for dist, files in needed.items()
               if dist not in optional and provided_by.get(dist, dist) not in runtime}
    assert missing == {}, f"imported by the service but not a runtime dependency: {missing}"
