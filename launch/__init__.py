"""Job submission for onerec-dist (Ray Jobs, SLURM, KubeRay, local); installs as `onerec_launch`.

`onerec-launch <backend> [key=value ...] [--dry-run] -- onerec <stage> [overrides]` (launch/cli.py). Modules:
config (conf/launch.yaml schema), request (the command line as data), job (entrypoint, runtime_env), launcher
(plan -> record -> submit), record (launch.json, relaunch.sh), ray_jobs (JobSubmissionClient), local_cluster (a
throw-away Ray on 127.0.0.1), slurm (sbatch template), k8s (KubeRay RayJob). This package imports onerec_dist,
never the other way round; ray and jinja2 are imported only inside the functions that use them.
"""
