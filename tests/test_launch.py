"""onerec-launch: command line, run records and relaunch, SLURM / KubeRay rendering, and Ray Jobs end to end.

The slow tests start real Ray clusters on 127.0.0.1 (short temp dirs under /tmp, free ports) and always stop them.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import leftover_processes

from onerec_dist.stages import STAGES
import yaml

from onerec_launch import cli, record
from onerec_launch.config import compose_launch_config
from onerec_launch.job import JobSpec, normalise_overrides
from onerec_launch.k8s import validate_rayjob
from onerec_launch.launcher import LaunchPlan, launch, make_plan, render
from onerec_launch.request import LaunchRequest, parse_argv
from onerec_launch.slurm import check_rendered

REPO = Path(__file__).resolve().parents[1]


def plan_for(argv: list[str], cwd: Path) -> LaunchPlan:
    return make_plan(parse_argv(argv), cwd=cwd)


# ---------------------------------------------------------------------------------------------------------------
# Command line and job normal form
# ---------------------------------------------------------------------------------------------------------------

def test_parse_argv_splits_launcher_and_job_parts():
    request = parse_argv(["slurm", "resources.nodes=2", "--dry-run", "slurm.time=1:00:00", "--",
                          "onerec", "pipeline", "output_dir=/o", "seed=3"])
    assert request == LaunchRequest(backend="slurm", launcher_overrides=("resources.nodes=2", "slurm.time=1:00:00"),
                                    stage="pipeline", job_overrides=("output_dir=/o", "seed=3"), dry_run=True)
    # argv() is the inverse of parse_argv; the leading `onerec` of the job may be left out.
    assert parse_argv(request.argv()) == request
    assert parse_argv(["slurm", "resources.nodes=2", "slurm.time=1:00:00", "--dry-run", "--", "pipeline",
                       "output_dir=/o", "seed=3"]) == request


def test_repeated_override_keeps_last_value_like_hydra():
    # Hydra applies overrides in order, so seed=1 ... seed=2 composes to seed=2; the normal form keeps one per key
    # (first-seen position, last value) and must compose to the identical config.
    from omegaconf import OmegaConf

    from onerec_dist.cli import compose

    raw = ["seed=1", "output_dir=/a", "data.synthetic.num_users=60", "seed=2", "output_dir=/b"]
    assert normalise_overrides(raw) == ["seed=2", "output_dir=/b", "data.synthetic.num_users=60"]
    assert OmegaConf.to_container(compose(normalise_overrides(raw))) == OmegaConf.to_container(compose(raw))


def test_plan_makes_output_dir_explicit_and_absolute(tmp_path):
    # Given relative: resolved against the launch directory (the job runs where Ray unpacked the code).
    plan = plan_for(["local", "--", "onerec", "prepare", "output_dir=runs/a", "seed=4"], tmp_path)
    assert plan.job == JobSpec("prepare", ("output_dir=" + str(tmp_path / "runs/a"), "seed=4"))
    assert plan.record_dir == tmp_path / "runs/a"
    # Not given: conf/config.yaml's default (outputs/run), made explicit.
    plan = plan_for(["local", "--", "onerec", "prepare"], tmp_path)
    assert plan.job.overrides == ("output_dir=" + str(tmp_path / "outputs/run"),)
    # The entrypoint runs `-m onerec_dist.cli` (the uploaded code) with this interpreter for `local`.
    assert plan.entrypoint == f"{shlex.quote(sys.executable)} -m onerec_dist.cli prepare output_dir={tmp_path}/outputs/run"
    assert plan.runtime_env["working_dir"] == str(tmp_path)


def test_runtime_env_has_offline_defaults_and_user_env_wins(tmp_path):
    plan = plan_for(["ray", "ray.address=http://127.0.0.1:8265", "env.WANDB_MODE=online", "env.MY_FLAG=1",
                     "--", "onerec", "prepare"], tmp_path)
    env = plan.runtime_env["env_vars"]
    assert env["WANDB_MODE"] == "online" and env["MY_FLAG"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["RAY_AUTH_MODE"] == "disabled"
    assert "DS_ACCELERATOR" not in env  # the job decides that from its own node's hardware
    assert plan.address == "http://127.0.0.1:8265"


def test_address_from_environment_is_recorded_for_relaunch(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.9:8265")
    plan = plan_for(["ray", "--", "onerec", "prepare"], tmp_path)
    assert plan.address == "http://10.0.0.9:8265"
    assert plan.request.launcher_overrides == ("ray.address=http://10.0.0.9:8265",)


def test_launch_config_defaults_match_the_dataclasses():
    # conf/launch.yaml and launch/config.py state the same defaults: composing no overrides equals the dataclass.
    from onerec_launch.config import LaunchConfig

    assert compose_launch_config([]) == LaunchConfig()


# ---------------------------------------------------------------------------------------------------------------
# Errors name the field and the valid values
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "missing backend; valid backends: ray, slurm, k8s, local"),
    (["aws", "--", "onerec", "prepare"], "unknown backend 'aws'; valid backends: ray, slurm, k8s, local"),
    (["local"], "missing job"),
    (["local", "--"], "missing job"),
    (["local", "--", "onerec", "train"], "unknown stage 'train'; valid stages: " + ", ".join(STAGES)),
    (["local", "--verbose", "--", "onerec", "prepare"], "unknown option '--verbose'"),
    (["local", "nodes", "--", "onerec", "prepare"], "launcher override 'nodes' is not key=value"),
    (["local", "--", "onerec", "prepare", "seed"], "job override 'seed' is not key=value"),
    (["local", "--", "onerec", "prepare", "--cfg", "job"], "job argument '--cfg'"),
])
def test_command_line_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_argv(argv)


@pytest.mark.parametrize("launcher, message", [
    (["ray"], "ray.address: is required for backend 'ray'"),
    (["ray", "ray.address=127.0.0.1:8265"], "ray.address: must start with http://"),
    (["slurm", "resources.nodes=0"], "resources.nodes: must be >= 1, got 0"),
    (["slurm", "resources.gpus_per_node=-1"], "resources.gpus_per_node: must be >= 0"),
    (["slurm", "resources.cpus_per_node=0"], "resources.cpus_per_node: must be >= 1"),
    (["local", "resources.nodes=2"], "resources.nodes: the local backend runs one node"),
    (["local", "ray.wait=false"], "ray.wait: must be true for backend 'local'"),
    (["k8s"], "k8s.image: is required for backend 'k8s'"),
    (["k8s", "k8s.image=x", "job_name=My_Job"], "job_name: the k8s backend needs a lowercase DNS-1123 name"),
    (["k8s", "k8s.image=x", "k8s.image_pull_policy=Sometimes"], "allowed values: 'Always', 'IfNotPresent', 'Never'"),
    (["slurm", "slurm.time=two hours"], "slurm.time: must be MM, MM:SS, HH:MM:SS"),
    (["slurm", "slurm.partition='gpu rm'"], "slurm.partition: must be letters"),
    (["slurm", "slurm.bogus=1"], "unknown launcher key 'slurm.bogus': slurm has no key 'bogus'; valid keys there: "
                                 "account, dashboard_port"),
    (["slurm", "cluster.nodes=1"], "conf/launch.yaml has no key 'cluster'; valid keys there: env, job_name"),
    (["local", "working_dir=/no/such/dir"], "working_dir: /no/such/dir is not a directory"),
    (["local", "local.temp_dir=/tmp/" + "x" * 40], "local.temp_dir: must be at most 40 characters"),
    (["local", "env.BAD-NAME=x"], "env.BAD-NAME: is not a valid environment variable name"),
])
def test_launcher_config_errors_name_the_field(tmp_path, monkeypatch, launcher, message):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_for([*launcher, "--", "onerec", "prepare"], tmp_path)


def test_job_override_typo_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'data.synthetic.num_user'"):
        launch(parse_argv(["local", "--", "onerec", "prepare", f"output_dir={tmp_path}/run",
                           "data.synthetic.num_user=5"]), cwd=tmp_path)
    assert not (tmp_path / "run").exists()


def test_cli_reports_errors_with_exit_code_2(capsys):
    assert cli.main(["k8s", "--", "onerec", "prepare"]) == 2
    assert "error: k8s.image: is required" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "onerec-launch <backend>" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Run records and relaunch
# ---------------------------------------------------------------------------------------------------------------

def test_relaunch_script_round_trip(tmp_path):
    argv = ["ray", "ray.address=http://10.0.0.1:8265", "ray.submission_id=first-try", "env.A=x y",
            "resources.cpus_per_node=4", "--", "onerec", "pipeline", "output_dir=out", "pipeline.stages=[prepare]",
            "data.synthetic.num_users=60"]
    plan = plan_for(argv, tmp_path)
    record.write_record(plan.record_dir, {"job": plan.job.argv()}, plan.request, plan.cwd)
    script = (plan.record_dir / "relaunch.sh").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert os.access(plan.record_dir / "relaunch.sh", os.X_OK)

    parsed = record.parse_relaunch(script)
    # Same backend, launcher overrides and job (output_dir now absolute), minus the one-off submission id.
    assert parsed == LaunchRequest("ray", ("ray.address=http://10.0.0.1:8265", "env.A=x y", "resources.cpus_per_node=4"),
                                   "pipeline", (f"output_dir={tmp_path}/out", "pipeline.stages=[prepare]",
                                                "data.synthetic.num_users=60"))
    assert f"cd {tmp_path}" in script  # relative launcher paths resolve as they did
    replan = make_plan(parsed, cwd=tmp_path)
    assert replan.job == plan.job and replan.entrypoint == plan.entrypoint and replan.runtime_env == plan.runtime_env
    assert replan.cfg.ray.submission_id is None and plan.cfg.ray.submission_id == "first-try"
    # "unless told otherwise": arguments given to relaunch.sh are appended to the job's overrides, last wins.
    moved = parse_argv([*parsed.argv(), "output_dir=/elsewhere"])
    assert make_plan(moved, cwd=tmp_path).job.output_dir == "/elsewhere"


def test_relaunch_sh_reruns_the_same_job(tmp_path):
    # slurm.submit=false renders and records without a cluster, so relaunch.sh can really be executed here.
    argv = ["slurm", "slurm.submit=false", "slurm.setup=echo setup", "resources.nodes=2", "--", "onerec", "pipeline",
            "output_dir=run", "data.synthetic.num_users=60"]
    result = launch(parse_argv(argv), cwd=tmp_path, out=open(os.devnull, "w"))
    assert result.status == "RENDERED"
    first = json.loads((tmp_path / "run/launch.json").read_text())
    first_script = (tmp_path / "run/sbatch.sh").read_text()
    done = subprocess.run(["bash", str(tmp_path / "run/relaunch.sh")], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    second = json.loads((tmp_path / "run/launch.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "run/launch_history.jsonl").read_text().splitlines()]
    assert history == [first]  # the first launch's record is kept, not overwritten
    for key in ("backend", "launch_config", "argv", "cwd"):
        assert second[key] == first[key], key
    # The job is identical; only the submission id is fresh.
    assert second["job"] == first["job"]
    assert second["submission"]["submission_id"] != first["submission"]["submission_id"]
    sid1, sid2 = first["submission"]["submission_id"], second["submission"]["submission_id"]
    assert (tmp_path / "run/sbatch.sh").read_text() == first_script.replace(sid1, sid2)


def test_git_info(tmp_path):
    assert record.git_info(tmp_path) == {"commit": "unknown", "dirty": None}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record.git_info(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f").write_text("2")
    assert record.git_info(tmp_path) == {"commit": head, "dirty": True}


# ---------------------------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------------------------

SLURM_ARGV = ["slurm", "resources.nodes=3", "resources.gpus_per_node=8", "resources.cpus_per_node=32",
              "resources.memory_gb_per_node=480", "slurm.partition=gpu", "slurm.account=rec-team",
              "slurm.time=1-12:00:00", "slurm.setup=echo setup", "slurm.extra_directives=[--exclusive]",
              'env.NOTE="it\'s here"', "--", "onerec", "pipeline", "output_dir=runs/s", "seed=7"]


def test_sbatch_renders_every_variable_and_passes_bash_n(tmp_path):
    plan = plan_for(SLURM_ARGV, tmp_path)
    script = render(plan)
    check_rendered(script)  # no {{ / {% / {# left
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=onerec-pipeline", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=32", "#SBATCH --gpus-per-node=8", "#SBATCH --mem=480G", "#SBATCH --partition=gpu",
        "#SBATCH --account=rec-team", "#SBATCH --time=1-12:00:00", f"#SBATCH --output={tmp_path}/runs/s/slurm-%j.out",
        "#SBATCH --exclusive"]
    # Optional directives disappear when unset; no GPU line for CPU nodes.
    cpu_script = render(plan_for(["slurm", "--", "onerec", "prepare"], tmp_path))
    assert "--gpus-per-node" not in cpu_script and "--partition" not in cpu_script and "--mem=" not in cpu_script
    assert "--gpus-per-task" not in cpu_script and cpu_script.count("srun --nodes=1 --ntasks=1 --cpus-per-task=8 ") == 2
    assert subprocess.run(["bash", "-n"], input=cpu_script, text=True).returncode == 0


def test_sbatch_leftover_template_syntax_is_rejected(tmp_path, monkeypatch):
    import jinja2

    from onerec_launch import slurm

    with pytest.raises(ValueError, match="line 2 still holds template syntax '{{'"):
        check_rendered("#!/bin/bash\necho {{ nodes }}\n")
    # A template variable the renderer does not provide fails (StrictUndefined), instead of rendering as "".
    bad = tmp_path / "bad.j2"
    bad.write_text(slurm.TEMPLATE.read_text() + "echo {{ not_provided }}\n")
    monkeypatch.setattr(slurm, "TEMPLATE", bad)
    with pytest.raises(jinja2.UndefinedError, match="not_provided"):
        render(plan_for(["slurm", "--", "onerec", "prepare"], tmp_path))


STUB = """#!/bin/bash
{ printf '%s\\x1f' "$(basename "$0")" "$@"; printf '\\x1e'; } >> "$CALLS"
case "$(basename "$0") $*" in
  "scontrol show hostnames"*) printf 'node-a\\nnode-b\\nnode-c\\n' ;;
  srun*hostname*) echo "10.1.2.3 fe80::1" ;;
