"""Service settings: environment variables prefixed ``FLAIRCAD_`` (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "flaircad-demo.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAIRCAD_", protected_namespaces=())

    model_path: Path = Field(BUNDLED_MODEL, description="ONNX model; default: the bundled demo")
    providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    flair_rules: Path | None = Field(
        None,
        description="FLAIR series-selection rules (JSON, schema in service/flair.py); default: "
        "the packaged service/rules/flair.json",
    )
    accept_non_flair: bool = Field(
        False,
        description="research override: run series that no FLAIR rule matches instead of "
        "refusing them (not_flair, HTTP 422)",
    )
