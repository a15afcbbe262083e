"""The rows of the ablation table as data (OneRec-Think, arXiv:2510.11639, Table 2: Base / +IA / +IA+R, plus +RL),
with the controls and baselines run in the same output directory, split and users.

A row starts from its ``parent`` row's export (or from ``model.*`` when it has none), runs ``steps`` (stage names of
onerec_dist.stages.STAGES, or the local step ``init_model``) with ``overrides`` applied on top of the command line,
then ``eval``. ``compare_to`` is the row its Δ Recall@10 is measured against (paired over users).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The sequential-preference task alone (next item from a history): the "plain SFT" of base, tiger and ia_more.
NEXT_ITEM_ONLY = {"align.multitask.ratios": {"sequential_preference": 1.0}}
# Model rows leave the baselines to their own rows (evaluated once, not in every row).
NO_BASELINES = {"eval.baseline": []}


@dataclass(frozen=True)
class Row:
    name: str
    # One line for the table's legend.
    what: str
    # measured: a trained model of this framework | baseline: a reference method run here on the same users.
    kind: Literal["measured", "baseline"]
    # Row whose export this row starts from (model.name_or_path); None: from model.* as configured.
    parent: str | None
    # Steps in order; eval is always the last one.
    steps: tuple[str, ...]
    # Config key -> value for every step of the row (over the command line's values).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Row the Δ Recall@10 column compares against; None: no Δ.
    compare_to: str | None = None
    # (row, step, key): set config ``key`` to the optimizer steps that ``row``'s ``step`` took (ia_more matches
    # ia_r's CoT SFT step count, so that its gain over ia is "more training", not "reasoning").
    match_steps: tuple[str, str, str] | None = None
    # (source key, target key): config values the row takes from other keys of the same run (ia_more trains with the
    # CoT SFT's lr and lr warm-up, not only its step count).
    copy_keys: tuple[tuple[str, str], ...] = ()


ROWS: dict[str, Row] = {row.name: row for row in (
    Row("base", "next-item SFT only (sequential-preference task alone) from the raw model", "measured", None,
        ("sid", "init_model", "align_multitask", "eval"), {**NEXT_ITEM_ONLY, **NO_BASELINES}),
    Row("ia", "Itemic Alignment: token warm-up + multi-task integration", "measured", None,
        ("sid", "align_warmup", "align_multitask", "eval"), dict(NO_BASELINES), compare_to="base"),
    Row("ia_more", "control: ia + plain next-item SFT for ia_r's CoT SFT step count", "measured", "ia",
        ("align_multitask", "eval"), {**NEXT_ITEM_ONLY, **NO_BASELINES}, compare_to="ia",
        match_steps=("ia_r", "reason_sft", "align.multitask.max_steps"),
        copy_keys=(("reasoning.sft.lr", "align.multitask.lr"),
                   ("reasoning.sft.warmup_steps", "align.multitask.warmup_steps"))),
    Row("ia_r", "Reasoning Activation: rationale bootstrap + CoT SFT from ia", "measured", "ia",
        ("reason_bootstrap", "reason_sft", "eval"), dict(NO_BASELINES), compare_to="ia"),
    Row("ia_r_shuffled", "control: ia_r with rationales permuted across records", "measured", "ia",
        ("reason_bootstrap", "reason_sft", "eval"), {"reasoning.sft.shuffle_rationales": True, **NO_BASELINES},
        compare_to="ia_r"),
    Row("ia_r_rl", "Reasoning Enhancement: GRPO with the Rollout-Beam reward from ia_r", "measured", "ia_r",
        ("rl", "eval"), dict(NO_BASELINES), compare_to="ia_r"),
    Row("popular", "most-popular items of the training interactions", "baseline", None, ("eval",),
        {"eval.model": False, "eval.baseline": ["popular"]}),
    Row("sasrec", "SASRec (onerec_dist/baselines/sasrec.py), trained here, selected on validation", "baseline", None,
        ("eval",), {"eval.model": False, "eval.baseline": ["sasrec"]}),
    # TIGER-style: NOT TIGER's encoder-decoder; our decoder-only model from scratch (model.preset shape, no
    # pretrained weights), trained only on next-item prediction over the same semantic IDs.
    Row("tiger", "TIGER-style: our decoder-only model from scratch, next-item prediction only, same IDs",
        "baseline", None, ("sid", "init_model", "align_multitask", "eval"),
        {"model.name_or_path": None, **NEXT_ITEM_ONLY, **NO_BASELINES}),
)}

# Steps the ablation runs itself (not stages of the CLI).
LOCAL_STEPS = ("init_model",)
