"""deploy/kubernetes/ray (KubeRay's RayJob for `iei embed --ray`) and docker/ray.Dockerfile,
checked offline: the pod templates against Kubernetes' schemas, the entrypoint against the
`iei` command's own parser, and the Ray version against the `ray` extra's pin."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from iei.cli import parser

ROOT = Path(__file__).resolve().parents[1]
RAYJOB = ROOT / "deploy" / "kubernetes" / "ray" / "rayjob-embed.yaml"
DOCKERFILE = ROOT / "docker" / "ray.Dockerfile"
JOB = yaml.safe_load(RAYJOB.read_text())
CLUSTER = JOB["spec"]["rayClusterSpec"]
GROUPS = [CLUSTER["headGroupSpec"], *CLUSTER["workerGroupSpecs"]]


def ray_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    [pin] = [r for r in extras["ray"] if r.startswith("ray[data]==")]
    return pin.split("==")[1]


def test_it_is_a_rayjob_of_kuberay_s_api():
    assert JOB["apiVersion"] == "ray.io/v1" and JOB["kind"] == "RayJob"
    assert JOB["spec"]["shutdownAfterJobFinishes"] is True  # no cluster left behind


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_each_pod_template_is_a_valid_pod(group, version):
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "iei-ray"},
        "spec": GROUPS[group]["template"]["spec"],
    }
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_entrypoint_is_a_resumable_ray_job_of_iei_embed():
    args = parser().parse_args(shlex.split(JOB["spec"]["entrypoint"])[1:])
    assert args.command == "embed" and args.ray == "auto"  # joins the cluster KubeRay made
    assert args.model and args.url is None
    assert args.resume  # a retry of the job (backoffLimit) continues
    assert all(p.startswith("s3://") for p in [*args.paths, args.out])


def test_the_cluster_runs_the_pinned_ray_in_the_image_docker_ray_dockerfile_builds():
    assert CLUSTER["rayVersion"] == ray_pin()
    [base] = [ln.split()[1] for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("FROM")]
    assert base.startswith(f"rayproject/ray:{ray_pin()}-py311")
    assert '".[ray,serve]"' in DOCKERFILE.read_text()
    images = {c["image"] for g in GROUPS for c in g["template"]["spec"]["containers"]}
    assert images == {"iei-ray"}


def test_gpu_workers_have_one_gpu_per_model_actor_and_the_head_runs_no_actor():
    assert CLUSTER["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in CLUSTER["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        assert "memory" in limits


def test_object_store_credentials_come_from_a_secret():
    for group in GROUPS:
        for container in group["template"]["spec"]["containers"]:
            secret = [e for e in container["env"] if "SECRET" in e["name"] or "KEY" in e["name"]]
            assert secret and all("valueFrom" in e and "value" not in e for e in secret)


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install -e .[dev])")
def test_hadolint_finds_nothing_in_the_ray_image():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
