"""Packaging: the package list in pyproject.toml is complete, our kernels/ never shadows PyPI's `kernels`, and an
installed wheel carries its configs (conf/ -> onerec_conf) and runs stages outside the repository."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: REPO / path for name, path in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
        if not (root / "__init__.py").exists():
            found.add(name)  # kernels/ is a namespace root on purpose
    assert found == listed, f"pyproject packages out of date: missing {found - listed}, stale {listed - found}"


def test_kernels_folder_does_not_shadow_pypi_kernels():
    # Run from the repository root, where '' on sys.path would expose a regular package named `kernels`.
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace portion"
    code = ("from transformers.utils import is_kernels_available; import importlib, sys; "
            "assert not is_kernels_available(); "
            "m = importlib.import_module('kernels') if importlib.util.find_spec('kernels') else None; "
            "assert m is None or getattr(m, '__file__', None) is None, m; "
            "import onerec_kernels.constrained_step")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The configs ship with the package (conf/ installs as `onerec_conf`)
# ---------------------------------------------------------------------------------------------------------------

def test_conf_dir_lookup_order(tmp_path, monkeypatch):
    from onerec_dist import conf_dir

    # 1. ONEREC_CONF_DIR wins over everything.
    assert conf_dir.find_conf_dir({"ONEREC_CONF_DIR": str(tmp_path)}) == tmp_path
    # 2. In a checkout, conf/ beside onerec_dist (also the working_dir Ray Jobs uploads).
    assert conf_dir.find_conf_dir({}) == REPO / "conf"
    # 3. Without a source tree: the installed package data; none installed -> the expected path, for the error.
    monkeypatch.setattr(conf_dir, "SOURCE_TREE_CONF", tmp_path / "missing")
    monkeypatch.setattr(conf_dir, "installed_conf_dir", lambda: tmp_path)
    assert conf_dir.find_conf_dir({}) == tmp_path
    monkeypatch.setattr(conf_dir, "installed_conf_dir", lambda: None)
    assert conf_dir.find_conf_dir({}) == tmp_path / "missing"


def test_installed_conf_dir_reads_a_namespace_package(tmp_path, monkeypatch):
    from onerec_dist import conf_dir

    (tmp_path / "onerec_conf" / "trainer").mkdir(parents=True)  # no __init__.py, as conf/ in the wheel
    (tmp_path / "onerec_conf" / "config.yaml").write_text("output_dir: x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "onerec_conf", raising=False)
    assert conf_dir.installed_conf_dir() == tmp_path / "onerec_conf"


def test_installed_conf_dir_skips_search_locations_that_are_not_directories(tmp_path, monkeypatch):
    """An editable install puts a path-hook marker (not a directory) among the namespace package's locations;
    importlib.resources.files() raises NotADirectoryError on it, the lookup must step over it."""
    import importlib.machinery

    from onerec_dist import conf_dir

    (tmp_path / "onerec_conf").mkdir()
    (tmp_path / "onerec_conf" / "config.yaml").write_text("output_dir: x\n")
    spec = importlib.machinery.ModuleSpec("onerec_conf", None, is_package=True)
    spec.submodule_search_locations = ["__editable__.onerec_dist-0.1.0.finder.__path_hook__",
                                       str(tmp_path / "empty"), str(tmp_path / "onerec_conf")]
    monkeypatch.setattr(conf_dir.importlib.util, "find_spec", lambda name: spec)
    assert conf_dir.installed_conf_dir() == tmp_path / "onerec_conf"
    spec.submodule_search_locations = ["__editable__.onerec_dist-0.1.0.finder.__path_hook__"]
    assert conf_dir.installed_conf_dir() is None


def _source_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and new, unignored files): a build never writes into the repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.mark.slow
def test_installed_wheel_runs_prepare_and_align_outside_the_repo(tmp_path):
    """`pip install` of the wheel, as in a container image: every stage finds its configs in the package."""
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(wheels)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("onerec_dist-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("onerec_conf/")}
    expected = {f"onerec_conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected <= shipped, f"configs missing from the wheel: {sorted(expected - shipped)}"

    # A fresh virtualenv holding only the wheel; the heavy dependencies (torch, ray, ...) come from this
    # interpreter's site-packages through a .pth line (its .pth files, e.g. the editable install, are not run).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_heavy_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ONEREC_CONF_DIR", "PYTHONPATH", "RAY_ADDRESS")}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([str(python), "-c", "import onerec_dist.cli as c; print(c.CONF_DIR)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == Path(site) / "onerec_conf"

    onerec = str(venv / "bin" / "onerec")
    tiny = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "sid.codebook_size=4"]
    done = subprocess.run([onerec, "prepare", "output_dir=prep", *tiny], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((elsewhere / "prep" / "summary.json").read_text())["stage"] == "prepare"

    temp = f"/tmp/rw_{os.getpid()}"  # Ray's temp dir: short (socket paths)
    try:
        done = subprocess.run([onerec, "align", "stage=warmup", "output_dir=align", *tiny, "trainer.num_workers=1",
                               "trainer.max_steps=2", "align.warmup.max_steps=2", "trainer.micro_batch_size=4",
                               "trainer.precision=fp32", "align.max_length=256", f"trainer.ray_temp_dir={temp}"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((elsewhere / "align" / "summary.json").read_text())
    assert summary["stage"] == "align" and summary["steps"] == 2
