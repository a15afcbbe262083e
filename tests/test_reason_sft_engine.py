"""The CoT SFT's engine settings: its own lr / max_steps over trainer.*, and no validation (fast, no training)."""

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

    cfg = compose(["experiment=scientific_ablation"])
    trainer, _ = rl_engine_configs(cfg, rl_config(OmegaConf.to_container(cfg.rl, resolve=True)))
    assert trainer.lr == 1e-5 and abs(trainer.min_lr - 1e-6) < 1e-18
    assert trainer.max_steps == cfg.rl.max_steps and trainer.validate_every == 0 and trainer.max_epochs is None
