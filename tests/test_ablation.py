"""`onerec ablation`: the table from hand-made row summaries (worked paired-interval examples), idempotent
re-rendering, published rows, the missing-parent / missing-stage errors, and one real run of rows popular, base and
ia on tiny synthetic data (slow: two Ray trainings)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec_dist.ablation.rows import LOCAL_STEPS, ROWS
from onerec_dist.ablation.table import build_table, paired_delta, render_table
from onerec_dist.reasoning.think_eval import paired_bootstrap


def write_row(out: Path, name: str, hits: list[int], users=None, dataset="synthetic", **extra) -> dict:
    """A row summary whose predictions put user u's target first when hits[u] == 1, else nowhere in the top 10."""
    users = list(range(len(hits))) if users is None else users
    targets = [100 + u for u in users]
    column = extra.pop("column", "model")
    preds = [[t] + list(range(9)) if h else list(range(10)) for t, h in zip(targets, hits)]
    row_dir = out / name
    row_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user": users, "target": targets, column: preds}), row_dir / "predictions.parquet")
    row = ROWS[name]
    summary = {"ablation_row": name, "kind": row.kind, "parent": row.parent, "compare_to": row.compare_to,
               "dataset": dataset, "num_users": len(hits), "column": column,
               "metrics": {"recall@5": float(np.mean(hits)), "recall@10": float(np.mean(hits)), "validity": 1.0},
               "predictions_path": str(row_dir / "predictions.parquet"), "training_tokens": 10,
               "training_tokens_total": 10, "wall_seconds": 1.0, "export_dir": str(row_dir / "export"), **extra}
    (row_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_row_table_is_consistent():
    from onerec_dist.stages import STAGES

    for row in ROWS.values():
        assert row.steps[-1] == "eval", row.name
        for ref in (row.parent, row.compare_to, row.match_steps and row.match_steps[0]):
            assert ref is None or ref in ROWS, (row.name, ref)
        # Every step is a stage of the CLI or a local step; rl is being written elsewhere (its row fails clearly).
        assert all(s in STAGES or s in LOCAL_STEPS or s == "rl" for s in row.steps), row.name
    assert ROWS["ia_more"].match_steps == ("ia_r", "reason_sft", "align.multitask.max_steps")


def test_constant_gain_has_a_point_interval(tmp_path):
    # Every one of 5 users: hit in ia, miss in base -> diff_u = 1 for all u, so every resample's mean is 1:
    # Δ = 1.0 with the interval [1.0, 1.0]; base itself: Recall@10 = 0 with interval [0, 0].
    write_row(tmp_path, "base", [0, 0, 0, 0, 0])
    write_row(tmp_path, "ia", [1, 1, 1, 1, 1])
    base, ia = build_table(tmp_path, num_resamples=200)
    assert ia["delta_vs"] == "base" and ia["delta_recall@10"] == 1.0
    assert (ia["delta_ci_low"], ia["delta_ci_high"]) == (1.0, 1.0)
    assert (base["recall@10_ci_low"], base["recall@10_ci_high"]) == (0.0, 0.0) and base["delta_vs"] is None


def test_paired_interval_worked_example(tmp_path):
    # 8 users. base hits users 0-3, ia hits users 0-4: diff = [0,0,0,0,1,0,0,0], Δ = 1/8 = 0.125.
    # A resample's mean is (number of draws of user 4) / 8, a Binomial(8, 1/8) / 8: P(0 draws) = (7/8)^8 = 0.344
    # > 0.025, so the 2.5 % quantile is 0 and the interval is [0, q] with q in {0.25, 0.375} (P(>= 3 draws) =
    # 0.094, P(>= 4) = 0.018): the gain of one user in eight is not outside its interval.
    write_row(tmp_path, "base", [1, 1, 1, 1, 0, 0, 0, 0])
    write_row(tmp_path, "ia", [1, 1, 1, 1, 1, 0, 0, 0])
    _, ia = build_table(tmp_path, num_resamples=4000, seed=3)
    assert ia["delta_recall@10"] == pytest.approx(0.125)
    assert ia["delta_ci_low"] == 0.0 and ia["delta_ci_high"] in (0.25, 0.375)
    # The same numbers as the bootstrap applied directly to the hit vectors (the table adds nothing to it).
    direct = paired_bootstrap(np.array([1, 1, 1, 1, 1, 0, 0, 0.]), np.array([1, 1, 1, 1, 0, 0, 0, 0.]), 4000, 3)
    assert [ia["delta_ci_low"], ia["delta_ci_high"]] == direct["ci95"]
    # Unpaired, the two rows' intervals (each of a 4/8 vs 5/8 hit rate) overlap widely: pairing is what makes the
    # Δ interval as narrow as [0, <= .375] instead of about +-0.5.
    base, ia = build_table(tmp_path, num_resamples=4000, seed=3)
    assert ia["recall@10_ci_low"] < base["recall@10_ci_high"]


def test_pairs_by_user_not_by_position(tmp_path):
    # The reference row lists the same users in reverse order: the Δ must not change.
    write_row(tmp_path, "base", [0, 1, 0, 1, 0, 0])
    write_row(tmp_path, "ia", [1, 1, 0, 1, 1, 0])
    expected = build_table(tmp_path, num_resamples=300)[1]
    write_row(tmp_path, "base", [0, 0, 1, 0, 1, 0], users=[5, 4, 3, 2, 1, 0])
    assert build_table(tmp_path, num_resamples=300)[1] == expected
    assert expected["delta_recall@10"] == pytest.approx(2 / 6)


def test_different_users_are_refused(tmp_path):
    base = write_row(tmp_path, "base", [0, 1, 0])
    ia = write_row(tmp_path, "ia", [1, 1, 0, 1])
    with pytest.raises(ValueError, match="different users"):
        paired_delta(ia, base, 100, 0)


def test_render_is_idempotent_and_shows_think_columns(tmp_path):
    write_row(tmp_path, "ia", [1, 0, 1, 0])
    write_row(tmp_path, "ia_r", [1, 1, 1, 0], column="think", think={"recall@10": 0.75},
              nothink={"recall@10": 0.5}, rationale_tokens=31.5)
    write_row(tmp_path, "popular", [0, 0, 1, 0], column="popular")
    first = render_table(tmp_path, num_resamples=100)
    contents = {k: Path(p).read_bytes() for k, p in first.items()}
    assert set(contents) == {"json", "csv", "md", "png"}
    second = render_table(tmp_path, num_resamples=100)
    assert {k: Path(p).read_bytes() for k, p in second.items()} == contents
    records = json.loads(contents["json"])
    assert [r["row"] for r in records] == ["ia", "ia_r", "popular"]  # the order of ROWS, not of the files
    ia_r = records[1]
    assert (ia_r["think_recall@10"], ia_r["nothink_recall@10"], ia_r["rationale_tokens"]) == (0.75, 0.5, 31.5)
    assert ia_r["delta_vs"] == "ia" and ia_r["delta_recall@10"] == pytest.approx(0.25)
    assert "| ia_r | measured |" in contents["md"].decode() and contents["csv"].decode().startswith("row,kind,")
    assert all(r["kind"] != "published" for r in records)  # synthetic data: no published numbers


def test_published_rows_on_beauty(tmp_path):
    write_row(tmp_path, "base", [1, 0, 0, 0], dataset="Beauty")
    records = build_table(tmp_path, num_resamples=50)
    published = [r for r in records if r["kind"] == "published"]
    sasrec = next(r for r in published if r["row"].startswith("SASRec"))
    assert sasrec["recall@10"] == 0.0607 and "not measured" in sasrec["source"]
    assert next(r for r in published if r["row"].startswith("TIGER"))["recall@10"] == 0.0623
    assert not [r for r in build_table(tmp_path, 50, published="never") if r["kind"] == "published"]


def test_missing_parent_and_missing_stage_errors(tmp_path):
    from onerec_dist.ablation.run_row import StageHooks, run_row
    from onerec_dist.cli import compose
    from onerec_dist.stages import STAGES

    cfg = compose([])
    hooks = StageHooks(lambda *a: pytest.fail("no stage may run"), {}, [s for s in STAGES if s != "rl"])
    with pytest.raises(ValueError, match=r"row ia_r starts from the export of row 'ia'.*run `onerec ablation row=ia "):
        run_row(cfg, tmp_path, "ia_r", hooks)
    write_row(tmp_path, "ia", [1, 0])
    with pytest.raises(ValueError, match=r"row ia_more takes its step count from row 'ia_r'"):
        run_row(cfg, tmp_path, "ia_more", hooks)
    with pytest.raises(ValueError, match=r"row ia_r_rl needs the stage\(s\) \['rl'\]"):
        run_row(cfg, tmp_path, "ia_r_rl", hooks)
    with pytest.raises(ValueError, match="row: 'nope' is not allowed; allowed values: base, ia"):
        from onerec_dist.ablation.config import row_choice

        row_choice(compose(["row=nope"]))


def test_ia_more_trains_with_ia_rs_cot_sft_budget(tmp_path):
    # The control's extra next-item SFT gets what ia_r's CoT SFT got: its step count (from ia_r's summary), its lr
    # and its lr warm-up (from the same config), so that ia_r - ia_more measures the rationales, not the schedule.
    from onerec_dist.ablation.run_row import StageHooks, run_row
    from onerec_dist.cli import compose
    from onerec_dist.stages import STAGES

    write_row(tmp_path, "ia", [1, 0])
    write_row(tmp_path, "ia_r", [1, 1], step_summaries={"reason_sft": {"steps": 7}})
    seen = {}

    def fake_stage(step, cfg, out):
        out.mkdir(parents=True)  # as every stage does
        if step == "align_multitask":
            seen.update(cfg.align.multitask)
            return {"export_dir": str(out / "export"), "steps": 7, "tokens": 70}
        return {"model": {"recall@10": 0.5}, "dataset": "synthetic", "num_users": 2}

    cfg = compose(["reasoning.sft.lr=2e-4", "reasoning.sft.warmup_steps=5", "align.multitask.warmup_steps=40"])
    summary = run_row(cfg, tmp_path, "ia_more", StageHooks(fake_stage, {}, STAGES))
    assert (seen["max_steps"], seen["lr"], seen["warmup_steps"]) == (7, 2e-4, 5)
    assert summary["overrides"]["align.multitask.warmup_steps"] == 5  # recorded with the row
    assert seen["ratios"] == {"sequential_preference": 1.0}


def test_beauty_ablation_is_the_beauty_recipe_step_for_step_on_one_gpu():
    from omegaconf import OmegaConf

    from onerec_dist.cli import compose
    from onerec_dist.recipes.grpo import rl_config, rl_engine_configs
    from onerec_dist.training.config import trainer_config

    cfg, beauty = compose(["experiment=beauty_ablation"]), compose(["experiment=beauty"])
    trainer = trainer_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    assert (trainer.use_gpu, trainer.num_workers, trainer.precision) == (True, 1, "bf16")
    # The CPU recipe's 2 workers x 8,192 tokens per step = one GPU micro-batch of 16,384: the same steps per pass.
    assert trainer.max_tokens == beauty.trainer.num_workers * beauty.trainer.max_tokens == 16384
    for key in ("lr", "min_lr", "max_epochs", "warmup_steps", "batching"):
        assert cfg.trainer[key] == beauty.trainer[key], key
    assert cfg.align == beauty.align and cfg.data == beauty.data and cfg.model == beauty.model
    rl = rl_config(OmegaConf.to_container(cfg.rl, resolve=True))
    assert rl_engine_configs(cfg, rl)[0].warmup_steps == 0 and rl.beam_width == cfg.eval.beam_width
    assert rl.max_think_tokens == cfg.eval.reasoning.max_think_tokens
    assert (cfg.eval.device, cfg.eval.sasrec.device, cfg.eval.user_sample) == ("cuda", "cuda", "random")


# ---------------------------------------------------------------------------------------------- one real run

DATA = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "sid.codebook_size=4"]
ENGINE = ["trainer.max_steps=10", "align.warmup.max_steps=4", "trainer.micro_batch_size=4", "trainer.log_every=2",
          "trainer.checkpoint_every=0", "align.validation_users=8", "align.verify_warmup=false"]
