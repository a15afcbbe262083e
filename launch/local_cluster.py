"""A throw-away Ray cluster on this machine, for `onerec-launch local` and the tests.

``ray start --head --block`` runs in its own session on 127.0.0.1 with every port picked free (two clusters, e.g.
two test runs, can share a machine) and a short temp dir (Unix socket paths are limited to 107 bytes). Stopping
ends exactly the processes this cluster started, by pid: never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray processes that take a port of their own; each gets a free one.
_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_command() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


class LocalRayCluster:
    """``with LocalRayCluster(num_cpus=2) as cluster: submit to cluster.address`` (http://127.0.0.1:PORT)."""

    def __init__(self, temp_dir: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 start_timeout_s: float = 60.0, env: dict[str, str] | None = None,
                 keep_temp_dir: bool = False) -> None:
        self._own_temp_dir = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rl_", dir="/tmp")
        self.num_cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
        self.num_gpus = num_gpus
        self.start_timeout_s = start_timeout_s
        self.env = env or {}
        self.keep_temp_dir = keep_temp_dir
        self.ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.address = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        command = [*_ray_command(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
                   f"--num-cpus={self.num_cpus}", "--disable-usage-stats"]
        command += [f"{flag}={port}" for flag, port in self.ports.items()]
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        return command

    @property
    def log_path(self) -> Path:
        return Path(self.temp_dir) / "ray_start.log"

    def start(self, attempts: int = 3) -> str:
        """Start the head and wait until its node has registered and its dashboard answers; returns the dashboard
        address. A head whose node fails to start (on a loaded machine the raylet gives up waiting for the
        dashboard agent and `ray start` exits) is started again on fresh ports, up to ``attempts`` times."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except _NodeStartFailed as err:
                if attempt == attempts:
                    raise RuntimeError(f"`ray start` failed {attempts} times; last:\n{err}") from None
                self.ports = {flag: free_port() for flag in _PORT_FLAGS}
                self.address = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        raise AssertionError("unreachable")

    def _start_once(self) -> str:
        from onerec_dist.distributed.job_submission import connect

        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        # Like a cluster started from an activated venv: `python` in a job's entrypoint is this interpreter.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               # The raylet waits for the dashboard agent (a Python process) to write its port file, then aborts the
               # node; Ray's defaults are too short on a loaded 2-core machine (seen: raylet aborted after 16 s).
               "RAY_raylet_start_wait_time_s": "120", "RAY_agent_register_timeout_ms": "120000", **self.env}
        with open(self.log_path, "w") as log:
            # Own session: the cluster's processes are told apart from everything else by their session id.
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            text = self.log_path.read_text(errors="replace")
            # A failed node start does not always end `ray start --block` (its other threads keep it alive).
            if self.process.poll() is not None or "node timed out during startup" in text:
                tail = self._log_tail()
                self.stop()
                raise _NodeStartFailed(f"`ray start` failed (exit code {self.process.returncode}):\n{tail}")
            try:
                # `ray start --block` prints this once its node has registered with the GCS; the dashboard can
                # answer before that, and dies with the node when the node's start fails.
                if "Ray runtime started." in text:
                    connect(self.address, timeout_s=0.0)
                    return self.address
            except ConnectionError:
                pass
            if time.monotonic() >= deadline:
                tail = self._log_tail()
                self.stop()
                raise TimeoutError(f"Ray head at {self.address} not up after {self.start_timeout_s} s "
                                   f"(local.start_timeout_s):\n{tail}") from None
            time.sleep(0.5)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def processes(self) -> list:
        """Processes of this cluster still alive: descendants of `ray start`, and anything in its session."""
        import psutil

        if self.process is None:
            return []
        found = {}
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                found[child.pid] = child
            found[self.process.pid] = psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.process.pid:
                    found[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        return [p for p in found.values() if _alive(p)]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to `ray start --block` (it shuts its node down); SIGKILL whatever of ours is left."""
        import psutil

        if self.process is None:
            return
        ours = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs([p for p in ours if _alive(p)], timeout=5)
        for proc in alive + self.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.process.poll() is None:
            self.process.wait(5)
        if self._own_temp_dir and not self.keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _NodeStartFailed(RuntimeError):
    """`ray start` exited before its node was up."""


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
