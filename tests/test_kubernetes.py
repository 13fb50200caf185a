"""deploy/kubernetes, checked offline: Kubernetes schemas (kubernetes-validate), the kustomization's
resource list, and that Services, probes, ports and the frontend's Triton address agree."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deployment_settings import frontend_container, frontend_worst_case_mib, triton_container
from iei import settings as table
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import model_plans, triton_command
from iei.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported, newest kubernetes-validate knows
MANIFESTS = sorted(p for p in KUSTOMIZE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


KUSTOMIZATION = yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())
RESOURCES = [doc for path in MANIFESTS for doc in load_all(path)]


def only(kind: str, name: str) -> dict[str, Any]:
    [found] = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [found] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def environment(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e}


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def dockerfile_env(name: str) -> dict[str, str]:
    text = (ROOT / "docker" / name).read_text().replace("\\\n", " ")
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            pairs.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return pairs


def deployments_selected_by(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        r
        for r in RESOURCES
        if r["kind"] == "Deployment"
        and labels.items() <= r["spec"]["template"]["metadata"]["labels"].items()
    ]


TRITON = only("Deployment", "iei-triton")
FRONTEND = only("Deployment", "iei-frontend")
TRITON_SERVICE = only("Service", "iei-triton")


def test_the_kustomization_lists_every_manifest_and_nothing_else():
    listed = KUSTOMIZATION["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in MANIFESTS}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_for_kubernetes(path, version):
    for resource in load_all(path):
        kubernetes_validate.validate(resource, version, strict=True)


def test_validation_refuses_a_misspelt_field():
    broken = yaml.safe_load(yaml.safe_dump(TRITON))
    container(broken)["resource"] = container(broken).pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def kubectl() -> str | None:
    return shutil.which("kubectl")


@pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (its kustomize builds)")
def test_kustomize_builds_valid_resources():
    built = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE_DIR)], capture_output=True, text=True, check=True
    ).stdout
    resources = [doc for doc in yaml.safe_load_all(built) if doc]
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSIONS[-1], strict=True)
    config_maps = {r["metadata"]["name"] for r in resources if r["kind"] == "ConfigMap"}
    assert all(re.fullmatch(r"iei-\w+-\w+", name) for name in config_maps)  # hashed: rolls pods
    for deployment in (r for r in resources if r["kind"] == "Deployment"):
        for source in container(deployment)["envFrom"]:
            assert source["configMapRef"]["name"] in config_maps


def generated_settings() -> dict[str, dict[str, str]]:
    """ConfigMap name -> its variables, from kustomization.yaml."""
    return {
        g["name"]: dict(item.split("=", 1) for item in g["literals"])
        for g in KUSTOMIZATION["configMapGenerator"]
    }


def settings_of(deployment: dict[str, Any]) -> dict[str, str]:
    """Every variable a Deployment's container gets: its ConfigMaps, then its own env."""
    maps = generated_settings()
    found: dict[str, str] = {}
    for source in container(deployment)["envFrom"]:
        found.update(maps[source["configMapRef"]["name"]])
    for item in container(deployment).get("env", []):
        found[item["name"]] = item.get("value", "<from a Secret>")
    return found


@pytest.mark.parametrize(
    ("deployment", "expected"), [(TRITON, triton_container), (FRONTEND, frontend_container)],
    ids=["triton", "frontend"],
)  # fmt: skip
def test_every_setting_a_container_reads_reaches_it(deployment, expected):
    assert expected() <= set(settings_of(deployment))


def test_the_generated_settings_are_the_tables_defaults():
    for name, variables in generated_settings().items():
        for variable, value in variables.items():
            shown = table.as_env_value(table.by_env(variable).default)
            assert value == shown, f"{name}: {variable}={value}, the default is {shown!r}"


