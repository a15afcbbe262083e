"""The one way onerec-dist starts or joins Ray: training (ray_job), sharded eval (eval_shards) and every later stage.

``ensure_ray`` joins what is there, in this order, and starts a local Ray only when there is nothing to join:
  1. Ray already initialised in this process (tests, notebooks, a stage inside ``onerec pipeline``): use it;
  2. an address (``trainer.ray_address``, or ``RAY_ADDRESS``, which Ray Jobs sets for every job's entrypoint): join;
  3. otherwise start a local Ray with a short temp dir (Unix socket paths are limited to 107 bytes).

Environment defaults travel once. Workers of a cluster do not inherit the driver's environment, so a driver that
joins a cluster sends the variables of ``PROPAGATED_ENV`` in ``ray.init(runtime_env=...)``. Inside a Ray job the
job's runtime env (set by `onerec-launch`, the sbatch script or the KubeRay RayJob) already carries them, and Ray
refuses a ``ray.init`` runtime env that sets a key the job's sets ("Failed to merge the Job's runtime env ..."):
there only the variables the job's runtime env lacks are sent (none, for a job `onerec-launch` submitted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

# Variables the workers of a remote cluster should see as the driver does (a local Ray inherits them anyway).
PROPAGATED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "WANDB_MODE",
                  "WANDB_SILENT", "WANDB_DIR", "WANDB_CACHE_DIR", "TOKENIZERS_PARALLELISM")
# Set by Ray Jobs in a job's entrypoint: JSON {"runtime_env": ..., "metadata": ...} of the submitted job
# (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR; spelled out so that reading it needs no ray).
JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Temp dir of a Ray this process starts: short (socket paths), overridable for parallel test runs.
DEFAULT_TEMP_DIR = "/tmp/ray_onerec"
TEMP_DIR_ENV_VAR = "ONEREC_RAY_TEMP_DIR"
# Process-level defaults of a Ray this process starts or joins (setdefault: the user's values win).
RAY_DEFAULTS = {"RAY_AUTH_MODE": "disabled",  # else Ray 2.60 writes ~/.ray/auth_token
                "RAY_USAGE_STATS_ENABLED": "0"}


def job_runtime_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """The runtime env of the Ray job this process is the entrypoint of; None outside a Ray job."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_CONFIG_ENV_VAR)
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}  # a job whose config we cannot read: still a job, send nothing that could conflict


def in_ray_job(environ: Mapping[str, str] | None = None) -> bool:
    return job_runtime_env(environ) is not None


def driver_runtime_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """What ``ray.init(runtime_env=...)`` sends when joining a cluster: the PROPAGATED_ENV variables this process
    has, less those a surrounding Ray job's runtime env already sets (Ray rejects a key set twice). None: nothing."""
    environ = os.environ if environ is None else environ
    job_env = job_runtime_env(environ) or {}
    already = set((job_env.get("env_vars") or {}).keys())
    env_vars = {key: environ[key] for key in PROPAGATED_ENV if key in environ and key not in already}
    return {"env_vars": env_vars} if env_vars else None


def session_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster to join: ``address`` (e.g. trainer.ray_address), else $RAY_ADDRESS; None: start a local Ray."""
    environ = os.environ if environ is None else environ
    return address or environ.get("RAY_ADDRESS") or None


def temp_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get(TEMP_DIR_ENV_VAR) or DEFAULT_TEMP_DIR


def ensure_ray(address: str | None = None, *, temp_dir_path: str | None = None, num_cpus: int | None = None,
               num_gpus: int | None = None, include_dashboard: bool | None = None,
               log_to_driver: bool = True) -> bool:
    """Use, join or start Ray (see the module docstring); returns True when this call connected (the caller then
    calls ``ray.shutdown()`` when done), False when Ray was already initialised here.

    ``temp_dir_path``, ``num_cpus``, ``num_gpus`` and ``include_dashboard`` apply to a local start only."""
    import ray

    for key, value in RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    join = session_address(address)
    if join:
        kwargs = {}
        runtime_env = driver_runtime_env()
        if runtime_env is not None:
            kwargs["runtime_env"] = runtime_env
        ray.init(address=join, log_to_driver=log_to_driver, **kwargs)
        return True
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=temp_dir(temp_dir_path),
             include_dashboard=include_dashboard, log_to_driver=log_to_driver)
    return True


def shutdown() -> None:
    import ray

    ray.shutdown()
