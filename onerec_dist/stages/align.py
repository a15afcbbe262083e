"""`onerec align stage=warmup|multitask`: Itemic Alignment on Ray Train + DeepSpeed (OneRec-Think Sec. 3.2).

The driver reads the data, picks the starting model (stage 1: from scratch or a checkpoint; stage 2: stage 1's
export), takes the semantic IDs from it (or from ``sid.*`` when it has none: onerec_dist.sid.model_ids), builds the
model with item tokens, saves it with its IDs as the common starting point, builds the stage's examples, and hands an
``AlignJob`` to the engine (``onerec_dist.distributed.run_training``); the export carries the same IDs. Artifacts of
a stage live in ``output_dir/<stage>/`` (init model, checkpoints, export), so both stages can share one output_dir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from onerec_dist.data.config import data_config
from onerec_dist.data.splits import load_dataset, make_splits
from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
from onerec_dist.sid.model_ids import save_model_ids
from onerec_dist.training.align_job import AlignJob, changed_outside_rows
from onerec_dist.training.config import AlignConfig, align_config, stage_engine_configs
from onerec_dist.training.shards import write_examples


def engine_configs(cfg, settings):
    """trainer / deepspeed configs, with the stage's lr, max_steps and warmup_steps replacing trainer.* when set."""
    return stage_engine_configs(cfg, lr=settings.lr, max_steps=settings.max_steps,
                                warmup_steps=settings.warmup_steps)


def starting_model(cfg, stage: str, output_dir: Path):
    """Stage 2 starts from stage 1's export: model.name_or_path when set, else output_dir/warmup/export."""
    model_cfg = model_config(cfg)
    if stage == "multitask" and not model_cfg.name_or_path:
        export = output_dir / "warmup" / "export"
        if not (export / "config.json").is_file():
            raise ValueError(f"align stage=multitask starts from stage 1's output, but {export} has no model: run "
                             f"`onerec align stage=warmup output_dir={output_dir}` first, or set model.name_or_path")
        model_cfg = dataclasses.replace(model_cfg, name_or_path=str(export))
    if stage == "multitask":
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(model_cfg.name_or_path).get_added_vocab()
        if not any(t.startswith("<item_") for t in tokens):
            raise ValueError(f"align stage=multitask starts from a model that has the item tokens (stage 1's export), "
                             f"but {model_cfg.name_or_path} has none: run `onerec align stage=warmup` first")
    return model_cfg


