"""Progress output: a live bar on a terminal, a bounded number of lines in logs (Ray workers, files)."""

from __future__ import annotations

import io
import json

import pytest

from onerec_dist.progress import Progress, terminal_mode


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_get_at_most_max_lines_plus_one():
    # 1,000 updates into a non-terminal stream, max_lines=20: a line every ceil(1000 / 20) = 50 updates -> 20 lines,
    # the last at 1000/1000 (close adds none: the count did not move since). A tqdm bar would write one \r update per
    # refresh instead.
    log = io.StringIO()
    with Progress(1000, "train", unit="step", file=log) as bar:
        assert bar.mode == "lines"
        for step in range(1000):
            bar.update(1, loss=f"{1 / (step + 1):.3f}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in log.getvalue()
    assert lines[0].startswith("train: 50/1000 (5%) step") and lines[-1].startswith("train: 1000/1000 (100%)")
    assert "loss=0.001" in lines[-1]


@pytest.mark.parametrize("total, updates, expected", [(7, 7, 7), (45, 44, 15), (100_000, 3, 1)])
def test_line_count_is_bounded_whatever_the_length(total, updates, expected):
    # max_lines 20, every = ceil(total / 20). total 7 -> every 1 -> 7 lines. total 45 -> every 3 -> lines at
    # 3, 6, ..., 42 (14) + 1 at close for the count 44 that fell between lines = 15. total 100,000 -> every 5,000:
    # 3 updates print nothing until close -> 1 line.
    log = io.StringIO()
    bar = Progress(total, "eval", file=log)
    for _ in range(updates):
        bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) == expected


def test_terminal_gets_a_bar_and_off_is_silent():
    assert terminal_mode(FakeTerminal()) == "bar" and terminal_mode(io.StringIO()) == "lines"
    term = FakeTerminal()
    with Progress(10, "train", file=term) as bar:
        assert bar.mode == "bar" and bar.bar is not None
        for _ in range(10):
            bar.update(1)
    assert "10/10" in term.getvalue()
    quiet = io.StringIO()
    with Progress(10, "eval", mode="off", file=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    assert list(Progress.iterate([1, 2, 3], "x", mode="off")) == [1, 2, 3]
    with pytest.raises(ValueError, match="progress mode='live'; allowed: bar, lines, off"):
        Progress(1, "x", mode="live")


def test_training_logger_in_a_log_writes_a_bounded_number_of_lines(capsys, tmp_path):
    from onerec_dist.distributed.worker import RankZeroLogger
    from onerec_dist.training.config import TrainerConfig

    cfg = TrainerConfig(max_steps=500, wandb={"mode": "disabled"})
    logger = RankZeroLogger(cfg, tmp_path, rank=0, initial_step=0, config={}, progress="lines")
    for step in range(500):
        logger.step(loss=1.0 / (step + 1))
    logger.close()
    silent = RankZeroLogger(cfg, tmp_path, rank=1, initial_step=0, config={}, progress="lines")
    silent.step(0.5)
    silent.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 20 and err[-1].startswith("train: 500/500 (100%) step")


def test_training_logger_counts_to_the_loops_budget_not_max_steps(capsys, tmp_path):
    # trainer.max_epochs ends a loop long before trainer.max_steps (worker.step_budget): the bar's total is the budget
    # the loop passes, so 40 steps of a 40-step budget end at 40/40 (100%), in 20 lines (one every 40 / 20 = 2 steps)
    from onerec_dist.distributed.worker import RankZeroLogger
    from onerec_dist.training.config import TrainerConfig

    cfg = TrainerConfig(max_steps=3000, max_epochs=4, wandb={"mode": "disabled"})
    logger = RankZeroLogger(cfg, tmp_path, rank=0, initial_step=0, config={}, progress="lines", total_steps=40)
    for step in range(40):
        logger.step(loss=1.0)
    logger.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 20 and err[0].startswith("train: 2/40 (5%)") and err[-1].startswith("train: 40/40 (100%)")


def test_a_relayed_bar_follows_the_writer(tmp_path):
    # A Ray worker has no terminal: rank 0 writes its count to a file (at most every min_interval, always at close)
    # and the driver draws the one bar from it. 100 updates with min_interval 0 -> the driver's bar ends at 100/100.
    from onerec_dist.progress import ProgressFile, watch_progress_file

    term, path = FakeTerminal(), tmp_path / "progress.json"
    path.write_text('{"n": 7, "total": 9, "postfix": {}}')  # a previous run's file is removed, not shown
    with watch_progress_file(path, 100, "train", poll_s=0.01, file=term):
        assert not path.exists()
        writer = ProgressFile(path, 100, min_interval=0.0)
        for step in range(100):
            writer.update(1, loss=f"{1 / (step + 1):.2f}")
        writer.close()
    out = term.getvalue()
    assert "100/100" in out and "loss=0.01" in out and "7/9" not in out
    assert json.loads(path.read_text())["n"] == 100
    quiet = FakeTerminal()
    with watch_progress_file(tmp_path / "other.json", 10, "train", enabled=False, file=quiet):
        pass
    assert quiet.getvalue() == ""
