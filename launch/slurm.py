"""SLURM: render templates/sbatch.sh.j2 from the launcher config and submit it with `sbatch`.

The script starts a Ray head on the first node and a worker on every other node (srun), waits until all nodes have
joined, then submits the job with `ray job submit` (same entrypoint and runtime_env as the `ray` backend) and exits
with the job's status. Rendering uses jinja2 (already a dependency of torch) with StrictUndefined: a variable the
template uses but the renderer does not give fails loudly, and ``check_rendered`` rejects any leftover ``{{``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

from onerec_launch.config import LaunchConfig

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sbatch.sh.j2"
# Openers only: closers such as "}}" legitimately end the runtime_env JSON.
_LEFTOVER_MARKERS = ("{{", "{%", "{#")


def render_sbatch(cfg: LaunchConfig, *, job_name: str, entrypoint: str, runtime_env: dict, submission_id: str,
                  working_dir: Path, record_dir: Path, relaunch: str, version: str) -> str:
    """The sbatch script as text (every template variable filled; see check_rendered)."""
    import jinja2

    for name, path in (("working_dir", working_dir), ("record_dir", record_dir)):
        if any(c.isspace() for c in str(path)):
            raise ValueError(f"{name}: SLURM paths must not contain whitespace (#SBATCH lines), got {str(path)!r}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    template = env.from_string(TEMPLATE.read_text())
    resources, slurm = cfg.resources, cfg.slurm
    text = template.render(
        version=version, relaunch=relaunch, job_name=job_name, nodes=resources.nodes,
        cpus_per_node=resources.cpus_per_node, gpus_per_node=resources.gpus_per_node,
        memory_gb_per_node=resources.memory_gb_per_node, partition=slurm.partition, account=slurm.account,
        time=slurm.time, record_dir=str(record_dir), extra_directives=slurm.extra_directives,
        working_dir=str(working_dir), setup=slurm.setup, env=runtime_env.get("env_vars", {}),
        ray_port=slurm.ray_port, dashboard_port=slurm.dashboard_port, join_timeout_s=slurm.join_timeout_s,
        python=cfg.python or "python", submission_id=submission_id,
        runtime_env_json=json.dumps(runtime_env, sort_keys=True), entrypoint=entrypoint,
    )
    check_rendered(text)
    return text


def check_rendered(text: str) -> None:
    """Raise ValueError if template syntax survived rendering (a variable left unfilled or mistyped)."""
    for number, line in enumerate(text.splitlines(), 1):
        for marker in _LEFTOVER_MARKERS:
            if marker in line:
                raise ValueError(f"rendered sbatch script line {number} still holds template syntax {marker!r}: {line}")


def submit_sbatch(script: Path) -> str:
    """`sbatch --parsable script` -> the SLURM job id."""
    if shutil.which("sbatch") is None:
        raise RuntimeError(f"sbatch is not on PATH: submit {script} on a SLURM login node, "
                           "or use --dry-run / slurm.submit=false to only render it")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
