"""Launcher configuration: conf/launch.yaml composed with Hydra overrides and validated into dataclasses.

conf/launch.yaml documents every field; this module holds the types and the range checks. Every bad value raises a
ValueError naming the field (``resources.nodes: must be >= 1, got 0``) and, for choices, the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from onerec_dist.config import from_mapping, require

BACKENDS = ("ray", "slurm", "k8s", "local")
# SLURM --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$")
# Safe in an #SBATCH line and as a Ray submission id.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ResourcesConfig:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 8
    memory_gb_per_node: int | None = None

    def __post_init__(self) -> None:
        require(self.nodes >= 1, "resources.nodes", f"must be >= 1, got {self.nodes}")
        require(self.gpus_per_node >= 0, "resources.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        require(self.cpus_per_node >= 1, "resources.cpus_per_node", f"must be >= 1, got {self.cpus_per_node}")
        if self.memory_gb_per_node is not None:
            require(self.memory_gb_per_node >= 1, "resources.memory_gb_per_node",
                    f"must be >= 1 or null, got {self.memory_gb_per_node}")


@dataclass
class RayJobsConfig:
    address: str | None = None
    submission_id: str | None = None
    follow: bool = True
    wait: bool = True
    timeout_s: float | None = None
    stop_on_interrupt: bool = True
    excludes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.address is not None:
            require(re.match(r"^(https?|ray)://", self.address) is not None, "ray.address",
                    f"must start with http://, https:// or ray://, got {self.address!r} "
                    "(the dashboard address, e.g. http://127.0.0.1:8265)")
        if self.submission_id is not None:
            require(_PLAIN_NAME.match(self.submission_id) is not None, "ray.submission_id",
                    f"must be letters, digits, '-', '.', '_', got {self.submission_id!r}")
        if self.timeout_s is not None:
            require(self.timeout_s > 0, "ray.timeout_s", f"must be > 0 or null, got {self.timeout_s}")


@dataclass
class LocalConfig:
    temp_dir: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.temp_dir is not None:
            # Ray puts Unix sockets under <temp_dir>/session_<date>_<pid>/sockets/...; 107 bytes is the OS limit.
            require(len(self.temp_dir) <= 40, "local.temp_dir",
                    f"must be at most 40 characters (Unix socket paths are limited to 107 bytes), got {self.temp_dir!r}")
        if self.num_cpus is not None:
            require(self.num_cpus >= 1, "local.num_cpus", f"must be >= 1 or null, got {self.num_cpus}")
        if self.num_gpus is not None:
            require(self.num_gpus >= 0, "local.num_gpus", f"must be >= 0 or null, got {self.num_gpus}")
        require(self.start_timeout_s > 0, "local.start_timeout_s", f"must be > 0, got {self.start_timeout_s}")


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    setup: str = "source .venv/bin/activate"
    extra_directives: list[str] = field(default_factory=list)
    ray_port: int = 6379
    dashboard_port: int = 8265
    join_timeout_s: int = 600
    submit: bool = True

    def __post_init__(self) -> None:
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None:
                require(_PLAIN_NAME.match(value) is not None, f"slurm.{name}",
                        f"must be letters, digits, '-', '.', '_', got {value!r}")
        require(_SLURM_TIME.match(self.time) is not None, "slurm.time",
                f"must be MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, got {self.time!r}")
        for i, directive in enumerate(self.extra_directives):
            require(directive.startswith("-") and "\n" not in directive, f"slurm.extra_directives[{i}]",
                    f"must be one sbatch option such as '--exclusive', got {directive!r}")
        require("\n" not in self.setup, "slurm.setup", "must be a single shell line (join commands with &&)")
        for name in ("ray_port", "dashboard_port"):
            require(1 <= getattr(self, name) <= 65535, f"slurm.{name}", "must be a port 1..65535")
        require(self.join_timeout_s >= 1, "slurm.join_timeout_s", f"must be >= 1, got {self.join_timeout_s}")


@dataclass
class K8sConfig:
    image: str | None = None
    namespace: str = "default"
    ray_version: str = "2.60.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: int | None = None
    working_dir: str | None = None
    volume_claim: str | None = None
    mount_path: str = "/outputs"
    service_account: str | None = None
    submit: bool = True

    def __post_init__(self) -> None:
        require(re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", self.namespace) is not None, "k8s.namespace",
                f"must be a DNS-1123 label (a-z, 0-9, '-'), got {self.namespace!r}")
        require(self.ttl_seconds_after_finished >= 0, "k8s.ttl_seconds_after_finished", "must be >= 0")
        if self.active_deadline_seconds is not None:
            require(self.active_deadline_seconds >= 1, "k8s.active_deadline_seconds", "must be >= 1 or null")
        require(self.mount_path.startswith("/"), "k8s.mount_path", f"must be absolute, got {self.mount_path!r}")


@dataclass
class SweepConfig:
    warmup_steps: int = 1
    link_gb_per_s: float | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "sweep.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.link_gb_per_s is not None:
            require(self.link_gb_per_s > 0, "sweep.link_gb_per_s", f"must be > 0 or null, got {self.link_gb_per_s}")


@dataclass
class LaunchConfig:
    job_name: str | None = None
    working_dir: str | None = None
    python: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    record_dir: str | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayJobsConfig = field(default_factory=RayJobsConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if self.job_name is not None:
            require(_PLAIN_NAME.match(self.job_name) is not None, "job_name",
                    f"must be letters, digits, '-', '.', '_' (starting with a letter or digit), got {self.job_name!r}")
        env = {}
        for key, value in self.env.items():
            require(_ENV_KEY.match(str(key)) is not None, f"env.{key}", "is not a valid environment variable name")
            require(value is None or isinstance(value, (str, int, float, bool)), f"env.{key}",
                    f"must be a scalar, got {value!r}")
            env[str(key)] = "" if value is None else str(value)
        self.env = env

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_for_backend(cfg: LaunchConfig, backend: str) -> None:
    """Checks that depend on the backend (a field that one backend needs and others ignore)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "local":
        require(cfg.resources.nodes == 1, "resources.nodes",
                f"the local backend runs one node on this machine, got {cfg.resources.nodes}")
        require(cfg.ray.wait, "ray.wait", "must be true for backend 'local' (its cluster stops when the job ends)")
    if backend == "k8s":
        if cfg.job_name is not None:
            from onerec_launch.k8s import check_name

            check_name(cfg.job_name)
        require(cfg.k8s.image is not None, "k8s.image",
                "is required for backend 'k8s' (the container image holding onerec-dist), e.g. k8s.image=REPO/onerec:TAG")


