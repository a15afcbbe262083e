"""From a LaunchRequest to a submitted job: plan (validate everything, resolve paths), record, submit.

``make_plan`` does every check before anything is written or started, so a bad override never leaves a half-made
run directory. ``launch`` writes launch.json + relaunch.sh into the record directory (the job's output_dir unless
record_dir is set), then hands the job to the backend:

  ray    Ray Jobs on an existing cluster (ray.address)
  local  the same, on a Ray cluster started on 127.0.0.1 for this job and stopped after it
  slurm  sbatch script (Ray head + workers via srun, then `ray job submit`), written and submitted with sbatch
  k8s    KubeRay RayJob manifest, written and applied with kubectl
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from onerec_launch import job as jobs
from onerec_launch import record
from onerec_launch.config import LaunchConfig, compose_launch_config, validate_for_backend
from onerec_launch.request import LaunchRequest


@dataclass(frozen=True)
class LaunchPlan:
    request: LaunchRequest  # with the job's overrides normalised and output_dir explicit
    cfg: LaunchConfig
    job: jobs.JobSpec
    name: str
    submission_id: str
    address: str | None  # Ray dashboard (backend ray); None otherwise
    entrypoint: str
    runtime_env: dict
    record_dir: Path
    cwd: Path


@dataclass(frozen=True)
class LaunchResult:
    backend: str
    status: str  # Ray JobStatus (ray, local), SUBMITTED / RENDERED (slurm, k8s), DRY_RUN
    record_dir: Path
    submission_id: str | None = None
    message: str | None = None
    rendered: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("SUCCEEDED", "SUBMITTED", "RENDERED", "DRY_RUN", "PENDING", "RUNNING")


def _job_spec(request: LaunchRequest, cfg: LaunchConfig, cwd: Path) -> jobs.JobSpec:
    if request.backend != "k8s":
        return jobs.build_job_spec(request.stage, list(request.job_overrides), cwd=cwd)
    # k8s: output_dir is a path inside the pods; relative ones go under the mounted volume, if any.
    spec = jobs.build_job_spec(request.stage, list(request.job_overrides), resolve_output_dir=False)
    if cfg.k8s.volume_claim is not None and not os.path.isabs(spec.output_dir):
        overrides = [*spec.overrides, f"output_dir={cfg.k8s.mount_path.rstrip('/')}/{spec.output_dir}"]
        spec = jobs.JobSpec(spec.stage, tuple(jobs.normalise_overrides(overrides)))
    _check_k8s_shared_storage(cfg, spec)
    return spec


def _check_k8s_shared_storage(cfg: LaunchConfig, spec: jobs.JobSpec) -> None:
    """Several pods write one run: Ray Train's checkpoints (trainer.storage_path, default output_dir/ray_results)
    and the workers' outputs must land on storage every pod sees, else the driver finds no summary or checkpoint
    (each pod has its own disk). One pod needs nothing shared."""
    if cfg.resources.nodes == 1:
        return
    if cfg.k8s.volume_claim is None:
        raise ValueError(f"k8s.volume_claim: a RayJob of {cfg.resources.nodes} nodes (resources.nodes) needs a "
                         "volume every pod mounts for output_dir and Ray's checkpoint storage (each pod's own disk "
                         "is invisible to the others); give k8s.volume_claim=<a ReadWriteMany PVC> (mounted at "
                         "k8s.mount_path), or resources.nodes=1")
    mount = cfg.k8s.mount_path.rstrip("/") + "/"
    overrides = dict(o.split("=", 1) for o in spec.overrides)
    paths = {"output_dir": spec.output_dir}
    if overrides.get("trainer.storage_path") not in (None, "", "null"):
        paths["trainer.storage_path"] = overrides["trainer.storage_path"]
    for key, path in paths.items():
        if "://" not in path and not (path.rstrip("/") + "/").startswith(mount):
            raise ValueError(f"{key}: {path!r} is not on the shared volume mounted at k8s.mount_path={mount!r}; with "
                             f"resources.nodes={cfg.resources.nodes} every pod must see it (use a relative output_dir, "
                             f"a path under {mount}, or a URI such as s3://...)")


def make_plan(request: LaunchRequest, cwd: Path | None = None) -> LaunchPlan:
    """Validate the launcher config and the job, and resolve every path; raises ValueError naming the field."""
    cwd = (cwd or Path.cwd()).resolve()
    cfg = compose_launch_config(list(request.launcher_overrides))
    validate_for_backend(cfg, request.backend)
    address = None
    if request.backend == "ray":
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ValueError("ray.address: is required for backend 'ray' (the cluster's dashboard, e.g. "
                             "ray.address=http://HEAD:8265; or set RAY_ADDRESS); use backend 'local' for a "
                             "cluster on this machine")
        if cfg.ray.address is None:  # from $RAY_ADDRESS: record it, so that relaunch.sh needs no environment
            request = replace(request, launcher_overrides=(*request.launcher_overrides, f"ray.address={address}"))
    spec = _job_spec(request, cfg, cwd)
    name = jobs.job_name(cfg, spec)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    submission_id = cfg.ray.submission_id or f"{name}-{stamp}-{secrets.token_hex(3)}"
    if cfg.record_dir is not None:
        record_dir = Path(cfg.record_dir) if os.path.isabs(cfg.record_dir) else cwd / cfg.record_dir
    else:
        record_dir = Path(spec.output_dir) if os.path.isabs(spec.output_dir) else cwd / spec.output_dir
    return LaunchPlan(
        request=replace(request, job_overrides=spec.overrides), cfg=cfg, job=spec, name=name,
        submission_id=submission_id, address=address,
        entrypoint=jobs.entrypoint(spec, jobs.python_command(cfg, request.backend)),
        runtime_env=jobs.runtime_env(cfg, request.backend, cwd), record_dir=record_dir, cwd=cwd,
    )


def render(plan: LaunchPlan) -> str:
    """What the backend submits, as text: the sbatch script, the RayJob YAML, or the Ray Jobs submission."""
    backend = plan.request.backend
    if backend == "slurm":
        from onerec_launch.slurm import render_sbatch

        return render_sbatch(plan.cfg, job_name=plan.name, entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                             submission_id=plan.submission_id, working_dir=jobs.working_dir(plan.cfg, plan.cwd),
                             record_dir=plan.record_dir, relaunch=str(plan.record_dir / record.RELAUNCH_SH),
                             version=record.package_version())
    if backend == "k8s":
        from onerec_launch.k8s import rayjob_manifest, render_rayjob

        manifest = rayjob_manifest(plan.cfg, name=plan.name, entrypoint=plan.entrypoint,
                                   runtime_env=plan.runtime_env, labels={"onerec-dist/stage": plan.job.stage})
        return render_rayjob(manifest)
    return json.dumps({"address": plan.address or "(local cluster started by onerec-launch)",
                       "submission_id": plan.submission_id, "entrypoint": plan.entrypoint,
                       "runtime_env": plan.runtime_env}, indent=2) + "\n"


def _record(plan: LaunchPlan) -> dict:
    return {
        "backend": plan.request.backend,
        "git": record.git_info(jobs.working_dir(plan.cfg, plan.cwd) if plan.request.backend != "k8s" else plan.cwd),
        "launch_config": plan.cfg.to_dict(),
        "job": {"name": plan.name, "stage": plan.job.stage, "overrides": list(plan.job.overrides),
                "output_dir": plan.job.output_dir, "entrypoint": plan.entrypoint, "runtime_env": plan.runtime_env},
        "submission": {"submission_id": plan.submission_id, "address": plan.address, "status": "NOT_SUBMITTED"},
    }


def launch(request: LaunchRequest, out: TextIO | None = None, cwd: Path | None = None) -> LaunchResult:
    """Plan, record, submit; with ``request.dry_run`` only print what would be submitted (to ``out``, stdout)."""
    out = out or sys.stdout
    plan = make_plan(request, cwd)
    backend = plan.request.backend
    if request.dry_run:
        out.write(render(plan))
        out.flush()
        return LaunchResult(backend, "DRY_RUN", plan.record_dir, plan.submission_id)
    text = render(plan)  # renders (and validates) before anything is written
    record.write_record(plan.record_dir, _record(plan), plan.request, plan.cwd)
    print(f"onerec-launch: run record in {plan.record_dir} (launch.json, relaunch.sh)", file=out, flush=True)
    if backend in ("ray", "local"):
        result = _run_ray_jobs(plan, out)
    else:
        result = _submit_rendered(plan, text, out)
    record.update_record(plan.record_dir, {"submission": {
        "submission_id": result.submission_id, "address": plan.address, "status": result.status,
        "message": result.message, "rendered": str(result.rendered) if result.rendered else None}})
    return result


def _run_ray_jobs(plan: LaunchPlan, out: TextIO) -> LaunchResult:
    from onerec_launch.local_cluster import LocalRayCluster
    from onerec_dist.distributed.job_submission import run_job

    ray_cfg = plan.cfg.ray
    metadata = {"job_name": plan.name, "stage": plan.job.stage, "record_dir": str(plan.record_dir)}

    def run(address: str):
        return run_job(address, plan.entrypoint, plan.runtime_env, plan.submission_id, metadata=metadata,
                       follow_logs=ray_cfg.follow, wait_for_end=ray_cfg.wait, timeout_s=ray_cfg.timeout_s,
                       stop_on_interrupt=ray_cfg.stop_on_interrupt, out=out)

    if plan.request.backend == "ray":
        result = run(plan.address)
    else:
        local = plan.cfg.local
        cluster = LocalRayCluster(temp_dir=local.temp_dir, num_cpus=local.num_cpus, num_gpus=local.num_gpus,
                                  start_timeout_s=local.start_timeout_s, env=jobs.job_env(plan.cfg))
        print(f"onerec-launch: starting a local Ray cluster in {cluster.temp_dir}", file=out, flush=True)
        # `kill <launcher>` must stop the cluster too: it runs in its own session and would outlive us.
        with _exit_on_sigterm():
            try:
                cluster.start()
                record.update_record(plan.record_dir, {"local_cluster": {"address": cluster.address,
                                                                         "temp_dir": cluster.temp_dir}})
                result = run(cluster.address)
                # A failed job's Ray logs (job-driver-*.log under session_latest/logs) are kept for debugging.
                cluster.keep_temp_dir = result.status != "SUCCEEDED"
            finally:
                cluster.stop()
                print("onerec-launch: local Ray cluster stopped", file=out, flush=True)
    print(f"onerec-launch: {result.submission_id} {result.status}"
          + (f" ({result.message})" if result.message else ""), file=out, flush=True)
    return LaunchResult(plan.request.backend, result.status, plan.record_dir, result.submission_id, result.message)


@contextlib.contextmanager
def _exit_on_sigterm():
    """Within the block SIGTERM raises SystemExit, so `finally` (stopping the cluster) still runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _submit_rendered(plan: LaunchPlan, text: str, out: TextIO) -> LaunchResult:
    backend = plan.request.backend
    path = plan.record_dir / ("sbatch.sh" if backend == "slurm" else "rayjob.yaml")
    path.write_text(text)
    print(f"onerec-launch: wrote {path}", file=out, flush=True)
    if backend == "slurm":
        if not plan.cfg.slurm.submit:
            return LaunchResult(backend, "RENDERED", plan.record_dir, plan.submission_id, rendered=path)
        from onerec_launch.slurm import submit_sbatch

        slurm_id = submit_sbatch(path)
        print(f"onerec-launch: submitted SLURM job {slurm_id}", file=out, flush=True)
        return LaunchResult(backend, "SUBMITTED", plan.record_dir, plan.submission_id, f"slurm job {slurm_id}", path)
    if not plan.cfg.k8s.submit:
        return LaunchResult(backend, "RENDERED", plan.record_dir, plan.submission_id, rendered=path)
    from onerec_launch.k8s import apply_manifest

    message = apply_manifest(path)
    print(f"onerec-launch: {message}", file=out, flush=True)
    return LaunchResult(backend, "SUBMITTED", plan.record_dir, plan.submission_id, message, path)
