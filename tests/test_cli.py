"""The `onerec` CLI: stage dispatch, Hydra overrides, errors naming the valid choices, outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onerec_dist.cli import main
from onerec_dist.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_unknown_stage_names_valid_ones(capsys):
    assert main(["bogus"]) == 2
    assert "unknown stage 'bogus'; valid stages: prepare" in capsys.readouterr().err


def test_unknown_group_option_names_choices(capsys):
    assert main(["prepare", "data=nope"]) == 2
    err = capsys.readouterr().err
    assert "Could not find 'data/nope'" in err and "letter" in err and "synthetic" in err


def test_unknown_key_names_valid_keys(capsys):
    assert main(["prepare", "data.colour=red"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.colour'" in err and "max_history" in err


def test_bad_value_names_allowed_values(capsys):
    assert main(["prepare", "data.on_short_user=maybe"]) == 2
    assert "data.on_short_user='maybe' is not allowed; allowed values: 'drop', 'error'" in capsys.readouterr().err


def test_cfg_job_prints_resolved_config(capsys):
    assert main(["prepare", "data.max_history=7", "--cfg", "job"]) == 0
    assert "max_history: 7" in capsys.readouterr().out


def test_prepare_writes_config_and_summary(tmp_path):
    assert main(["prepare", f"output_dir={tmp_path}", "data.synthetic.num_users=50"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage"] == "prepare" and summary["num_users"] == 50
    assert "num_users: 50" in (tmp_path / "config.yaml").read_text()


def test_pipeline_nests_stage_summaries(tmp_path):
    assert main(["pipeline", f"output_dir={tmp_path}", "pipeline.stages=[prepare]",
                 "data.synthetic.num_users=40"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # The override reached the nested stage.
    assert summary["prepare"]["num_users"] == 40
    assert (tmp_path / "prepare" / "summary.json").is_file()


def test_pipeline_rejects_unknown_stage(tmp_path, capsys):
    assert main(["pipeline", f"output_dir={tmp_path}", "pipeline.stages=[prepare,typo]"]) == 2
    assert "pipeline.stages: unknown stage(s) ['typo']" in capsys.readouterr().err


@pytest.mark.parametrize("heavy", ["deepspeed", "ray", "triton", "wandb", "flash_attn"])
def test_import_is_light(heavy):
    code = ("import sys, onerec_dist, onerec_dist.cli, onerec_dist.metrics, onerec_dist.data.splits; "
            f"sys.exit(1 if {heavy!r} in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, f"import pulled in {heavy}"


def undocumented_lines(text: str) -> list[str]:
    """Key lines of a config file without a comment line directly above them. Exempt: the Hydra ``defaults`` list and
    ``# @package`` header (Hydra syntax, not settings) and list items of a block list (documented by their key)."""
    lines, bad, in_defaults = text.splitlines(), [], False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and (stripped.startswith("- ") or not stripped):
            in_defaults = bool(stripped)
            continue
        in_defaults = False
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        if i == 0 or not lines[i - 1].lstrip().startswith("#"):
            bad.append(line)
    return bad


@pytest.mark.parametrize("path", sorted((REPO / "conf").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_field_has_a_comment_above(path):
    assert undocumented_lines(path.read_text()) == [], f"{path.relative_to(REPO)}: fields without a comment above"


def test_comment_rule_catches_an_undocumented_field():
    assert undocumented_lines("defaults:\n  - x\n  - _self_\n\n# A.\na: 1\nb: 2\n") == ["b: 2"]
