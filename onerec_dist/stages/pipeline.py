"""`onerec pipeline`: run ``pipeline.stages`` in order, each into ``output_dir/<stage>``.

All stages share the one composed config, so an override given to `pipeline` applies to every stage that reads
that key. What a stage produces feeds the stages after it through ``HANDOFFS`` (e.g. `sid`'s table becomes
``sid.index_path`` with ``sid.source=file``, listed in ``explicit_sid_keys`` so that a stage starting from a model
checks the model's own IDs against it; the trained export becomes ``model.name_or_path``). The pipeline's own
summary.json holds each stage's summary under the stage's name, and is rewritten after every stage so a crash keeps
what finished.
"""

from __future__ import annotations

from pathlib import Path

from onerec_dist.stages import STAGES


def _sid_handoff(summary: dict) -> dict:
    return {"sid.source": "file", "sid.index_path": summary["table_path"]}


def _model_handoff(summary: dict) -> dict:
    return {"model.name_or_path": summary["export_dir"]} if summary.get("export_dir") else {}


# stage name -> config updates that later stages see (key paths in the composed config).
HANDOFFS = {
    "sid": _sid_handoff,
    "align_warmup": _model_handoff,
    "align_multitask": _model_handoff,
    # The rationales go to reason_sft, which still starts from the multi-task export (model.name_or_path unchanged).
    "reason_bootstrap": lambda summary: {"reasoning.sft.rationales_path": summary["records"]},
    "reason_sft": _model_handoff,
    "rl": _model_handoff,  # GRPO starts from the reason_sft export; eval then sees the RL export
}


def run(cfg, output_dir: Path) -> dict:
    from omegaconf import OmegaConf, open_dict

    from onerec_dist.stages.runner import run_stage, write_outputs

    stages = list(cfg.pipeline.stages)
    unknown = [s for s in stages if s not in STAGES or s == "pipeline"]
    if unknown:
        valid = [s for s in STAGES if s != "pipeline"]
        raise ValueError(f"pipeline.stages: unknown stage(s) {unknown}; valid stages: {', '.join(valid)}")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a private copy the hand-offs may update
    summary: dict = {"stages": stages}
    for stage in stages:
        print(f"=== pipeline: {stage} ===", flush=True)
        summary[stage] = run_stage(stage, cfg, output_dir / stage)
        updates = HANDOFFS.get(stage, lambda s: {})(summary[stage])
        with open_dict(cfg):
            for key, value in updates.items():
                OmegaConf.update(cfg, key, value, merge=False)
            # A hand-off is an explicit setting: a later stage that takes a model carrying its own IDs checks them.
            given = [k.split(".", 1)[1] for k in updates if k.startswith("sid.")]
            cfg.explicit_sid_keys = sorted(set(cfg.get("explicit_sid_keys") or []) | set(given))
        write_outputs(output_dir, cfg, {"stage": "pipeline", **summary})
    return summary
