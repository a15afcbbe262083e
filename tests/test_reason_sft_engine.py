"""Engine settings of the training stages: each stage's own lr / max_steps / warmup_steps over trainer.*, no
validation in the CoT SFT, and the warning for a warm-up longer than a stage (fast, no training)."""

import pytest

from onerec_dist.cli import compose
from onerec_dist.recipes.reason_sft import engine_configs


def test_sft_engine_takes_its_own_budget_and_never_validates():
    # An experiment that validates its alignment stages every 50 steps (conf/experiment/scientific_ablation.yaml):
    # the CoT SFT of the same run has no validation split to decode (its records are training windows), so before
    # this the SFT trained and then failed at its first validation.
    cfg = compose(["trainer.validate_every=50", "trainer.lr=1e-3", "trainer.max_steps=100"])
    trainer, _ = engine_configs(cfg, lr=2e-4, max_steps=7)
    assert (trainer.lr, trainer.max_steps, trainer.validate_every) == (2e-4, 7, 0)
    # Unset SFT values leave trainer.*; validation stays off.
    trainer, _ = engine_configs(cfg, lr=None, max_steps=None)
    assert (trainer.lr, trainer.max_steps, trainer.validate_every) == (1e-3, 100, 0)
    assert cfg.trainer.validate_every == 50  # the run's config is not changed


def test_stage_lr_below_the_runs_scales_min_lr_with_it():
    from onerec_dist.training.config import stage_trainer, trainer_config

    run = {"lr": 1e-3, "min_lr": 1e-4, "max_steps": 100}
    # rl.lr = 1e-5 < trainer.lr: min_lr = 1e-4 * 1e-5 / 1e-3 = 1e-6 (before: min_lr 1e-4 > lr 1e-5 was refused).
    rl = stage_trainer(run, lr=1e-5, max_steps=None)
    assert rl["lr"] == 1e-5 and abs(rl["min_lr"] - 1e-6) < 1e-18 and rl["max_steps"] == 100
    trainer_config(rl)  # valid now
    # The warm-up's lr = 1e-2 > trainer.lr keeps the run's min_lr (min(1e-4, 1e-3) = 1e-4), as before this helper.
    warm = stage_trainer(run, lr=1e-2, max_steps=20)
    assert (warm["lr"], warm["min_lr"], warm["max_steps"]) == (1e-2, 1e-4, 20)
    # clear: keys set to None (RL has no passes), where a None override means "the run's value".
    assert stage_trainer({**run, "max_epochs": 4.5}, clear=("max_epochs",), max_epochs=None)["max_epochs"] is None
    assert stage_trainer({**run, "max_epochs": 4.5}, max_epochs=None)["max_epochs"] == 4.5
    assert run == {"lr": 1e-3, "min_lr": 1e-4, "max_steps": 100}  # not mutated


def test_rl_engine_accepts_an_rl_lr_under_the_runs_min_lr():
    # experiment=scientific_ablation row ia_r_rl: trainer.lr 1e-3, min_lr 1e-4 (Beauty's schedule), rl.lr 1e-5.
    from omegaconf import OmegaConf

    from onerec_dist.recipes.grpo import rl_config, rl_engine_configs

    cfg = compose(["experiment=scientific_ablation", "rl.lr=1e-5"])  # the paper's lr, the table's first run
    trainer, _ = rl_engine_configs(cfg, rl_config(OmegaConf.to_container(cfg.rl, resolve=True)))
    assert trainer.lr == 1e-5 and abs(trainer.min_lr - 1e-6) < 1e-18
    assert trainer.max_steps == cfg.rl.max_steps and trainer.validate_every == 0 and trainer.max_epochs is None


def test_each_stage_takes_its_own_warmup_over_the_runs():
    # experiment=scientific_ablation ran 12 RL steps and 50 CoT SFT steps under Beauty's trainer.warmup_steps = 50:
    # both stages trained inside the warm-up. <stage>.warmup_steps replaces trainer.warmup_steps for that stage only.
    from omegaconf import OmegaConf

    from onerec_dist.recipes.grpo import rl_config, rl_engine_configs
    from onerec_dist.stages.align import engine_configs as align_engine_configs
    from onerec_dist.training.config import align_config

    cfg = compose(["trainer.warmup_steps=50", "trainer.max_steps=100", "rl.max_steps=12", "rl.warmup_steps=2",
                   "rl.updates_per_rollout=3", "align.multitask.warmup_steps=0"])
    trainer, _ = engine_configs(cfg, lr=None, max_steps=50, warmup_steps=5)
    assert (trainer.max_steps, trainer.warmup_steps) == (50, 5)
    assert engine_configs(cfg, lr=None, max_steps=50)[0].warmup_steps == 50  # null: the run's
    # RL counts its warm-up in GRPO steps like rl.max_steps; the schedule counts updates: 2 x 3 = 6 of 12 x 3 = 36.
    trainer, _ = rl_engine_configs(cfg, rl_config(OmegaConf.to_container(cfg.rl, resolve=True)))
    assert (trainer.max_steps, trainer.warmup_steps) == (36, 6)
    align = align_config(cfg)
    assert align_engine_configs(cfg, align.multitask)[0].warmup_steps == 0  # 0 is a value, not "unset"
    assert align_engine_configs(cfg, align.warmup)[0].warmup_steps == 50


@pytest.mark.parametrize("key", ["rl.warmup_steps", "reasoning.sft.warmup_steps", "align.warmup.warmup_steps",
                                 "align.multitask.warmup_steps"])
def test_a_negative_stage_warmup_is_refused_by_name(key):
    from omegaconf import OmegaConf

    from onerec_dist.reasoning.bootstrap import reasoning_config
    from onerec_dist.recipes.grpo import rl_config
    from onerec_dist.training.config import align_config

    cfg = compose([f"{key}=-1"])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        if key.startswith("rl."):
            rl_config(OmegaConf.to_container(cfg.rl, resolve=True))
        elif key.startswith("reasoning."):
            reasoning_config(OmegaConf.to_container(cfg.reasoning, resolve=True))
        else:
            align_config(cfg)


def test_a_warmup_longer_than_the_stage_is_reported():
    from onerec_dist.training.engine_api import LRSchedule

    # 12 steps under a 50-step warm-up: step 11 (the last) gets (11 + 1) / 50 = 24 % of the peak lr.
    short = LRSchedule("cosine", warmup_steps=50, total_steps=12, min_ratio=0.0)
    assert short(11) == pytest.approx(0.24)
    assert "24%" in short.warmup_warning() and "rl .warmup_steps" in short.warmup_warning()
    # A warm-up that ends on the last step reaches the peak: nothing to report.
    assert LRSchedule("cosine", warmup_steps=12, total_steps=12, min_ratio=0.0).warmup_warning() is None
    assert LRSchedule("cosine", warmup_steps=0, total_steps=12, min_ratio=0.0).warmup_warning() is None
