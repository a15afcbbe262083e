"""The `onerec-launch` command line as data: backend, launcher overrides, the job after `--`, flags.

``parse_argv`` is shared by the CLI and by ``record.parse_relaunch`` so that a relaunch.sh is read back with exactly
the parser that will run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from onerec_launch.config import BACKENDS
from onerec_launch.job import normalise_overrides, parse_job_argv

FLAGS = ("--dry-run",)


@dataclass(frozen=True)
class LaunchRequest:
    """`onerec-launch <backend> <launcher_overrides> [--dry-run] -- onerec <stage> <job_overrides>`."""

    backend: str
    launcher_overrides: tuple[str, ...]
    stage: str
    job_overrides: tuple[str, ...]
    dry_run: bool = False

    def argv(self) -> list[str]:
        """Back to a command line (without the program name); parse_argv(argv()) == self."""
        flags = ["--dry-run"] if self.dry_run else []
        return [self.backend, *self.launcher_overrides, *flags, "--", "onerec", self.stage, *self.job_overrides]


def parse_argv(argv: list[str]) -> LaunchRequest:
    """Parse the arguments after `onerec-launch`; every mistake is a ValueError saying what is valid."""
    if not argv:
        raise ValueError(f"missing backend; valid backends: {', '.join(BACKENDS)}")
    backend, rest = argv[0], list(argv[1:])
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if "--" not in rest:
        raise ValueError("missing job: put `-- onerec <stage> [overrides]` after the launcher overrides, "
                         f"e.g. `onerec-launch {backend} -- onerec pipeline output_dir=outputs/run`")
    split = rest.index("--")
    launcher_args, job_argv = rest[:split], rest[split + 1:]
    dry_run = False
    launcher_overrides = []
    for arg in launcher_args:
        if arg == "--dry-run":
            dry_run = True
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}; options: {', '.join(FLAGS)}, --help")
        elif "=" not in arg:
            raise ValueError(f"launcher override {arg!r} is not key=value (e.g. ray.address=http://HEAD:8265)")
        else:
            launcher_overrides.append(arg)
    stage, job_overrides = parse_job_argv(job_argv)
    return LaunchRequest(backend=backend, launcher_overrides=tuple(normalise_overrides(launcher_overrides, "launcher override")),
                         stage=stage, job_overrides=tuple(job_overrides), dry_run=dry_run)