esac
exit 0
"""


# The script's node check (`python -c ... ADDRESS N`) passes only once N `ray start` steps have recorded themselves, as
# the real check passes only once N nodes are alive: the steps run in the background, so without this the script could
# finish before a worker's srun had written its record (seen once in CI).
WAIT_STUB = """#!/bin/bash
started=$(tr '\\036' '\\n' < "$CALLS" | grep -c $'ray\\x1fstart')
(( started >= $4 )) || exit 1
{ printf '%s\\x1f' "$(basename "$0")" "$3" "$4"; printf '\\x1e'; } >> "$CALLS"
exit 0
"""


def test_sbatch_script_starts_head_then_workers_then_submits(tmp_path):
    # Run the rendered script with stub scontrol / srun / ray / python that record their arguments.
    plan = plan_for(SLURM_ARGV, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "srun", "ray", "python"):
        (bin_dir / name).write_text(WAIT_STUB if name == "python" else STUB)
        (bin_dir / name).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_NODELIST": "node-[a-c]"}
    done = subprocess.run(["bash", "-c", render(plan)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [r.split("\x1f")[:-1] for r in calls.read_text().split("\x1e") if r]
    sruns = sorted(r for r in records if r[0] == "srun" and "ray" in r)
    assert sruns == sorted([
        # srun gets the node's CPUs and GPUs explicitly (SLURM >= 22.05 no longer passes sbatch's on to steps).
        ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=32", "--gpus-per-task=8", "-w", "node-a", "ray",
         "start", "--head", "--block",
         "--node-ip-address=10.1.2.3", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
         "--num-cpus=32", "--num-gpus=8", "--disable-usage-stats"],
        *(["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=32", "--gpus-per-task=8", "-w", node, "ray", "start",
           "--block", "--address=10.1.2.3:6379",
           "--num-cpus=32", "--num-gpus=8", "--disable-usage-stats"] for node in ("node-b", "node-c")),
    ])
    # It waits for the head alone, then for all 3 nodes.
    waits = [r[-2:] for r in records if r[0] == "python"]
    assert waits == [["10.1.2.3:6379", "1"], ["10.1.2.3:6379", "3"]]
    # The job goes last, through the head's dashboard, with the plan's entrypoint and runtime_env, unchanged.
    submit = records[-1]
    assert submit[:5] == ["ray", "job", "submit", "--address=http://10.1.2.3:8265",
                          f"--submission-id={plan.submission_id}"]
    assert json.loads(submit[5].removeprefix("--runtime-env-json=")) == plan.runtime_env
    assert submit[6:] == ["--", plan.entrypoint]
    assert plan.runtime_env["env_vars"]["NOTE"] == "it's here"


# ---------------------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------------------

K8S_ARGV = ["k8s", "k8s.image=registry.example/onerec:0.1.0", "resources.nodes=3", "resources.gpus_per_node=8",
            "resources.cpus_per_node=32", "resources.memory_gb_per_node=480", "k8s.volume_claim=runs",
            "--", "onerec", "pipeline", "output_dir=exp1", "seed=7"]


def test_rayjob_manifest_has_the_fields_kuberay_requires(tmp_path):
    plan = plan_for(K8S_ARGV, tmp_path)
    manifest = yaml.safe_load(render(plan))
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"] == "onerec-pipeline"
    spec = manifest["spec"]
    # Relative output_dir lands on the mounted volume.
    assert spec["entrypoint"] == "python -m onerec_dist.cli pipeline output_dir=/outputs/exp1 seed=7"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == plan.runtime_env == {"env_vars": plan.runtime_env["env_vars"]}
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0"}
    (worker,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert worker["groupName"] == "workers" and worker["rayStartParams"] == {}
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2  # 3 nodes = head + 2
    for group in (head, worker):
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/onerec:0.1.0"
        assert container["resources"]["limits"] == {"cpu": "32", "memory": "480Gi", "nvidia.com/gpu": "8"}
        assert container["resources"]["requests"] == {"cpu": "32", "memory": "480Gi"}
        assert container["volumeMounts"] == [{"name": "outputs", "mountPath": "/outputs"}]
        assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "runs"}
    validate_rayjob(manifest)


def test_multi_node_rayjob_needs_shared_storage(tmp_path):
    base = ["k8s", "k8s.image=img", "resources.nodes=2"]
    # Two pods, no shared volume: the driver would never see the workers' checkpoints -> refused, naming the field.
    with pytest.raises(ValueError, match=r"k8s.volume_claim: a RayJob of 2 nodes .* needs a volume"):
        plan_for([*base, "--", "onerec", "align", "output_dir=o"], tmp_path)
    # A volume, but output_dir / Ray storage outside it: refused too.
    with pytest.raises(ValueError, match=r"output_dir: '/data/o' is not on the shared volume"):
        plan_for([*base, "k8s.volume_claim=runs", "--", "onerec", "align", "output_dir=/data/o"], tmp_path)
    with pytest.raises(ValueError, match=r"trainer.storage_path: '/local/ray' is not on the shared volume"):
        plan_for([*base, "k8s.volume_claim=runs", "--", "onerec", "align", "output_dir=o",
                  "trainer.storage_path=/local/ray"], tmp_path)
    # On the volume (relative output_dir goes under the mount) or a URI: accepted. One node needs nothing shared.
    plan = plan_for([*base, "k8s.volume_claim=runs", "--", "onerec", "align", "output_dir=o",
                     "trainer.storage_path=s3://bucket/ray"], tmp_path)
    assert plan.job.output_dir == "/outputs/o"
    assert plan_for(["k8s", "k8s.image=img", "--", "onerec", "align", "output_dir=/data/o"], tmp_path)


def test_rayjob_cpu_only_single_node(tmp_path):
    plan = plan_for(["k8s", "k8s.image=img", "--", "onerec", "prepare", "output_dir=o"], tmp_path)
    manifest = yaml.safe_load(render(plan))
    assert manifest["spec"]["entrypoint"].endswith("output_dir=o")  # pod path: not resolved on this machine
    (worker,) = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert worker["replicas"] == 0
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8"}  # no nvidia.com/gpu when gpus_per_node=0, no memory limit when unset
    assert "volumes" not in worker["template"]["spec"]


@pytest.mark.parametrize("path", [
    "apiVersion", "metadata.name", "spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.rayStartParams",
    "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.image",
    "spec.rayClusterSpec.workerGroupSpecs.0.replicas", "spec.rayClusterSpec.workerGroupSpecs.0.groupName",
    "spec.rayClusterSpec.workerGroupSpecs.0.rayStartParams",
])
def test_validate_rayjob_rejects_a_missing_required_field(tmp_path, path):
    manifest = yaml.safe_load(render(plan_for(K8S_ARGV, tmp_path)))
    *parents, leaf = path.split(".")
    node = manifest
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    del node[leaf]
    with pytest.raises(ValueError, match="RayJob manifest"):
        validate_rayjob(manifest)


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    result = launch(parse_argv(["k8s", "--dry-run", *K8S_ARGV[1:]]), cwd=tmp_path)
    assert result.status == "DRY_RUN"
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "RayJob"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Ray Jobs end to end (real local clusters)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_backend_starts_and_stops_its_own_cluster(tmp_path, capsys):
    temp_dir = f"/tmp/rl_{secrets.token_hex(4)}"
    run_dir = tmp_path / "run"
    try:
        code = cli.main(["local", f"local.temp_dir={temp_dir}", "local.num_cpus=2", f"working_dir={REPO}", "--",
                         "onerec", "pipeline", f"output_dir={run_dir}", "pipeline.stages=[]"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "SUCCEEDED" in out and "local Ray cluster stopped" in out
        assert json.loads((run_dir / "summary.json").read_text())["stages"] == []
        launched = json.loads((run_dir / "launch.json").read_text())
        assert launched["local_cluster"]["temp_dir"] == temp_dir
        assert (run_dir / "relaunch.sh").is_file()
        assert leftover_processes(temp_dir) == []
    finally:
        for proc in leftover_processes(temp_dir):
            proc.kill()
        subprocess.run(["rm", "-rf", temp_dir])
