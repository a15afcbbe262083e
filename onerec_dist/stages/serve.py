"""`onerec serve action=start|stop`: the Think-Ahead HTTP endpoint (onerec_dist/distributed/serve_app.py).

``action=start`` serves model.name_or_path (a model directory carrying its IDs) with the cache of
``serving.cache_dir`` on ``serving.host:port``, writes ``<output_dir>/serve.json`` (URL, pid, application) and, with
``serving.blocking`` (default), stays in the foreground until Ctrl-C or SIGTERM, then shuts the endpoint down.
``action=stop`` (same output_dir) ends it: on a Ray cluster (``RAY_ADDRESS``) by deleting the application, else by
sending SIGTERM to the serving process recorded in serve.json.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

STATE_FILE = "serve.json"


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.serving.config import SERVE_ACTIONS, resolve_action, serving_config

    action = resolve_action(cfg, SERVE_ACTIONS)
    serve_cfg = serving_config(cfg)
    if action == "stop":
        return stop(output_dir, serve_cfg.app_name)
    model_dir = cfg.model.name_or_path
    if not model_dir or not Path(model_dir).is_dir():
        raise ValueError(f"model.name_or_path={model_dir!r}: `onerec serve` needs a local model directory carrying "
                         "its sid_table.json (the reason_sft export)")
    return start(str(Path(model_dir).resolve()), serve_cfg, output_dir)


def start(model_dir: str, serve_cfg, output_dir: Path) -> dict:
    from onerec_dist.distributed import ray_session, serve_app

    local = ray_session.session_address() is None  # a Ray of our own (else a cluster that outlives us)
    url = serve_app.start(model_dir, serve_cfg)
    state = {"url": url, "pid": os.getpid(), "app_name": serve_cfg.app_name, "model": model_dir,
             "cache_dir": serve_cfg.cache_dir, "ray_address": ray_session.session_address(), "blocking":
             serve_cfg.blocking}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    print(f"serve: {url}/recommend (POST) and {url}/health; stop with Ctrl-C or `onerec serve action=stop "
          f"output_dir={output_dir}`", flush=True)
    if not serve_cfg.blocking:
        return {"action": "start", **state, "stopped": False}
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    serve_app.stop(serve_cfg.app_name, shutdown_serve=local)  # on a cluster only our application goes
    ray_session.shutdown()
    (output_dir / STATE_FILE).unlink(missing_ok=True)
    return {"action": "start", **state, "stopped": True}


def stop(output_dir: Path, app_name: str, timeout_s: float = 60.0) -> dict:
    """SIGTERM the foreground `action=start` process recorded in serve.json (it deletes its application and
    exits); without one (``serving.blocking=false`` on a cluster), join the cluster and delete the application."""
    path = output_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    pid = state.get("pid") if state.get("blocking", True) else None
    if pid is not None and _alive(int(pid)):
        os.kill(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(int(pid)):
            if time.monotonic() > deadline:
                raise ValueError(f"the serving process {pid} did not exit within {timeout_s:.0f} s of SIGTERM")
            time.sleep(0.2)
        return {"action": "stop", "pid": int(pid), "how": "SIGTERM"}
    address = state.get("ray_address") or os.environ.get("RAY_ADDRESS")
    if not address:
        path.unlink(missing_ok=True)
        if not state:
            raise ValueError(f"{path} not found: no server was started with this output_dir (and no RAY_ADDRESS)")
        return {"action": "stop", "pid": pid, "how": "was not running"}
    from onerec_dist.distributed import ray_session, serve_app

    ray_session.ensure_ray(address)
    serve_app.stop(state.get("app_name", app_name), shutdown_serve=False)
    ray_session.shutdown()
    path.unlink(missing_ok=True)
    return {"action": "stop", "app_name": state.get("app_name", app_name), "how": f"deleted on {address}"}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (one that exited but its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(pid, 0)
    return state != "Z"
