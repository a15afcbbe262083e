"""Progress of a stage: one live bar on a terminal, a bounded number of log lines elsewhere.

Under Ray every line a worker writes reaches the driver's output, and a tqdm bar that is not on a terminal writes a
carriage-return update per refresh: hundreds of lines per stage in a log. ``Progress`` therefore picks by where its
output goes: a terminal gets a rate-limited tqdm bar (``mininterval``), anything else (a log file, a Ray worker's
captured stdout) gets one plain line every ``ceil(total / max_lines)`` updates plus a last line at ``close()``,
so a stage writes at most ``max_lines + 1`` lines whatever its length. A Ray worker never has a terminal: when the
driver has one, the worker writes its count to a small file (``ProgressFile``, rate-limited) and the driver draws the
one live bar from it (``watch_progress_file``): no dependence on how Ray forwards worker output (Ray Train V2
re-routes a worker's print through its logger). The file lives in the run's output_dir, which the driver and the
ranks share anyway (exports, summary).

Pure: tqdm only.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

Mode = Literal["bar", "lines", "off"]
MODES = ("bar", "lines", "off")


def terminal_mode(stream: TextIO | None = None) -> Mode:
    """"bar" when ``stream`` (default stderr) is a terminal, else "lines"."""
    stream = sys.stderr if stream is None else stream
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


class Progress:
    """``update(n, **postfix)`` / ``close()`` (or a ``with`` block) over ``total`` units.

    ``mode``: "bar" (tqdm), "lines" (``max_lines`` evenly spaced lines), "off", or None for ``terminal_mode(file)``.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", mode: Mode | None = None,
                 file: TextIO | None = None, initial: int = 0, max_lines: int = 20, mininterval: float = 0.5):
        self.mode = terminal_mode(file) if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"progress mode={self.mode!r}; allowed: {', '.join(MODES)}")
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n = self._start = initial
        self._started = time.perf_counter()
        self._postfix: dict[str, Any] = {}
        self._printed_at = initial  # count at the last line written
        self.every = max(1, math.ceil((total or max_lines) / max_lines))
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, dynamic_ncols=True,
                            mininterval=mininterval)

    def update(self, n: int = 1, **postfix: Any) -> None:
        before, self.n = self.n, self.n + n
        self._postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines" and self.n // self.every > before // self.every:
            self._line()

    def _line(self) -> None:
        seconds = time.perf_counter() - self._started
        rate = (self.n - self._start) / seconds if seconds > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self._postfix.items())
        # write(), not print(): Ray Train patches print in its workers and would emit the line twice (log + tee)
        stream = self.file if self.file is not None else sys.stderr
        stream.write(f"{self.desc}: {done}{percent} {self.unit}, {rate:.3g} {self.unit}/s, {seconds:.1f} s{extra}\n")
        stream.flush()
        self._printed_at = self.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.n != self._printed_at:
            self._line()  # the last count, when the last update did not fall on a line

    @classmethod
    def iterate(cls, items, desc: str, **kwargs: Any):
        """Yield ``items`` (a sized iterable), one update per item, closing at the end."""
        with cls(len(items), desc, **kwargs) as bar:
            for item in items:
                yield item
                bar.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressFile:
    """The writer side of a relayed bar: ``update(n, **postfix)`` records the count in ``path`` (JSON, replaced
    atomically) at most every ``min_interval`` seconds, and always at ``close()``."""

    def __init__(self, path: str | Path, total: int | None, initial: int = 0, min_interval: float = 0.5):
        self.path, self.total, self.n = Path(path), total, initial
        self.min_interval, self._written = min_interval, 0.0
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self._postfix.update(postfix)
        if time.monotonic() - self._written >= self.min_interval:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"n": self.n, "total": self.total, "postfix": self._postfix}))
        tmp.replace(self.path)
        self._written = time.monotonic()

    def close(self) -> None:
        self._write()


@contextmanager
def watch_progress_file(path: str | Path, total: int | None, desc: str, *, enabled: bool = True,
                        poll_s: float = 0.5, file: TextIO | None = None) -> Iterator[None]:
    """Draw one bar (``mode="bar"``) on this process's terminal from what a ``ProgressFile`` at ``path`` reports,
    polled every ``poll_s`` seconds by a daemon thread, until the block exits. A stale file is removed first."""
    path = Path(path)
    path.unlink(missing_ok=True)
    if not enabled:
        yield
        return
    stop = threading.Event()
    bar = Progress(total, desc, unit="step", mode="bar", file=file)

    def follow() -> None:
        shown = 0  # a resumed run's first report jumps to its checkpoint's step
        while True:
            stopping = stop.wait(poll_s)
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):  # not written yet, or replaced while read
                state = None
            if state is not None and state["n"] != shown:
                bar.update(state["n"] - shown, **state["postfix"])
                shown = state["n"]
            if stopping:
                return

    thread = threading.Thread(target=follow, name="progress-file", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        bar.close()
