"""One direction of imports (README, "Where things live"):

- only onerec_dist/distributed/ imports deepspeed, ray or torch.distributed (library, launch, benchmarks, kernels);
- ``import onerec_dist`` and every module outside distributed/ leave ray and deepspeed unloaded;
- library modules never import the stages, and the stages never import the CLI.

Imports are read with ``ast`` (every ``import`` / ``from`` statement, also the lazy ones inside functions), so a
heavy import hidden in a function body is caught as well.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("onerec_dist", "launch", "benchmarks", "kernels")
DISTRIBUTED = REPO / "onerec_dist" / "distributed"
ENGINE_ONLY = ("deepspeed", "ray", "torch.distributed")


def python_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file; ``from a import b`` yields a and a.b."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(files: list[Path], packages: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line}: {module}" for path in files for line, module in imported_modules(path)
            if any(is_under(module, p) for p in packages)]


def test_import_scanner_sees_lazy_and_from_imports(tmp_path):
    # The rule is only as good as the scanner: a function-level import and `from torch import distributed` count.
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    import ray.train\n\nfrom torch import distributed as dist\nimport torch\n")
    modules = [m for _, m in imported_modules(sample)]
    assert "ray.train" in modules and "torch.distributed" in modules
    assert not any(is_under("torch", p) for p in ENGINE_ONLY) and is_under("ray.train", "ray")


def test_only_distributed_imports_ray_deepspeed_torch_distributed():
    files = [p for p in python_files(*SCANNED) if DISTRIBUTED not in p.parents]
    assert offenders(files, ENGINE_ONLY) == [], "move these imports into onerec_dist/distributed/"


def test_library_never_imports_stages_and_stages_never_import_cli():
    stages_dir = REPO / "onerec_dist" / "stages"
    library = [p for p in python_files("onerec_dist")
               if stages_dir not in p.parents and p != REPO / "onerec_dist" / "cli.py"]
    assert offenders(library, ("onerec_dist.stages",)) == [], "library code must not import a stage module"
    assert offenders(python_files("onerec_dist/stages"), ("onerec_dist.cli",)) == [], "stages must not import the CLI"


def library_modules() -> list[str]:
    """Every importable module of onerec_dist outside distributed/ (dotted names)."""
    names = []
    for path in python_files("onerec_dist"):
        if DISTRIBUTED in path.parents or path == DISTRIBUTED / "__init__.py":
            continue
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("heavy", ["ray", "deepspeed"])
def test_importing_the_library_leaves_engine_packages_unloaded(heavy):
    # One subprocess imports every module outside distributed/; a module that pulled in ray or deepspeed at import
    # time (directly or through another module) leaves it in sys.modules.
    modules = library_modules()
    assert "onerec_dist.stages.pipeline" in modules and "onerec_dist.sid.model_ids" in modules
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"loaded = sorted(m for m in sys.modules if m == {heavy!r} or m.startswith({heavy!r} + '.'))\n"
            "print(loaded[:5])\nsys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"importing the library loaded {heavy}: {result.stdout}{result.stderr[-2000:]}"
