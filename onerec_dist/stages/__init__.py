"""Stage registry of the `onerec` CLI. Each stage module has ``run(cfg, output_dir) -> summary dict``."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    module: str
    help: str


STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec("onerec_dist.stages.prepare", "read a dataset, split it, print and save statistics"),
    "sid": StageSpec("onerec_dist.stages.sid", "build semantic IDs from item text (or load them from a file)"),
    "eval": StageSpec("onerec_dist.stages.eval", "Recall/NDCG/validity by constrained beam search, with baselines"),
    "pipeline": StageSpec("onerec_dist.stages.pipeline", "run the stages in pipeline.stages in order (default job)"),
}