def build_examples(align_cfg: AlignConfig, stage: str, data, train, item_codes, tokenizer, seed: int):
    import os

    from onerec_dist.training.tasks import DEFAULT_RATIOS, build_alignment_mixture, warmup_examples

    # Example building in processes (training/tasks_parallel.py); the examples do not depend on the count.
    # The default leaves half the cores to the OS and Ray: on 2 cores it is serial (the forked workers cost ~1.5x the
    # serial CPU, so two of them on two busy cores were slower than one process).
    processes = align_cfg.build_processes or max(1, min(4, (os.cpu_count() or 1) // 2))
    if stage == "warmup":
        return warmup_examples(data, train, item_codes, tokenizer, num_examples=align_cfg.warmup.num_examples,
                               max_length=align_cfg.max_length, seed=seed,
                               max_persona_items=align_cfg.max_persona_items, processes=processes)
    mt = align_cfg.multitask
    # A ratio left at the paper's default (conf/align/default.yaml) is not the user's choice: a task it selects may
    # be dropped when the catalogue cannot feed it (no item text); a ratio the user changed never is.
    explicit = [task for task, ratio in mt.ratios.items() if ratio != DEFAULT_RATIOS.get(task)]
    examples, stats = build_alignment_mixture(
        data, train, item_codes, tokenizer, ratios=mt.ratios or None, num_examples=mt.num_examples,
        max_length=align_cfg.max_length, seed=seed, general_text_path=mt.general_text_path,
        max_history=align_cfg.max_history, max_persona_items=align_cfg.max_persona_items,
        max_description_tokens=mt.max_description_tokens, explicit_ratios=explicit,
        sequential_format=mt.sequential_format, processes=processes)
    for task, reason in stats["dropped_tasks"].items():
        print(f"align multitask: task {task} dropped: {reason}")
    return examples, stats


def run(cfg, output_dir: Path, stage: str | None = None) -> dict:
    from onerec_dist.distributed import run_training

    align_cfg, data_cfg = align_config(cfg), data_config(cfg)
    stage = stage or align_cfg.stage
    settings = getattr(align_cfg, stage)
    trainer_cfg, ds_cfg = engine_configs(cfg, settings)
    if stage == "multitask" and align_cfg.multitask.trainable == "lora" and ds_cfg.zero_stage == 3:
        raise ValueError("align.multitask.trainable=lora contradicts deepspeed.zero_stage=3 (a ZeRO-3-partitioned "
                         "LoRA model cannot be merged for export); use deepspeed.zero_stage=0, 1 or 2 with LoRA")
    data = load_dataset(data_cfg)
    splits = make_splits(data, data_cfg)
    train = splits.get("train")
    if train is None or len(train) == 0:
        raise ValueError(f"dataset {data.name!r} has no training split: alignment needs training interactions")
    model_cfg = starting_model(cfg, stage, output_dir)
    item_codes, sizes, ids_source = semantic_ids_for_run(cfg, data, model_cfg.name_or_path)
    model, tokenizer, item_tok = build_recommender(model_cfg, data, sizes, item_codes, seed=cfg.seed)
    stage_dir = output_dir.resolve() / stage  # absolute: Ray workers run in their own working directory
    init_dir = stage_dir / "init_model"
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    save_model_ids(init_dir, item_codes, data.catalogue.item_ids, sizes, item_tok)  # the job copies them to exports
    examples, data_stats = build_examples(align_cfg, stage, data, train, item_codes, tokenizer, cfg.seed)
    print(f"align {stage}: {len(examples)} examples, {data_stats['total_tokens']} tokens; "
          f"{trainer_cfg.num_workers} worker(s), ZeRO-{ds_cfg.zero_stage}, {trainer_cfg.max_steps} steps"
          + (f" at most, {trainer_cfg.max_epochs:g} epoch(s)" if trainer_cfg.max_epochs else ""))
    trainable = "item_rows" if stage == "warmup" else align_cfg.multitask.trainable
    data_dir = stage_dir / "data"  # Arrow shards every rank memory-maps (never pickled into the Ray config)
    write_examples(examples, data_dir)
    del examples
    job = AlignJob(str(init_dir), trainable, str(data_dir), item_tok.item_token_ids().tolist(),
                   align_cfg.multitask.lora if trainable == "lora" else None,
                   write_validation_sample(splits.get("valid"), item_codes, align_cfg, stage_dir, cfg.seed, data),
                   align_cfg.validation_beam)
    summary = run_training(job, trainer_cfg, ds_cfg, stage_dir)
    summary.pop("log", None)
    summary.update({"align_stage": stage, "trainable": trainable, "data": data_stats,
                    "init_model": str(init_dir), "num_items": len(data.catalogue), "semantic_ids": ids_source,
                    "dropped_tasks": data_stats.get("dropped_tasks", {})})
    if stage == "warmup" and align_cfg.verify_warmup:
        summary["changed_outside_item_rows"] = verify_warmup(model, summary["export_dir"], item_tok)
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"align {stage}: loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} over "
          f"{summary['steps']} steps; export: {summary['export_dir']}")
    return summary


def write_validation_sample(valid, item_codes, align_cfg: AlignConfig, stage_dir: Path, seed: int,
                            data=None) -> str:
    """The fixed sample of validation users that trainer.validate_every scores, as JSON for the workers; "" when
    the dataset has no validation split (onerec_dist/training/validation.py). ``data`` with several domains adds
    each sampled user's domain and each item's, so validation prompts and decoding match `onerec eval`."""
    from onerec_dist.data.domains import has_domains
    from onerec_dist.training.validation import sample_users

    if valid is None or len(valid) == 0:
        return ""
    pick = sample_users(len(valid), align_cfg.validation_users, seed).tolist()
    path = stage_dir / "validation_sample.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = {"histories": [list(valid.histories[i]) for i in pick], "targets": [int(valid.targets[i]) for i in pick],
              "item_codes": [[int(c) for c in row] for row in item_codes]}
    if data is not None and has_domains(data):
        sample.update(domain_names=list(data.domain_names), item_domains=[int(d) for d in data.item_domains],
                      user_domains=[int(data.user_domains[valid.users[i]]) for i in pick])
    path.write_text(json.dumps(sample))
    return str(path)


def verify_warmup(initial_model, export_dir: str, item_tok) -> dict | str:
    """{param: changed elements} outside the item-token rows (must be {}), or why the check was skipped."""
    import torch

    from onerec_dist.models import load_pretrained

    if sum(p.numel() for p in initial_model.parameters()) > 100_000_000:
        return "skipped (model above 100M parameters)"
    trained, _ = load_pretrained(export_dir, "sdpa", "auto")
    rows = item_tok.item_token_ids()
    modules = {id(m): name for name, m in initial_model.named_modules()}
    names = {modules[id(initial_model.get_input_embeddings())] + ".weight",
             modules[id(initial_model.get_output_embeddings())] + ".weight"}
    after = trained.state_dict()
    # The engine may train in bf16: compare against the initial weights in the dtype that was trained and saved.
    before = {k: v.to(after[k].dtype) for k, v in initial_model.state_dict().items()}
    with torch.no_grad():
        changed = changed_outside_rows(before, after, rows, names)
    if changed:
        raise RuntimeError(f"token warm-up changed parameters outside the item-token rows: {changed}")
    return changed


def run_warmup(cfg, output_dir: Path) -> dict:
    return run(cfg, output_dir, "warmup")


def run_multitask(cfg, output_dir: Path) -> dict:
    return run(cfg, output_dir, "multitask")