EVAL = ["eval.beam_width=10", "eval.top_k=10", "eval.ks=[1,5,10]", "eval.ndcg_ks=[5,10]", "eval.batch_size=8",
        "eval.max_users=16", "ablation.num_resamples=200"]


@pytest.mark.slow
def test_rows_base_ia_and_popular_make_the_table(ray_local, tmp_path):
    from onerec_dist.cli import main
    from onerec_dist.metrics import recall_at_k

    for row in ("popular", "base", "ia"):
        assert main(["ablation", f"row={row}", f"output_dir={tmp_path}", *DATA, *ENGINE, *EVAL]) == 0, row
    for name in ("table.md", "table.csv", "table.json", "table.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = {r["row"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert list(records) == ["base", "ia", "popular"]
    base, ia = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("base", "ia"))
    # base: the raw model (init_model: untrained, item tokens added) + next-item SFT; the loss falls.
    assert list(base["step_summaries"]) == ["sid", "init_model", "align_multitask", "eval"]
    sft = base["step_summaries"]["align_multitask"]
    assert sft["steps"] == 10 and sft["loss_last"] < sft["loss_first"] and base["training_tokens"] == sft["tokens"] > 0
    # ia: warm-up then multi-task; its tokens are the sum of both trainings.
    steps = ia["step_summaries"]
    assert steps["align_warmup"]["steps"] == 4 and steps["align_multitask"]["steps"] == 10
    assert ia["training_tokens"] == steps["align_warmup"]["tokens"] + steps["align_multitask"]["tokens"]
    # Recall@10 of the table = eval's = recomputed from the saved predictions; the same 16 users in every row.
    predictions = pq.read_table(ia["predictions_path"]).to_pydict()
    assert records["ia"]["recall@10"] == ia["metrics"]["recall@10"] == recall_at_k(
        [p[:10] for p in predictions["model"]], predictions["target"], 10)
    assert {r["num_users"] for r in records.values()} == {16}
    assert records["ia"]["delta_vs"] == "base" and records["ia"]["delta_recall@10"] == pytest.approx(
        ia["metrics"]["recall@10"] - base["metrics"]["recall@10"])
    assert records["ia"]["delta_ci_low"] <= records["ia"]["delta_recall@10"] <= records["ia"]["delta_ci_high"]
    assert records["popular"]["kind"] == "baseline" and records["popular"]["training_tokens"] == 0
