"""What every launched run leaves in its directory: launch.json and relaunch.sh.

The `onerec` stage itself writes config.yaml (the resolved job config) and summary.json into output_dir; the
launcher adds launch.json (package version, git commit + dirty flag, the validated launcher config, the job,
where it was submitted) and relaunch.sh (the exact `onerec-launch` command that submits the same job again).
Launching again into the same directory moves the earlier launch.json into launch_history.jsonl.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from onerec_launch.request import LaunchRequest, parse_argv

LAUNCH_JSON = "launch.json"
RELAUNCH_SH = "relaunch.sh"
LAUNCH_HISTORY = "launch_history.jsonl"  # earlier launch.json records of the same directory, one per line
# Identity of one submission, not part of the job: a relaunch must get a fresh one (Ray rejects a reused id).
NOT_RELAUNCHED = ("ray.submission_id",)


def git_info(directory: Path) -> dict:
    """{"commit": sha or "unknown", "dirty": bool or None}; no git / not a repository gives "unknown"."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def package_version() -> str:
    import onerec_dist

    return onerec_dist.__version__


def launcher_program() -> str:
    """The `onerec-launch` console script of this interpreter's environment, else the bare name."""
    script = Path(sys.executable).parent / "onerec-launch"
    return str(script) if script.exists() else "onerec-launch"


def relaunch_request(request: LaunchRequest) -> LaunchRequest:
    """The request a relaunch runs: the same one minus per-submission identity and --dry-run."""
    overrides = tuple(o for o in request.launcher_overrides if o.split("=", 1)[0].lstrip("+~") not in NOT_RELAUNCHED)
    return LaunchRequest(backend=request.backend, launcher_overrides=overrides, stage=request.stage,
                         job_overrides=request.job_overrides, dry_run=False)


def relaunch_script(request: LaunchRequest, cwd: Path) -> str:
    """bash script that submits ``request`` again from ``cwd``; extra arguments extend the job's overrides."""
    command = shlex.join([launcher_program(), *relaunch_request(request).argv()])
    return "\n".join([
        "#!/usr/bin/env bash",
        "# Relaunch this run: the same backend, launcher overrides and job (output_dir included).",
        "# Extra arguments are appended to the job's overrides; the last value of a key wins, e.g.",
        "#   bash relaunch.sh output_dir=/elsewhere      # same job into another directory",
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        f'exec {command} "$@"',
        "",
    ])


def parse_relaunch(text: str) -> LaunchRequest:
    """Read relaunch.sh back into the LaunchRequest it runs (with no extra arguments)."""
    lines = [line for line in text.splitlines() if line.startswith("exec ")]
    if len(lines) != 1:
        raise ValueError(f"relaunch.sh: expected one `exec onerec-launch ...` line, found {len(lines)}")
    argv = shlex.split(lines[0])[1:]
    if not argv or Path(argv[0]).name != "onerec-launch":
        raise ValueError(f"relaunch.sh: the exec line does not run onerec-launch: {lines[0]!r}")
    if argv[-1] == "$@":
        argv = argv[:-1]
    return parse_argv(argv[1:])


def write_record(record_dir: Path, record: dict, request: LaunchRequest, cwd: Path) -> Path:
    """Write launch.json (``record`` + version, git, host, time) and relaunch.sh; returns launch.json's path."""
    record_dir.mkdir(parents=True, exist_ok=True)
    previous = record_dir / LAUNCH_JSON
    if previous.exists():  # a relaunch into the same directory keeps the earlier launches' provenance
        with open(record_dir / LAUNCH_HISTORY, "a") as history:
            history.write(json.dumps(json.loads(previous.read_text())) + "\n")
        previous.unlink()
    script = record_dir / RELAUNCH_SH
    script.write_text(relaunch_script(request, cwd))
    script.chmod(0o755)
    full = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "onerec_dist_version": package_version(),
        "cwd": str(cwd),
        "argv": request.argv(),
        "relaunch": str(script),
        **record,
    }
    return update_record(record_dir, full)


def update_record(record_dir: Path, fields: dict) -> Path:
    """Merge ``fields`` into launch.json (atomically: a crash never leaves half a file)."""
    path = record_dir / LAUNCH_JSON
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
