"""Model selection in training (onerec_dist/training/validation.py + the worker loop's validation hook): learning
curve, best step, patience, epoch budgets, the best model exported; validate_recommender on a tiny recommender."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_distributed_engine import ToyJob, trainer

from onerec_dist.training.batching import DistributedBatchSampler, SamplerStepSource
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig
from onerec_dist.training.validation import (
    ValidationTracker,
    mean_metrics,
    plot_learning_curve,
    sample_users,
    validate_recommender,
)


def test_tracker_best_step_and_patience_worked():
    # R@10 at steps 10..50 = .1, .3, .3, .2, .25 with patience 3: new bests at 10 and 20 (the tie at 30 is not
    # better, ties keep the earlier step); 30, 40, 50 are 3 evaluations in a row without a new best -> stop.
    tracker = ValidationTracker("recall@10", patience=3)
    improved = [tracker.record(10 * (i + 1), 1.5 * (i + 1), {"recall@10": v})
                for i, v in enumerate([0.1, 0.3, 0.3, 0.2, 0.25])]
    assert improved == [True, True, False, False, False]
    assert (tracker.best_step, tracker.best_value) == (20, 0.3) and tracker.should_stop
    assert [p["seconds"] for p in tracker.curve] == [1.5, 3.0, 4.5, 6.0, 7.5]
    resumed = ValidationTracker.from_state(tracker.as_state(), "recall@10", patience=4)
    assert resumed.best_step == 20 and not resumed.should_stop  # 3 < the new patience 4
    with pytest.raises(ValueError, match="select_metric"):
        tracker.record(60, 9.0, {"ndcg@10": 0.1})


def test_mean_metrics_divides_all_reduced_sums_by_users():
    # rank 0: 3 hits of 5 users, rank 1: 1 hit of 3 users -> all-reduced sums 4 hits / 8 users = 0.5
    assert mean_metrics({"recall@10": 4.0, "users": 8.0}) == {"recall@10": 0.5}
    with pytest.raises(ValueError, match="no user"):
        mean_metrics({"recall@10": 0.0, "users": 0.0})


def test_plot_and_user_sample(tmp_path):
    curve = [{"step": 10, "seconds": 2.0, "recall@10": 0.1}, {"step": 20, "seconds": 4.0, "recall@10": 0.2}]
    path = plot_learning_curve(curve, "recall@10", tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    sample = sample_users(100, 10, seed=0)
    assert len(sample) == 10 and (np.diff(sample) > 0).all() and (sample_users(100, 10, 0) == sample).all()
    assert sample_users(5, 10, 0).tolist() == [0, 1, 2, 3, 4]


def test_epoch_budget():
    # 40 examples, micro-batch 4, 1 rank, no accumulation: 10 steps per epoch; 1.5 epochs = 15 steps, and the
    # smaller budget wins against max_steps.
    from onerec_dist.distributed.worker import step_budget

    sampler = DistributedBatchSampler(np.full(40, 5), batch_size=4)
    source = SamplerStepSource([{"input_ids": [1] * 5, "labels": [1] * 5, "task": "t"}] * 40, sampler)
    assert step_budget(TrainerConfig(max_steps=100, max_epochs=1.5), source) == 15
    assert step_budget(TrainerConfig(max_steps=12, max_epochs=1.5), source) == 12
    assert step_budget(TrainerConfig(max_steps=100), source) == 100
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        TrainerConfig(max_epochs=0)


@dataclass
class ScoredToyJob(ToyJob):
    """ToyJob whose validation 'recall' is a fixed score per step, plus the sum of the weights as a fingerprint."""

    scores: tuple = ((2, 0.5), (4, 0.9), (6, 0.4), (8, 0.3), (10, 0.2), (12, 0.1))

    def validate(self, model, step):
        weight_sum = sum(float(p.detach().double().sum()) for p in model.parameters())
        return {"recall@10": dict(self.scores)[step], "weight_sum": weight_sum, "users": 1.0}


def test_loop_validates_keeps_best_and_stops_early(ray_local, tmp_path):
    # validate_every=2, patience=2: scores .5 (step 2), .9 (4: best), .4 (6), .3 (8) -> two without a new best,
    # stop at step 8 of 12. export/ holds step 4's weights (the fingerprint recorded at step 4, not step 8's).
    from transformers import AutoModelForCausalLM

    from onerec_dist.distributed.ray_job import run_training

    cfg = trainer(num_workers=1, max_steps=12, validate_every=2, patience=2)
    summary = run_training(ScoredToyJob(), cfg, DeepSpeedConfig(zero_stage=2), tmp_path / "out")
    validation = summary["validation"]
    assert summary["steps"] == 8 and validation["stopped_early"]
    assert [p["step"] for p in validation["curve"]] == [2, 4, 6, 8]
    assert validation["best_step"] == 4 and validation["best_value"] == pytest.approx(0.9)
    assert validation["exported_step"] == 4 and (tmp_path / "out" / "learning_curve.png").is_file()
    exported = AutoModelForCausalLM.from_pretrained(summary["export_dir"])
    exported_sum = sum(float(p.detach().double().sum()) for p in exported.parameters())
    step4, step8 = validation["curve"][1]["weight_sum"], validation["curve"][3]["weight_sum"]
    assert exported_sum == pytest.approx(step4, rel=1e-6) and abs(step4 - step8) > 1e-3
    written = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert written["validation"]["best_step"] == 4


def test_validate_recommender_recall_on_tiny_model():
    # A tiny untrained recommender over 12 items: every returned item is in the catalogue, so Recall@10 counts the
    # users whose target is among 10 of 12 items; with two "ranks" the sums add up to the one-rank sums.
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    tokenizer = build_tokenizer_from_corpus(["the user has purchased in order which item next"], vocab_size=300)
    model = build_tiny_model(tokenizer, seed=0)
    extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 4))
    codes = np.array([[k // 4, k % 4] for k in range(12)])
    histories = [[k % 12, (k + 1) % 12] for k in range(6)]
    targets = [(k + 2) % 12 for k in range(6)]
    model.eval()
    with torch.no_grad():
        whole = validate_recommender(model, tokenizer, codes, histories, targets, 0, 1, beam_width=10, top_k=10)
        parts = [validate_recommender(model, tokenizer, codes, histories, targets, r, 2, beam_width=10, top_k=10)
                 for r in (0, 1)]
    assert whole["users"] == 6 and [p["users"] for p in parts] == [3, 3]
    assert 0 <= whole["recall@10"] <= 6 and whole["ndcg@10"] <= whole["recall@10"]
    for key in whole:
        assert parts[0][key] + parts[1][key] == pytest.approx(whole[key])


def test_align_stage_writes_a_fixed_validation_sample(tmp_path):
    # The align stage hands the workers a JSON of align.validation_users validation users (a seeded sample, the same
    # on every call) with their histories, targets and the item codes; no validation split -> "" (nothing to score).
    from onerec_dist.data.types import Examples
    from onerec_dist.stages.align import write_validation_sample
    from onerec_dist.training.config import AlignConfig

    valid = Examples([f"u{i}" for i in range(30)], [[i, i + 1] for i in range(30)], list(range(2, 32)))
    codes = np.arange(64).reshape(32, 2)
    path = write_validation_sample(valid, codes, AlignConfig(validation_users=5), tmp_path, seed=0)
    sample = json.loads(open(path).read())
    picked = sample_users(30, 5, 0).tolist()
    assert sample["targets"] == [valid.targets[i] for i in picked] and len(sample["histories"]) == 5
    assert sample["item_codes"] == codes.tolist()
    assert write_validation_sample(None, codes, AlignConfig(), tmp_path, seed=0) == ""
    with pytest.raises(ValueError, match="align.validation_beam"):
        AlignConfig(validation_beam=5)


def test_lr_decays_over_the_epoch_budget_not_max_steps(ray_local, tmp_path):
    # 40 examples / micro-batch 4 on 1 worker = 10 steps per epoch; max_epochs=1 ends the loop at step 10 of
    # max_steps=1000. The cosine must end there: the lr logged after optimizer step s is lr * f(s) with
    # f(s) = r + (1 - r) * (1 + cos(pi * s / 10)) / 2, r = min_lr / lr = 0.1 (no warm-up), so f(5) = 0.55 and
    # f(10) = 0.1. Decaying over max_steps instead would leave f(10) = 0.1 + 0.9 * (1 + cos(pi / 100)) / 2 ~ 0.9998.
    from onerec_dist.distributed.ray_job import run_training

    cfg = trainer(num_workers=1, max_steps=1000, max_epochs=1, lr=3e-3, min_lr=3e-4, lr_schedule="cosine",
                  warmup_steps=0, log_every=1)
    summary = run_training(ToyJob(), cfg, DeepSpeedConfig(zero_stage=2), tmp_path / "out")
    lr_by_step = {row["step"]: row["lr"] for row in summary["log"]}
    assert summary["steps"] == 10
    assert lr_by_step[5] == pytest.approx(3e-3 * 0.55) and lr_by_step[10] == pytest.approx(3e-4)