def launch_conf_dir():
    """conf/ of the source tree (the launcher's own config lives beside the job's, in conf/launch.yaml)."""
    from onerec_dist.cli import CONF_DIR

    return CONF_DIR


def compose_launch_config(overrides: list[str]) -> LaunchConfig:
    """conf/launch.yaml + Hydra overrides -> validated LaunchConfig; unknown keys name the valid ones."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = launch_conf_dir()
    if not (conf_dir / "launch.yaml").is_file():
        raise ValueError(f"launcher config {conf_dir / 'launch.yaml'} not found (set ONEREC_CONF_DIR)")
    # env is an open mapping: `env.FOO=1` means "add FOO", which Hydra's struct mode spells `+env.FOO=1`.
    hydra_overrides = ["+" + o if o.startswith("env.") else o for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            try:
                cfg = compose(config_name="launch", overrides=hydra_overrides)
            except (HydraException, OmegaConfBaseException) as err:
                base = compose(config_name="launch")
                raise ValueError(_explain_unknown_key(base, overrides, str(err))) from None
    finally:
        GlobalHydra.instance().clear()
    return from_mapping(LaunchConfig, OmegaConf.to_container(cfg, resolve=True))


def _explain_unknown_key(base, overrides: list[str], message: str) -> str:
    """Hydra says "Could not override 'a.b'"; say which segment is unknown and what the valid keys there are."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        node, where = base, "conf/launch.yaml"
        for part in key.split("."):
            if where == "env" or not hasattr(node, "keys"):
                break
            if part not in node:
                return (f"unknown launcher key {key!r}: {where} has no key {part!r}; valid keys there: "
                        f"{', '.join(sorted(str(k) for k in node.keys()))}")
            node, where = node[part], part if where == "conf/launch.yaml" else f"{where}.{part}"
    return f"bad launcher override(s) {overrides}: {message.splitlines()[0]}"
