"""Job submission for onerec-dist (Ray Jobs, SLURM, KubeRay, local); installs as `onerec_launch`.

`onerec-launch <backend> [key=value ...] [--dry-run] -- onerec <stage> [overrides]` (launch/cli.py). Modules:
config (conf/launch.yaml schema), request (the command line as data), job (entrypoint, runtime_env), launcher
(plan -> record -> submit), record (launch.json, relaunch.sh), local_cluster (a throw-away Ray on 127.0.0.1), slurm
(sbatch template), k8s (KubeRay RayJob), sweep (a grid of jobs, one table). The Ray Jobs client is
onerec_dist.distributed.job_submission: only onerec_dist/distributed imports ray. This package imports onerec_dist,
never the other way round; jinja2 is imported only inside the functions that use it.
"""
