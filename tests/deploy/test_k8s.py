"""k8s/: both kustomize overlays render, every object validates against the Kubernetes JSON
schemas (kubernetes-validate, offline, strict), and the objects agree with each other and with
the image and the service (ports, labels, probes, settings, security context).

The renderer is ``kustomize build`` or ``kubectl kustomize`` with kustomize >= v4 (the overlays use
``resources:`` directories, ``patches:`` and ``labels:``). Debian bookworm's ``kubernetes-client``
(kubectl 1.20, kustomize v2.0.3) is too old for them, so ``.ci/run`` installs no renderer: the
test needs one on PATH (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, require

K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
# Oldest and newest Kubernetes minor versions validated against (kubernetes-validate's schemas).
K8S_VERSIONS = ("1.29.0", "1.33.0")
FLAIRCAD_UID = 10001
SPOOL = "/var/lib/flaircad"


def _kustomize_version(command: list[str]) -> tuple[int, ...] | None:
    """The kustomize version behind ``command`` (a standalone kustomize or kubectl)."""
    if command[0] == "kustomize":
        out = subprocess.run(["kustomize", "version"], capture_output=True, text=True,
                             check=False).stdout
    else:
        out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True,
                             check=False).stdout
        if "Kustomize Version" not in out:  # kubectl < 1.24 does not print it
            minor = re.search(r"Minor:\"(\d+)|v1\.(\d+)\.", out)
            if not minor:
                return None
            # kubectl 1.21-1.23 embed kustomize v4; 1.14-1.20 embed v2.0.3
            return (4,) if int(minor.group(1) or minor.group(2)) >= 21 else (2, 0, 3)
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out[out.find("ustomize"):] if "ustomize" in out
                      else out)
    return tuple(int(part) for part in match.groups()) if match else None


@functools.cache
def _renderer() -> tuple[list[str] | None, str]:
    found = []
    for command in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(command[0]):
            version = _kustomize_version(command)
            found.append(f"{' '.join(command)} (kustomize {version})")
            if version and version >= (4,):
                return command, found[-1]
    return None, "; ".join(found) or "neither kustomize nor kubectl is on PATH"


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    command, what = _renderer()
    require(command, "no kustomize >= v4 to render k8s/ (kustomize build or kubectl >= 1.21; "
            f"found: {what})")
    assert command is not None
    run = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr  # no deprecated kustomize fields
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


def _objects(overlay: str) -> dict[str, dict[str, Any]]:
    objects = {}
    for doc in _render(overlay):
        key = doc["kind"]
        assert key not in objects, f"two {key} objects"
        objects[key] = doc
    return objects


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    kinds = {doc["kind"] for doc in _render(overlay)}
    assert kinds == {"ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment",
                     "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                     "ServiceMonitor"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay: str,
                                                              version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = []
    for doc in _render(overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_servicemonitor_against_its_crd_schema
        # strict: unknown fields are errors, as kubectl's validation makes them
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert len(checked) == 8, checked


def test_servicemonitor_against_its_crd_schema() -> None:
    pytest.skip("the prometheus-operator CRD schema is not available from a package registry "
                "usable here (kubernetes-validate ships core schemas only; the CRD YAML lives "
                "in the prometheus-operator repository, and npm's @kubernetes-models/"
                "prometheus-operator ships it as JavaScript validators only). The ServiceMonitor "
                "is checked field by field in test_servicemonitor_scrapes_the_service instead.")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_security_probes_and_volumes(overlay: str) -> None:
    objects = _objects(overlay)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    assert "replicas" not in objects["Deployment"]["spec"]  # the HPA owns it
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == FLAIRCAD_UID  # the image's USER
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]

    [port] = container["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in
              ("startup", "liveness", "readiness")}
    assert probes["startup"]["path"] == probes["liveness"]["path"] == "/healthz"
    assert probes["readiness"]["path"] == "/readyz"
    assert {probe["port"] for probe in probes.values()} == {"http"}

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[SPOOL]] and "emptyDir" in volumes[mounts["/tmp"]]
    # Everything the read-only root leaves writable: the spool, /tmp, nothing else.
    writable = [path for path, name in mounts.items() if "emptyDir" in volumes[name]]
    assert sorted(writable) == ["/tmp", SPOOL]
    grace = pod["terminationGracePeriodSeconds"]
    settings = objects["ConfigMap"]["data"]
    assert float(settings["FLAIRCAD_SHUTDOWN_GRACE_S"]) + 5 < grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_configmap_and_api_key_secret_are_wired(overlay: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.config import Settings

    objects = _objects(overlay)
    container = _container(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    configmap, secret = objects["ConfigMap"], objects["Secret"]
    # Generated names carry a content hash; the Deployment must refer to the rendered ones.
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    data = configmap["data"]
    assert data["FLAIRCAD_SPOOL_DIR"] == SPOOL
    keys_file = Path(data["FLAIRCAD_API_KEYS_FILE"])
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    assert mount["readOnly"] is True and keys_file.parent == Path(mount["mountPath"])
    assert keys_file.name in secret["data"]

    # Every variable is a real setting, and the values parse as the service parses them.
    known = {f"FLAIRCAD_{name.upper()}" for name in Settings.model_fields}
    env = {**data, **{item["name"]: item["value"] for item in container.get("env", [])}}
    for name, value in env.items():
        assert name in known, f"{name} is not a setting of service/core/config.py"
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.spool_dir) == SPOOL and settings.host == "0.0.0.0"
    assert not settings.auth_disabled and settings.api_keys_file == keys_file
    # The committed placeholder holds no key: the service refuses to start until one is given.
    import base64

    from service.runtime.auth import parse_keys
    assert not parse_keys(base64.b64decode(secret["data"][keys_file.name]).decode(), "secret")
    expected = {"cpu": ["CPUExecutionProvider"],
                "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[overlay]
    assert settings.providers == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_networkpolicy_select_the_pods(overlay: str) -> None:
    objects = _objects(overlay)
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": "http",
                                 "protocol": "TCP"}]
    assert service["sessionAffinity"] == "ClientIP"
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] == 1

    policy = objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    # Namespaces only (PACS/viewers by label, Prometheus in monitoring): no open rule, no CIDR.
    assert all("namespaceSelector" in peer and "ipBlock" not in peer for peer in sources)
    selectors = [peer["namespaceSelector"]["matchLabels"] for peer in sources]
    assert {"flaircad.io/client": "true"} in selectors
    assert {"kubernetes.io/metadata.name": "monitoring"} in selectors
    assert all(rule["ports"] == [{"port": "http", "protocol": "TCP"}]
               for rule in policy["ingress"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_service(overlay: str) -> None:
    objects = _objects(overlay)
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= objects["Service"]["metadata"][
        "labels"].items()
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] in {port["name"] for port in objects["Service"]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


def test_cpu_overlay_scales_on_cpu_and_has_no_gpu() -> None:
    objects = _objects("cpu")
    container = _container(objects)
    assert container["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in objects["Deployment"]["spec"]["template"]["spec"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": objects["Deployment"]["metadata"]["name"]}
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in container["resources"]["requests"]  # utilisation is of the request
    assert hpa["minReplicas"] >= 2


def test_gpu_overlay_requests_one_gpu_and_scales_on_queue_depth() -> None:
    objects = _objects("gpu")
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists",
            "effect": "NoSchedule"} in pod["tolerations"]
    # The patch merged into the base container instead of replacing it.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "flaircad_queue_depth"

    # prometheus-adapter serves that metric name from the series the service exports.
    values = yaml.safe_load((K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml")
                            .read_text())
    [rule] = values["rules"]["custom"]
    assert rule["name"]["as"] == "flaircad_queue_depth"
    assert rule["seriesQuery"].startswith("flaircad_queue_depth{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    from service.runtime import metrics
    assert "flaircad_queue_depth" in {metric._name for metric in vars(metrics).values()
                                      if hasattr(metric, "_name")}
