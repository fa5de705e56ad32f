"""``openapi.yaml`` is the app's own schema: regenerate it with
``python -m service.api.openapi > openapi.yaml`` when routes or models change."""

from __future__ import annotations

import yaml

from service.api.openapi import document
from tests.conftest import REPO


def test_openapi_yaml_matches_the_app() -> None:
    committed = yaml.safe_load((REPO / "openapi.yaml").read_text())
    assert committed == document(), (
        "openapi.yaml is stale: run `python -m service.api.openapi > openapi.yaml`")


def test_every_documented_route_exists() -> None:
    paths = document()["paths"]
    for path, method in [("/dicomweb/studies", "post"), ("/dicomweb/studies/{study}", "post"),
                         ("/v1/analyses", "post"), ("/v1/analyses", "get"),
                         ("/v1/analyses/{analysis_id}", "get"),
                         ("/v1/analyses/{analysis_id}/instances", "get"),
                         ("/v1/analyses/{analysis_id}/preview.png", "get"),
                         ("/v1/model", "get"), ("/healthz", "get"), ("/readyz", "get"),
                         ("/metrics", "get")]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} is not documented"
