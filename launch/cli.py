"""The `onerec-launch` command: run any `onerec <stage> ...` on Ray Jobs, SLURM, KubeRay or a local Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from onerec_launch.config import BACKENDS

USAGE = f"""\
usage: onerec-launch <backend> [key=value ...] [--dry-run] -- onerec <stage> [key=value ...]
       onerec-launch jobs {{status,logs,stop}} <submission_id> ray.address=URL
       onerec-launch sweep <backend> [key=value ...] [--dry-run] -- onerec <stage> key=a,b [key=value ...]

Runs the `onerec` job after `--` on a cluster. Launcher overrides (before `--`) set fields of conf/launch.yaml;
job overrides (after `--`) are the usual `onerec` Hydra overrides. output_dir is always made explicit (relative
paths resolve against this directory), and the run directory gets launch.json (version, git commit, config) and
relaunch.sh (this exact command) beside the job's config.yaml and summary.json.

backends ({', '.join(BACKENDS)}):
  ray    submit to a running cluster through Ray Jobs; needs ray.address=http://HEAD:8265 (or $RAY_ADDRESS)
  local  start a Ray cluster on 127.0.0.1, submit the same way, stop the cluster at the end
  slurm  write an sbatch script (Ray head + srun workers, then `ray job submit`) and sbatch it
  k8s    write a KubeRay RayJob manifest (needs k8s.image=...) and kubectl apply it

options:
  --dry-run   print the Ray Jobs submission / sbatch script / RayJob YAML; write and submit nothing
  -h, --help  show this help

examples:
  onerec-launch local -- onerec pipeline output_dir=outputs/smoke data.synthetic.num_users=60
  onerec-launch ray ray.address=http://10.0.0.1:8265 env.WANDB_MODE=online -- onerec pipeline output_dir=/shared/run1
  onerec-launch slurm resources.nodes=4 resources.gpus_per_node=8 slurm.partition=gpu slurm.time=12:00:00 \\
      -- onerec pipeline output_dir=/shared/runs/big
  onerec-launch k8s --dry-run k8s.image=registry/onerec:0.1.0 resources.nodes=2 resources.gpus_per_node=8 \\
      -- onerec pipeline output_dir=runs/k8s
  bash outputs/smoke/relaunch.sh                       # the same job again
  onerec-launch jobs logs onerec-pipeline-20261123-120000-ab12cd ray.address=http://10.0.0.1:8265
  onerec-launch sweep ray ray.address=http://10.0.0.1:8265 -- onerec align output_dir=/shared/sweep1 \\
      trainer.num_workers=8,16,32 deepspeed.zero_stage=2,3 trainer.max_steps=30   # table + plot in output_dir
"""

JOB_ACTIONS = ("status", "logs", "stop")


def sweep_command(argv: list[str], cwd: Path | None = None) -> int:
    """`onerec-launch sweep <backend> [key=value ...] [--dry-run] -- onerec <stage> key=a,b ...` (launch/sweep.py)."""
    from onerec_launch.config import compose_launch_config
    from onerec_launch.request import parse_argv
    from onerec_launch.sweep import FINISHED, expand_grid, point_name, run_sweep

    cwd = cwd or Path.cwd()
    request = parse_argv(argv)
    cfg = compose_launch_config(list(request.launcher_overrides))
    if cfg.ray.submission_id is not None:
        raise ValueError("ray.submission_id: cannot be set for a sweep (every point is a job of its own)")
    output_dir = next((o.split("=", 1)[1] for o in request.job_overrides if o.startswith("output_dir=")),
                      "outputs/sweep")
    sweep_dir = Path(output_dir) if Path(output_dir).is_absolute() else cwd / output_dir
    grid = expand_grid([o for o in request.job_overrides if not o.startswith("output_dir=")])
    if request.dry_run:
        for point in grid.points:
            print(f"{point_name(point)}: onerec {request.stage} {' '.join(grid.fixed)} "
                  f"{' '.join(f'{k}={v}' for k, v in point.items())} output_dir={sweep_dir}/points/{point_name(point)}")
        return 0
    result = run_sweep(request, sweep_dir, warmup_steps=cfg.sweep.warmup_steps,
                       link_gb_per_s=cfg.sweep.link_gb_per_s, resume=cfg.sweep.resume, cwd=cwd)
    for row in result["rows"]:
        point = " ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k, _ in grid.axes)
        tput = (f"{row['tokens_per_s']:.0f} tok/s, efficiency {row['scaling_efficiency']:.2f}"
                if row.get("tokens_per_s") else row.get("message", "")[-120:])
        print(f"  {point}: {row['status']} {tput}")
    print(f"onerec-launch sweep: table {sweep_dir / 'scaling.csv'} (.json, .png)")
    return 0 if all(p["status"] in FINISHED for p in result["state"]["points"].values()) else 1


def jobs_command(argv: list[str]) -> int:
    """`onerec-launch jobs {status,logs,stop} ID [ray.address=URL]` for jobs submitted with ray.wait=false."""
    from onerec_dist.distributed import job_submission as ray_jobs

    if len(argv) < 2 or argv[0] not in JOB_ACTIONS:
        raise ValueError(f"usage: onerec-launch jobs {{{','.join(JOB_ACTIONS)}}} <submission_id> ray.address=URL")
    action, submission_id, rest = argv[0], argv[1], argv[2:]
    address = os.environ.get("RAY_ADDRESS")
    for arg in rest:
        key, _, value = arg.partition("=")
        if key != "ray.address":
            raise ValueError(f"jobs {action}: unknown argument {arg!r}; only ray.address=URL is accepted")
        address = value
    if not address:
        raise ValueError("ray.address: is required (e.g. ray.address=http://HEAD:8265, or set RAY_ADDRESS)")
    client = ray_jobs.connect(address)
    if action == "status":
        print(ray_jobs.status(client, submission_id))
    elif action == "logs":
        print(ray_jobs.logs(client, submission_id), end="")
    else:
        print(ray_jobs.stop(client, submission_id))
    return 0


def main(argv: list[str] | None = None) -> int:
    from onerec_launch.launcher import launch
    from onerec_launch.request import parse_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    before_job = argv[: argv.index("--")] if "--" in argv else argv
    if not argv or "-h" in before_job or "--help" in before_job or argv[0] == "help":
        print(USAGE, end="")
        return 0 if argv else 2
    try:
        if argv[0] == "jobs":
            return jobs_command(argv[1:])
        if argv[0] == "sweep":
            return sweep_command(argv[1:])
        result = launch(parse_argv(argv))
    except ValueError as err:  # bad input: the message names the field and the valid values
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ConnectionError, TimeoutError) as err:  # the cluster side: sbatch / kubectl / Ray
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
