"""Kubernetes: a KubeRay ``RayJob`` (apiVersion ray.io/v1) built as a dict and dumped with yaml.safe_dump.

KubeRay creates the RayCluster (one head pod + ``resources.nodes - 1`` worker pods, each with the node's CPUs,
memory and ``nvidia.com/gpu``), submits ``spec.entrypoint`` with ``spec.runtimeEnvYAML`` through Ray Jobs, and
deletes the cluster when the job ends (``shutdownAfterJobFinishes``). Field reference:
https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayjob-quick-start.html
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from onerec_launch.config import LaunchConfig

# KubeRay derives the RayCluster and submitter names from the RayJob's, so its name is capped below 63.
MAX_NAME = 47
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_name(name: str) -> None:
    if len(name) > MAX_NAME or not _DNS_1123.match(name):
        raise ValueError(f"job_name: the k8s backend needs a lowercase DNS-1123 name (a-z, 0-9, '-', at most "
                         f"{MAX_NAME} characters, starting and ending with a letter or digit), got {name!r}")


def _resources(cfg: LaunchConfig) -> dict:
    """Pod resources of one node: requests == limits (guaranteed QoS); GPUs are limits-only, as k8s wants."""
    res = cfg.resources
    amount = {"cpu": str(res.cpus_per_node)}
    if res.memory_gb_per_node is not None:
        amount["memory"] = f"{res.memory_gb_per_node}Gi"
    limits = dict(amount)
    if res.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {"requests": amount, "limits": limits}


def _pod_template(cfg: LaunchConfig, container_name: str, ports: list[dict]) -> dict:
    k8s = cfg.k8s
    container: dict = {"name": container_name, "image": k8s.image, "imagePullPolicy": k8s.image_pull_policy,
                       "resources": _resources(cfg)}
    if ports:
        container["ports"] = ports
    spec: dict = {"containers": [container]}
    if k8s.volume_claim is not None:
        container["volumeMounts"] = [{"name": "outputs", "mountPath": k8s.mount_path}]
        spec["volumes"] = [{"name": "outputs", "persistentVolumeClaim": {"claimName": k8s.volume_claim}}]
    if k8s.service_account is not None:
        spec["serviceAccountName"] = k8s.service_account
    return {"spec": spec}


def rayjob_manifest(cfg: LaunchConfig, *, name: str, entrypoint: str, runtime_env: dict,
                    labels: dict[str, str] | None = None) -> dict:
    """The RayJob as a dict; ``validate_rayjob`` holds what KubeRay requires of it."""
    check_name(name)
    workers = cfg.resources.nodes - 1  # the head pod is the first node
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    spec: dict = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "shutdownAfterJobFinishes": cfg.k8s.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": cfg.k8s.ttl_seconds_after_finished,
        "rayClusterSpec": {
            "rayVersion": cfg.k8s.ray_version,
            "headGroupSpec": {
                # KubeRay reads num-cpus / num-gpus from the container limits; the dashboard must listen on all
                # interfaces so the submitter pod can reach it.
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": _pod_template(cfg, "ray-head", head_ports),
            },
            "workerGroupSpecs": [{
                "groupName": "workers",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": _pod_template(cfg, "ray-worker", []),
            }],
        },
    }
    if cfg.k8s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = cfg.k8s.active_deadline_seconds
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": cfg.k8s.namespace,
                     "labels": {"app.kubernetes.io/name": "onerec-dist", **(labels or {})}},
        "spec": spec,
    }
    validate_rayjob(manifest)
    return manifest


def validate_rayjob(manifest: dict) -> None:
    """Raise ValueError naming the first field KubeRay would reject (or that this launcher relies on)."""
    def get(path: str):
        node = manifest
        for part in path.split("."):
            key: int | str = int(part) if part.isdigit() else part
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"RayJob manifest: missing {path}") from None
        return node

    if get("apiVersion") != "ray.io/v1" or get("kind") != "RayJob":
        raise ValueError("RayJob manifest: apiVersion must be ray.io/v1 and kind RayJob")
    for path in ("metadata.name", "spec.entrypoint"):
        if not isinstance(get(path), str) or not get(path):
            raise ValueError(f"RayJob manifest: {path} must be a non-empty string")
    yaml.safe_load(get("spec.runtimeEnvYAML"))
    head = get("spec.rayClusterSpec.headGroupSpec")
    groups = get("spec.rayClusterSpec.workerGroupSpecs")
    for where, group in [("headGroupSpec", head), *((f"workerGroupSpecs.{i}", g) for i, g in enumerate(groups))]:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise ValueError(f"RayJob manifest: {where}.rayStartParams must map to strings")
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers or not containers[0].get("image"):
            raise ValueError(f"RayJob manifest: {where}.template.spec.containers[0].image is required")
    for i, group in enumerate(groups):
        if not group.get("groupName") or not isinstance(group.get("replicas"), int) or group["replicas"] < 0:
            raise ValueError(f"RayJob manifest: workerGroupSpecs.{i} needs groupName and replicas >= 0")


class _BlockStyleDumper(yaml.SafeDumper):
    """safe_dump that writes multi-line strings (runtimeEnvYAML) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _str_representer)


def render_rayjob(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_BlockStyleDumper, sort_keys=False, width=120)


def apply_manifest(path: Path) -> str:
    """`kubectl apply -f path`; returns kubectl's message."""
    if shutil.which("kubectl") is None:
        raise RuntimeError(f"kubectl is not on PATH: apply {path} yourself, or use --dry-run / k8s.submit=false")
    done = subprocess.run(["kubectl", "apply", "-f", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl apply -f {path} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()