def test_the_api_key_comes_from_a_secret_never_a_literal():
    [key] = [e for e in container(FRONTEND)["env"] if e["name"] == "IEI_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "value" not in key
    assert all("IEI_API_KEY" not in variables for variables in generated_settings().values())


def test_every_variable_is_in_the_settings_table_and_read_by_a_container():
    generated = {g["name"]: g for g in KUSTOMIZATION["configMapGenerator"]}
    shared = [item.split("=", 1)[0] for item in generated["iei-model"]["literals"]]
    own = {
        "triton": [e["name"] for e in container(TRITON).get("env", [])],
        "frontend": [e["name"] for e in container(FRONTEND).get("env", [])],
    }
    readers = {"triton": {table.LAUNCHER, table.MODEL}, "frontend": {table.SERVER}}
    for variable in shared:  # the ConfigMap goes to both containers: one of them reads it
        entry = table.by_env(variable)
        assert entry is not None, f"{variable} is not a setting"
        assert set(entry.readers) & (readers["triton"] | readers["frontend"]), variable
    for name, variables in own.items():
        for variable in (v for v in variables if v.startswith(("IEI_", "IMAGE_"))):
            entry = table.by_env(variable)
            assert entry is not None, f"{name}: {variable} is not a setting"
            image_reads = name == "frontend" and variable == "IEI_WORKERS"  # uvicorn's flag
            assert readers[name] & set(entry.readers) or image_reads, f"{name}: {variable}"


def test_images_are_those_compose_builds():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    built = dict(compose[name]["image"].split(":") for name in ("triton", "frontend"))
    tags = {image["name"]: image["newTag"] for image in KUSTOMIZATION["images"]}
    assert tags == built
    assert {container(d)["image"] for d in (TRITON, FRONTEND)} == set(built)


@pytest.mark.parametrize("deployment", [TRITON, FRONTEND], ids=["triton", "frontend"])
def test_each_deployment_selects_its_own_pods(deployment):
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployments_selected_by(selector) == [deployment]


@pytest.mark.parametrize(
    "service", [r for r in RESOURCES if r["kind"] == "Service"], ids=lambda s: s["metadata"]["name"]
)
def test_services_select_one_deployment_and_target_its_ports(service):
    [deployment] = deployments_selected_by(service["spec"]["selector"])
    ports = container_ports(deployment)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, f"{port['targetPort']} is no container port"
        assert port["port"] == ports[port["targetPort"]]  # one port number inside and out


@pytest.mark.parametrize("kind", ["HorizontalPodAutoscaler", "PodDisruptionBudget"])
@pytest.mark.parametrize("deployment", [TRITON, FRONTEND], ids=["triton", "frontend"])
def test_autoscalers_and_budgets_cover_each_deployment(kind, deployment):
    resource = only(kind, deployment["metadata"]["name"])
    if kind == "HorizontalPodAutoscaler":
        target = resource["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert resource["spec"]["minReplicas"] <= resource["spec"]["maxReplicas"]
    else:
        assert deployments_selected_by(resource["spec"]["selector"]["matchLabels"]) == [deployment]


def probe_port(probe: dict[str, Any]) -> str:
    return (probe.get("httpGet") or probe.get("tcpSocket"))["port"]


def test_triton_probes_use_its_health_endpoints_on_its_http_port():
    triton = container(TRITON)
    for name in ("startupProbe", "readinessProbe"):
        assert triton[name]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(triton[name]) == "http"
    startup = triton["startupProbe"]
    # The launcher waits for the model nearly as long as the probe allows (at 600 s of 900 a
    # download of 11 minutes restarted the pod for ever), and still gives up first, with its
    # own one-line error, not the kubelet's silent restart.
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert window - 120 <= float(settings_of(TRITON)["IEI_STARTUP_TIMEOUT"]) < window


def test_triton_s_liveness_outlasts_a_restart_inside_the_pod():
    """The launcher's restart of Triton (stop, a back-off, the model's load) keeps /v2/health/live
    silent for up to IEI_STARTUP_TIMEOUT: a 60 s liveness window killed the container meanwhile."""
    from iei.launcher.supervisor import TritonSupervisor

    liveness = container(TRITON)["livenessProbe"]
    window = liveness["periodSeconds"] * liveness["failureThreshold"]
    restart = 5 + TritonSupervisor.MAX_DELAY + float(settings_of(TRITON)["IEI_STARTUP_TIMEOUT"])
    assert window >= restart


def test_triton_listens_where_its_container_ports_say(monkeypatch):
    for name, value in environment(TRITON).items():
        monkeypatch.setenv(name, value)
    argv = triton_command(LauncherSettings(), Path("/repo"))
    ports = container_ports(TRITON)
    assert f"--http-port={ports['http']}" in argv
    assert f"--grpc-port={ports['grpc']}" in argv
    assert f"--metrics-port={ports['metrics']}" in argv
    assert "--http-address=0.0.0.0" in argv
    annotations = TRITON["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_triton_runs_iei_triton_on_one_gpu_with_shared_memory_and_a_model_cache():
    triton = container(TRITON)
    assert triton["args"] == ["iei", "triton"] and "command" not in triton  # NGC entrypoint stays
    resources = triton["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    volumes = {v["name"]: v for v in TRITON["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in triton["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in mounts[dockerfile_env("triton.Dockerfile")["HF_HOME"]]


def test_the_stubs_a_triton_restart_leaves_behind_are_reaped():
    """`iei triton` ran as the pod's PID 1 and waits for its own children only: the stubs of each
    restarted Triton stayed zombies (compose has `init: true`)."""
    assert TRITON["spec"]["template"]["spec"]["shareProcessNamespace"] is True


def test_triton_s_shared_memory_fits_the_split_layout_with_large_photos_and_its_memory_limit():
    from test_deploy import split_layout_shm_gib

    triton = container(TRITON)
    volumes = {v["name"]: v for v in TRITON["spec"]["template"]["spec"]["volumes"]}
    [shm] = [volumes[m["name"]] for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    size = gibibytes(shm["emptyDir"]["sizeLimit"])
    needed = split_layout_shm_gib(gpus=int(triton["resources"]["limits"]["nvidia.com/gpu"]))
    assert needed <= size <= needed + 2
    # A memory-backed emptyDir counts against the container's memory limit: room beside it for
    # the processes (16 preprocessing stubs with torch, the encoder, Triton).
    assert gibibytes(triton["resources"]["limits"]["memory"]) >= size + 16


def gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(quantity)).groups()
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return float(number) * scale / 2**30


def test_the_frontend_calls_the_triton_service_on_its_http_port():
    url = environment(FRONTEND)["IEI_TRITON_URL"]
    [http] = [p for p in TRITON_SERVICE["spec"]["ports"] if p["targetPort"] == "http"]
    assert url == f"{TRITON_SERVICE['metadata']['name']}:{http['port']}"
    assert LauncherSettings(triton_url=url).triton_endpoint == url


def test_the_frontend_reads_long_executions_on_the_triton_services_metrics_port():
    url = environment(FRONTEND)["IEI_TRITON_METRICS_URL"]
    [metrics] = [p for p in TRITON_SERVICE["spec"]["ports"] if p["targetPort"] == "metrics"]
    assert url == f"{TRITON_SERVICE['metadata']['name']}:{metrics['port']}"
    assert ServerSettings(triton_metrics_url=url).triton_metrics_url == url


def test_the_frontend_probes_its_own_port_and_stays_alive_while_triton_is_down():
    frontend = container(FRONTEND)
    assert frontend["readinessProbe"]["httpGet"]["path"] == "/health"  # the model answers
    assert frontend["livenessProbe"]["httpGet"]["path"] == "/live"  # the process answers
    ports = container_ports(FRONTEND)
    for name in ("readinessProbe", "livenessProbe"):
        assert probe_port(frontend[name]) in ports
    [cmd] = [
        json.loads(line.removeprefix("CMD "))
        for line in (ROOT / "docker" / "frontend.Dockerfile").read_text().splitlines()
        if line.startswith("CMD ")
    ]
    command = shlex.split(cmd[-1])
    assert int(command[command.index("--port") + 1]) == ports["http"]


def test_the_frontend_runs_as_non_root_on_a_read_only_root_filesystem():
    pod = FRONTEND["spec"]["template"]["spec"]
    frontend = container(FRONTEND)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert frontend["securityContext"]["readOnlyRootFilesystem"] is True
    assert frontend["securityContext"]["allowPrivilegeEscalation"] is False
    # where it writes (Prometheus' multiprocess files) is a volume
    metrics_dir = dockerfile_env("frontend.Dockerfile")["PROMETHEUS_MULTIPROC_DIR"]
    assert any(metrics_dir.startswith(m["mountPath"] + "/") for m in frontend["volumeMounts"])


@pytest.mark.parametrize("deployment", [TRITON, FRONTEND], ids=["triton", "frontend"])
def test_every_container_requests_resources_and_limits_memory(deployment):
    resources = container(deployment)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_the_triton_autoscaler_s_metric_is_defined_for_the_prometheus_adapter():
    values = yaml.safe_load((KUSTOMIZE_DIR / "prometheus-adapter" / "values.yaml").read_text())
    defined = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    [metric] = only("HorizontalPodAutoscaler", "iei-triton")["spec"]["metrics"]
    rule = defined[metric["pods"]["metric"]["name"]]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]


CLIP_CONFIG = {"model_type": "clip", "text_config": {}, "vision_config": {}}


def test_the_autoscaler_s_requests_count_each_request_once_in_the_split_layout(tmp_path):
    """The queue time sums every model's queues; the requests leave out the split layout's steps
    (each request to an ensemble is one to each step too), and only them."""
    values = yaml.safe_load((KUSTOMIZE_DIR / "prometheus-adapter" / "values.yaml").read_text())
    [query] = [rule["metricsQuery"] for rule in values["rules"]["custom"]]
    [steps] = re.findall(r'nv_inference_request_success\{[^}]*model!~"([^"]+)"', query)
    for name in ("first", "dino", "clip"):
        (tmp_path / name).mkdir()
        config = {"model_type": "vit"} if name != "clip" else CLIP_CONFIG
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    models = f"{tmp_path / 'first'},dino={tmp_path / 'dino'},clip={tmp_path / 'clip'}"
    plans = model_plans(LauncherSettings(models=models, triton_layout="split"), gpus=1)
    names = [name for plan in plans for name in plan.triton_models]
    counted = [name for name in names if not re.fullmatch(steps, name)]
    assert counted == ["iei", "iei__dino", "iei__clip", "iei__clip_text"], names
    assert len(names) == len(counted) + 2 * len(plans)  # two steps per image model


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def test_the_frontends_memory_limit_holds_what_its_workers_may_hold():
    """Every worker at its IEI_BODY_WORKER_MAX_BYTES and IEI_URL_WORKER_MAX_BYTES at once, with
    the resident bytes each byte costs (measured), stays under the container's limit."""
    limit = mebibytes(container(FRONTEND)["resources"]["limits"]["memory"])
    worst = frontend_worst_case_mib(settings_of(FRONTEND))
    assert worst <= limit, f"{worst:.0f} MiB worst case > the {limit:.0f} MiB limit"
    body_budget = int(settings_of(FRONTEND)["IEI_BODY_WORKER_MAX_BYTES"])
    assert body_budget >= int(settings_of(FRONTEND)["IEI_PAYLOAD_LIMIT"])  # one body fits
