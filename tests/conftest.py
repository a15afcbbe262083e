"""Test-wide setup: offline environment, Triton interpreter (must precede the first `import triton`), data paths."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from onerec_dist.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ONEREC_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data, skipping the test with a reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (set ONEREC_SHARED_DATA or check out ../shared)")
    return path


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray with 2 CPUs for one test module's multi-process runs (Ray Train workers, Ray tasks), stopped at
    the module's end: modules that start their own head (`ray start`) run with no other Ray on the machine.

    Workers inherit the raylet's environment, hence set here: tests/ on PYTHONPATH (they unpickle jobs defined in
    test modules), one OpenMP thread each (2 cores), a fast worker health check, wandb kept out of ~/.cache."""
    import shutil

    ray = pytest.importorskip("ray")
    tests_dir = str(Path(__file__).resolve().parent)
    wandb_home = tmp_path_factory.mktemp("wandb_home")
    temp_dir = f"/tmp/ray_t{os.getpid()}"  # short: Unix socket paths must stay under 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(wandb_home))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        mp.setenv("OMP_NUM_THREADS", "1")
        if ray.is_initialized():  # a test that used Ray without this fixture may have left its driver connected
            ray.shutdown()
        ray.init(num_cpus=2, _temp_dir=temp_dir)
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def leftover_processes(temp_dir: str) -> list:
    """Processes whose command line names ``temp_dir``: what a stopped local Ray cluster (ray start --temp-dir)
    must not leave behind."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found
