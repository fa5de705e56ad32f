"""The service runs on onnxruntime + numpy: importing it must not need torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
import model_export.phantoms  # the phantom generator is numpy + pydicom only
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
