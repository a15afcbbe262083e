"""The Reasoning Activation recipe (OneRec-Think, arXiv:2510.11639, Sec. 4.2), read top to bottom:

``run_bootstrap``: training windows -> pruned history (k most similar items to the target) -> teacher -> leak lint
-> ``rationales.parquet`` (onerec_dist.reasoning.bootstrap). The model it takes (``model.name_or_path``, in the
pipeline the aligned multi-task export) gives the run's item IDs, and, when asked, the ``llm`` teacher
(``reasoning.teacher.model: null``) and the item-token similarity (``reasoning.prune.similarity=item_tokens``).

``run_sft``: CoT SFT. Starts from ``model.name_or_path`` (the multi-task export), adds ``<think>`` / ``</think>``
when the tokenizer lacks them, builds one example per kept rationale (full history -> think block -> item;
``reasoning.sft.nothink_ratio`` of them with an empty block; ``reasoning.sft.shuffle_rationales`` as the control),
writes them as Arrow shards and trains full weights or LoRA on the engine (``AlignJob``: the same TrainJob, with
the think-token rows trainable beside the item-token rows under LoRA). The export carries the model's item IDs
(``save_model_extras`` copies ``sid_table.json``) and the think tokens.

Both write into ``output_dir`` (the stage directory) and return the stage summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from onerec_dist.data.config import data_config
from onerec_dist.data.domains import domain_name_by_user
from onerec_dist.data.splits import load_dataset, make_splits
from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
from onerec_dist.reasoning.bootstrap import RECORDS_STEM, ReasoningConfig, reasoning_config


def reasoning_section(cfg) -> ReasoningConfig:
    """The validated ``reasoning`` section of a composed config."""
    from omegaconf import OmegaConf

    return reasoning_config(OmegaConf.to_container(cfg.reasoning, resolve=True) if "reasoning" in cfg else {})


def _training_split(data, data_cfg):
    splits = make_splits(data, data_cfg)
    train = splits.get("train")
    if train is None or len(train) == 0:
        raise ValueError(f"dataset {data.name!r} has no training split: reasoning activation needs training windows")
    return splits, train


def run_bootstrap(cfg, output_dir: Path) -> dict:
    """Pruned-context rationale bootstrapping into ``output_dir`` (module docstring); the bootstrap summary with
    examples, kept, dropped_leak, dropped_other, rationales_per_s."""
    from onerec_dist.reasoning.bootstrap import bootstrap_rationales
    from onerec_dist.reasoning.prune import build_similarity
    from onerec_dist.reasoning.teachers import LLMTeacherConfig, build_teacher
    from onerec_dist.sid.config import sid_config

    rcfg, data_cfg, model_cfg = reasoning_section(cfg), data_config(cfg), model_config(cfg)
    data = load_dataset(data_cfg)
    splits, train = _training_split(data, data_cfg)
    item_codes, sizes, ids_source = semantic_ids_for_run(cfg, data, model_cfg.name_or_path)
    llm_from_run = isinstance(rcfg.teacher, LLMTeacherConfig) and rcfg.teacher.model is None
    model = tokenizer = item_tok = None
    if llm_from_run or rcfg.prune.similarity == "item_tokens":
        if not model_cfg.name_or_path:
            raise ValueError("reason stage=bootstrap: reasoning.teacher.kind=llm with teacher.model=null, or "
                             "reasoning.prune.similarity=item_tokens, needs the aligned model: set "
                             "model.name_or_path (the pipeline hands over the align_multitask export)")
        model, tokenizer, item_tok = build_recommender(model_cfg, data, sizes, item_codes, seed=cfg.seed)
        model.eval()
    elif model_cfg.name_or_path:  # the lint counts rationale length in the model's tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path)
    similarity = build_similarity(rcfg.prune, data, train, sid_cfg=sid_config(cfg), model=model,
                                  item_tokenizer=item_tok, item_codes=item_codes)
    teacher = build_teacher(rcfg.teacher, data, train, item_codes=item_codes, model=model, tokenizer=tokenizer,
                            work_dir=output_dir)
    summary = bootstrap_rationales(data, splits, teacher, rcfg.teacher, similarity, output_dir, prune=rcfg.prune,
                                   lint=rcfg.lint, bootstrap=rcfg.bootstrap, item_codes=item_codes,
                                   tokenizer=tokenizer)
    summary.update({"semantic_ids": ids_source, "model": model_cfg.name_or_path})
    print(f"reason bootstrap ({teacher.name}): {summary['examples']} windows, kept {summary['kept']}, dropped "
          f"{summary['dropped_leak']} leaks + {summary['dropped_other']} other; {summary['rationales_per_s']}/s")
    return summary


def engine_configs(cfg, lr: float | None, max_steps: int | None, warmup_steps: int | None = None):
    """trainer / deepspeed configs, with the SFT's lr, max_steps and warmup_steps replacing trainer.* when set. The
    CoT SFT does not validate (its records are training windows with rationales; the alignment's validation decodes
    without a think block), so trainer.validate_every, set for the alignment stages of the same run, is turned off
    here and the export is the last step's model."""
    from onerec_dist.training.config import stage_engine_configs

    return stage_engine_configs(cfg, lr=lr, max_steps=max_steps, warmup_steps=warmup_steps, validate_every=0)


