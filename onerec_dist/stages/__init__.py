"""Stage registry of the `onerec` CLI. Each stage module has ``run(cfg, output_dir) -> summary dict``."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    module: str
    help: str
    # Function of the module that runs the stage: fn(cfg, output_dir) -> summary.
    function: str = "run"


STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec("onerec_dist.stages.prepare", "read a dataset, split it, print and save statistics"),
    "sid": StageSpec("onerec_dist.stages.sid", "build semantic IDs from item text (or load them from a file)"),
    "align": StageSpec("onerec_dist.stages.align", "Itemic Alignment training: stage=warmup | stage=multitask"),
    "align_warmup": StageSpec("onerec_dist.stages.align", "alignment stage 1 (token warm-up), for pipelines",
                              "run_warmup"),
    "align_multitask": StageSpec("onerec_dist.stages.align", "alignment stage 2 (multi-task), for pipelines",
                                 "run_multitask"),
    "reason": StageSpec("onerec_dist.stages.reason", "Reasoning Activation: stage=bootstrap | stage=sft"),
    "reason_bootstrap": StageSpec("onerec_dist.stages.reason", "rationale bootstrapping, for pipelines",
                                  "run_bootstrap"),
    "reason_sft": StageSpec("onerec_dist.stages.reason", "CoT SFT on the rationales, for pipelines", "run_sft"),
    "rl": StageSpec("onerec_dist.stages.rl", "Reasoning Enhancement: GRPO with the Rollout-Beam reward"),
    "unify": StageSpec("onerec_dist.stages.unify", "OneReason's unify step: one student from the domain "
                       "specialists (method=rft | distill)"),
    "eval": StageSpec("onerec_dist.stages.eval", "Recall/NDCG/validity by constrained beam search, with baselines"),
    "ablation": StageSpec("onerec_dist.stages.ablation", "one row of the ablation table (row=base|ia|...), then "
                          "the table"),
    "think_ahead": StageSpec("onerec_dist.stages.think_ahead", "Think-Ahead offline cache: action=build (rationales "
                             "-> item-prefix cache)"),
    "serve": StageSpec("onerec_dist.stages.serve", "Think-Ahead HTTP endpoint on Ray Serve: action=start | stop"),
    "pipeline": StageSpec("onerec_dist.stages.pipeline", "run the stages in pipeline.stages in order (default job)"),
}