def rationales_path(rcfg: ReasoningConfig, output_dir: Path) -> Path:
    """reasoning.sft.rationales_path, else <output_dir>/../bootstrap/rationales.<format> (`onerec reason` keeps
    each step in output_dir/<step>)."""
    if rcfg.sft.rationales_path:
        return Path(rcfg.sft.rationales_path)
    return output_dir.parent / "bootstrap" / f"{RECORDS_STEM}.{rcfg.bootstrap.format}"


def build_sft_model(cfg, data, init_dir: Path, think_noise: float):
    """The starting model with think tokens, saved with its item IDs to ``init_dir`` (every worker starts from it):
    (model, tokenizer, item_tokenizer, think tokens, item codes [N, L], source of the IDs)."""
    from onerec_dist.reasoning.cot_format import add_think_tokens
    from onerec_dist.sid.model_ids import save_model_ids

    model_cfg = model_config(cfg)
    if not model_cfg.name_or_path:
        raise ValueError("reason stage=sft starts from the aligned model: set model.name_or_path to the multi-task "
                         "export (`onerec align stage=multitask`; the pipeline hands it over)")
    item_codes, sizes, ids_source = semantic_ids_for_run(cfg, data, model_cfg.name_or_path)
    model, tokenizer, item_tok = build_recommender(model_cfg, data, sizes, item_codes, seed=cfg.seed)
    think = add_think_tokens(model, tokenizer, noise_std=think_noise, seed=cfg.seed)
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    save_model_ids(init_dir, item_codes, data.catalogue.item_ids, sizes, item_tok)
    return model, tokenizer, item_tok, think, item_codes, ids_source


def run_sft(cfg, output_dir: Path) -> dict:
    """CoT SFT into ``output_dir`` (module docstring); the engine's summary plus the data statistics."""
    from onerec_dist.distributed import run_training
    from onerec_dist.reasoning.bootstrap import read_rationales
    from onerec_dist.reasoning.cot_format import NOTHINK_TASK, new_token_rows
    from onerec_dist.reasoning.sft_data import cot_sft_examples
    from onerec_dist.training.align_job import AlignJob
    from onerec_dist.training.shards import write_examples

    rcfg, data_cfg = reasoning_section(cfg), data_config(cfg)
    sft = rcfg.sft
    trainer_cfg, ds_cfg = engine_configs(cfg, sft.lr, sft.max_steps, sft.warmup_steps)
    if sft.trainable == "lora" and ds_cfg.zero_stage == 3:
        raise ValueError("reasoning.sft.trainable=lora contradicts deepspeed.zero_stage=3 (a ZeRO-3-partitioned "
                         "LoRA model cannot be merged for export); use deepspeed.zero_stage=0, 1 or 2 with LoRA")
    path = rationales_path(rcfg, output_dir)
    if not path.is_file():
        raise ValueError(f"reason stage=sft needs the bootstrap's rationales, but {path} does not exist: run "
                         "`onerec reason stage=bootstrap` first, or set reasoning.sft.rationales_path")
    records = read_rationales(path)
    if not records:
        raise ValueError(f"{path} holds no rationale (the lint dropped them all?): nothing to train on")
    data = load_dataset(data_cfg)
    output_dir = output_dir.resolve()  # absolute: Ray workers run in their own working directory
    init_dir = output_dir / "init_model"
    model, tokenizer, item_tok, think, item_codes, ids_source = build_sft_model(cfg, data, init_dir,
                                                                                sft.think_init_noise)
    examples = cot_sft_examples(records, item_codes, tokenizer, think, max_length=sft.max_length,
                                nothink_ratio=sft.nothink_ratio, shuffle_rationales=sft.shuffle_rationales,
                                seed=sft.seed, user_domains=domain_name_by_user(data))
    nothink = sum(e.task == NOTHINK_TASK for e in examples)
    data_stats = {"examples": len(examples), "think_examples": len(examples) - nothink, "nothink_examples": nothink,
                  "total_tokens": sum(len(e.input_ids) for e in examples),
                  "loss_tokens": sum(sum(1 for t in e.labels if t >= 0) for e in examples)}
    print(f"reason sft: {len(examples)} examples ({nothink} without thinking), {data_stats['total_tokens']} tokens; "
          f"{trainer_cfg.num_workers} worker(s), ZeRO-{ds_cfg.zero_stage}, {trainer_cfg.max_steps} steps, "
          f"{sft.trainable}" + (", rationales shuffled (control)" if sft.shuffle_rationales else ""))
    data_dir = output_dir / "data"
    write_examples(examples, data_dir)
    del examples
    job = AlignJob(str(init_dir), sft.trainable, str(data_dir), new_token_rows(item_tok, think),
                   sft.lora if sft.trainable == "lora" else None)
    summary = run_training(job, trainer_cfg, ds_cfg, output_dir)
    summary.pop("log", None)
    summary.update({"trainable": sft.trainable, "data": data_stats, "rationales": str(path),
                    "nothink_ratio": sft.nothink_ratio, "shuffle_rationales": sft.shuffle_rationales,
                    "think_token_ids": [think.begin_id, think.end_id], "init_model": str(init_dir),
                    "semantic_ids": ids_source, "num_items": len(data.catalogue)})
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"reason sft: loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} over {summary['steps']} "
          f"steps; export: {summary['export_dir']}")
    return summary
