"""OneReason's specialise-then-unify, the unify step: one student from the domain specialists, read top to bottom.
`onerec unify method=rft|distill` (settings: conf/unify/default.yaml, onerec_dist/recipes/unify_config.py).

Specialists are GRPO runs of one domain each (`onerec rl rl.domain=<name>`, recipes/grpo.py), all started from the
shared CoT SFT export, so teachers and student share the tokenizer and the item IDs (checked here).

``method=rft`` (rejection-sampling fine-tuning; RFT, Yuan et al. 2023, arXiv:2308.01825; OneReason's RFT variant):
  1. per domain d, its teacher samples N rationales per training user of d (prompts name d; ``sample_candidates``);
  2. each rationale is closed (``close_think``) and decoded by the constrained beam search restricted to d's
     catalogue (decoding/domains.DomainRestriction -> allowed_prefixes) -> top-K items;
  3. ``filter_candidates`` keeps the rationales whose top-K holds the target (a hit), that wrote </think> (unless
     ``unify.rft.keep_unclosed``), pass the leak lint (reasoning/lint.py) and are not a repeat for that user;
  4. ``rationale_records``: the kept ones in the bootstrap's record format, all domains in one file, with per-domain
     kept / sampled counts in the summary;
  5. the student (``unify.student``, default model.name_or_path) is fine-tuned on them by the CoT SFT of `onerec
     reason stage=sft` (recipes/reason_sft.run_sft, reasoning.sft.* settings, ``rationales_path`` set to the file).

``method=distill`` (on-policy distillation, reverse KL; onerec_dist/rl/distill.py states the math): per step the
student samples rationales for users of all domains mixed, each user's domain teacher scores every sampled token,
advantage = log pi_teacher - log pi_student, loss = -(min(pi / pi_old, c) * A * log pi), token-mean, one AdamW step
per sample batch. For now this loop runs in a single process (the CLI process, one device): teachers are plain
frozen modules beside the student, not Ray actors.

Both write ``output_dir/summary.json`` and ``output_dir/export/`` (the student, carrying its item IDs).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerec_dist.data.types import Examples
from onerec_dist.recipes.unify_config import DistillConfig, RFTConfig, UnifyConfig, unify_section


# ---------------------------------------------------------------------------------------------- users of a domain
def sampled_domain_rows(examples: Examples, data, domain: int, limit: int | None, seed: int) -> list[int]:
    """Positions in ``examples`` of the users of ``domain``: all, or a seeded sample of ``limit`` (sorted)."""
    from onerec_dist.data.domains import domain_rows

    rows = domain_rows(examples, data, domain)
    if limit is not None and limit < len(rows):
        rows = sorted(np.random.default_rng([seed, domain]).choice(rows, size=limit, replace=False).tolist())
    return rows


# ---------------------------------------------------------------------------------------------- RFT: sample, filter
@dataclass
class Candidates:
    """N sampled rationales per user of a prompt set, user-major (row u * N + n)."""

    user_rows: np.ndarray           # [M] the user's position in the prompt set
    bodies: list[list[int]]         # [M] rationale body ids (before </think>)
    closed: np.ndarray              # [M] bool: the teacher wrote </think>
    items: np.ndarray               # [M, K] catalogue rows of the constrained decode, best first (-1: empty slot)


def sample_candidates(model, think, decoder, prompts, cfg: RFTConfig, pad_token_id: int, seed: int) -> Candidates:
    """``cfg.samples_per_user`` rationales per user of ``prompts`` (grpo.PromptSet; its restriction keeps every
    decode inside the user's domain), each closed and decoded: batches of ``cfg.batch_size`` users, one sampled
    ``generate`` and one constrained decode per batch."""
    from onerec_dist.reasoning.cot_format import close_think
    from onerec_dist.reasoning.think_eval import generate_rationales

    n = cfg.samples_per_user
    user_rows, bodies, closed, items = [], [], [], []
    model.eval()
    for lo in range(0, len(prompts), cfg.batch_size):
        rows = list(range(lo, min(lo + cfg.batch_size, len(prompts))))
        batch = prompts.take(rows)
        repeated = [p for p in batch.prompts for _ in range(n)]                                    # [b * N]
        got, shut = generate_rationales(model, think, repeated, cfg.max_think_tokens, pad_token_id, do_sample=True,
                                        temperature=cfg.temperature, top_p=1.0, seed=seed + lo)
        with torch.no_grad():
            result = decoder.decode([close_think(think, p, b) for p, b in zip(repeated, got)],
                                    allowed_prefixes=batch.allowed_prefixes(n))
        user_rows.append(np.repeat(rows, n))
        bodies += got
        closed.append(shut)
        items.append(result.items.cpu().numpy()[:, :cfg.top_k])                                    # [b * N, K]
    if not bodies:
        return Candidates(np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=bool), np.zeros((0, cfg.top_k), int))
    return Candidates(np.concatenate(user_rows), bodies, np.concatenate(closed), np.concatenate(items))


def filter_candidates(candidates: Candidates, targets: np.ndarray, texts: Sequence[str], keep_unclosed: bool,
                      lint: Callable[[str, int], str | None]) -> list[str | None]:
    """Per candidate, the reason it is dropped, or None to keep it; the first that applies of: ``unclosed`` (no
    </think>, unless ``keep_unclosed``), ``miss`` (the user's target ``targets[u]`` is not in its top-K items),
    the lint's reason (``lint(text, target row)``), ``duplicate`` (the same text already kept for that user)."""
    reasons: list[str | None] = []
    seen: set[tuple[int, str]] = set()
    for m, text in enumerate(texts):
        user = int(candidates.user_rows[m])
        target = int(targets[user])
        reason = None
        if not keep_unclosed and not candidates.closed[m]:
            reason = "unclosed"
        elif target not in candidates.items[m].tolist():
            reason = "miss"
        else:
            reason = lint(text, target)
        if reason is None and (user, text.strip()) in seen:
            reason = "duplicate"
        if reason is None:
            seen.add((user, text.strip()))
        reasons.append(reason)
    return reasons


def count_reasons(reasons: Sequence[str | None], users: int) -> dict[str, Any]:
    """{users, sampled, kept, kept_share, dropped_by_reason} of one domain."""
    dropped: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    kept = sum(r is None for r in reasons)
    return {"users": users, "sampled": len(reasons), "kept": kept,
            "kept_share": round(kept / len(reasons), 4) if reasons else 0.0, "dropped_by_reason": dict(sorted(
                dropped.items()))}


def rationale_records(candidates: Candidates, reasons: Sequence[str | None], texts: Sequence[str],
                      examples: Examples, example_indices: Sequence[int], item_ids: Sequence[str], teacher: str,
                      provenance: str) -> list[dict]:
    """The kept candidates as bootstrap records (onerec_dist/reasoning/bootstrap.py): user, example_index (position
    in the training split), history, pruned (the whole history: a specialist sees it all), target, target_id,
    rationale, teacher, provenance."""
    records = []
    for m, reason in enumerate(reasons):
        if reason is not None:
            continue
        u = int(candidates.user_rows[m])
        target = int(examples.targets[u])
        history = [int(i) for i in examples.histories[u]]
        records.append({"user": examples.users[u], "example_index": int(example_indices[u]), "history": history,
                        "pruned": history, "target": target, "target_id": item_ids[target], "rationale": texts[m],
                        "teacher": teacher, "provenance": provenance})
    return records


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Policy:
    """A loaded export: model, tokenizer, item tokenizer, think tokens."""

    model: Any
    tokenizer: Any
    item_tok: Any
    think: Any


def load_policy(cfg, data, model_dir: str, item_codes: np.ndarray, field_name: str) -> Policy:
    """The export at ``model_dir`` with think and item tokens, whose item IDs must equal ``item_codes``
    (ValueError naming ``field_name`` otherwise)."""
    from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
    from onerec_dist.reasoning.cot_format import ThinkTokens

    if not Path(model_dir).is_dir():
        raise ValueError(f"{field_name}={model_dir!r} is not a directory: it must be an export (e.g. "
                         "<output_dir>/export of `onerec rl rl.domain=<name>`)")
    codes, sizes, _ = semantic_ids_for_run(cfg, data, model_dir)
    if not np.array_equal(np.asarray(codes), np.asarray(item_codes)):
        raise ValueError(f"{field_name}={model_dir!r} carries other item IDs than the student: teachers and student "
                         "must come from the same CoT SFT export")
    model, tokenizer, item_tok = build_recommender(dataclasses.replace(model_config(cfg), name_or_path=model_dir),
                                                   data, sizes, codes, seed=cfg.seed)
    try:
        think = ThinkTokens.from_tokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"{field_name}={model_dir!r} has no <think> tokens (it must descend from the reason_sft "
                         f"export): {err}") from err
    return Policy(model, tokenizer, item_tok, think)


def check_same_vocabulary(student: Policy, teacher: Policy, name: str) -> None:
    """Distillation scores the student's tokens with the teacher: both must map every token to the same id."""
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ValueError(f"unify.teachers.{name}: the teacher's tokenizer differs from the student's; they must "
                         "come from the same CoT SFT export")


# ---------------------------------------------------------------------------------------------- RFT run
def run_rft(cfg, settings: UnifyConfig, data, splits, item_codes: np.ndarray, output_dir: Path) -> dict[str, Any]:
    """Sample and filter every domain's rationales (one records file), then CoT SFT of the student on them."""
    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.devices import resolve_device
    from onerec_dist.reasoning.bootstrap import write_records  # the bootstrap's own writer: one record format
    from onerec_dist.reasoning.lint import lint_rationale
    from onerec_dist.recipes.grpo import prompt_set
    from onerec_dist.recipes.reason_sft import reasoning_section
    from onerec_dist.sid.prefix_index import PrefixIndex

    rft, lint_cfg, catalogue = settings.rft, reasoning_section(cfg).lint, data.catalogue
    device = resolve_device("auto")  # sampling and decoding on one device (the SFT after it uses the engine)
    train = splits["train"]
    codes = torch.as_tensor(np.asarray(item_codes))                                                # [N, L]
    records, per_domain = [], {}
    for d, name in enumerate(data.domain_names):
        teacher = load_policy(cfg, data, settings.teachers[name], item_codes, f"unify.teachers.{name}")
        teacher.model.to(device)
        rows = sampled_domain_rows(train, data, d, rft.max_users_per_domain, settings.seed)
        examples = train.take(rows)
        prompts = prompt_set(teacher.tokenizer, teacher.think, item_codes, examples, settings.max_prompt_length,
                             data=data)
        pad = teacher.tokenizer.pad_token_id or 0
        decoder = ConstrainedDecoder(teacher.model, teacher.item_tok, PrefixIndex.build(codes, teacher.item_tok
                                     .codebook_sizes), min(rft.beam_width, len(codes)), min(rft.top_k, len(codes)),
                                     pad_token_id=pad, item_codes=codes)
        candidates = sample_candidates(teacher.model, teacher.think, decoder, prompts, rft, pad, settings.seed)
        # skip_special_tokens=False: item tokens a rationale writes stay visible to the lint
        texts = [teacher.tokenizer.decode(b, skip_special_tokens=False) for b in candidates.bodies]

        def lint(text: str, target: int, tok=teacher.tokenizer) -> str | None:  # length in the model's tokens
            return lint_rationale(text, target_codes=np.asarray(item_codes)[target].tolist(),
                                  target_id=catalogue.item_ids[target], target_title=catalogue.titles[target],
                                  cfg=lint_cfg, count_tokens=lambda t: len(tok.encode(t, add_special_tokens=False)))

        reasons = filter_candidates(candidates, prompts.targets, texts, rft.keep_unclosed, lint)
        provenance = json.dumps({"method": "rft", "domain": name, "teacher": settings.teachers[name],
                                 "samples_per_user": rft.samples_per_user, "temperature": rft.temperature,
                                 "top_k": rft.top_k, "seed": settings.seed, "dataset": data.name}, sort_keys=True)
        records += rationale_records(candidates, reasons, texts, examples, rows, catalogue.item_ids,
                                     f"specialist:{name}", provenance)
        per_domain[name] = count_reasons(reasons, len(rows))
        print(f"unify rft [{name}]: kept {per_domain[name]['kept']} of {per_domain[name]['sampled']} rationales "
              f"({len(rows)} users x {rft.samples_per_user}); dropped {per_domain[name]['dropped_by_reason']}",
              flush=True)
        del teacher, decoder
    records_dir = output_dir / "rft"
    records_dir.mkdir(parents=True, exist_ok=True)
    path = write_records(records, records_dir, rft.format)
    summary = {"records": str(path), "per_domain": per_domain, "kept": len(records)}
    if not records:
        raise ValueError(f"unify rft: no rationale was kept (per domain: {per_domain}); sample more "
                         "(unify.rft.samples_per_user, max_users_per_domain) or widen unify.rft.top_k")
    summary["sft"] = fine_tune_student(cfg, settings, path, output_dir)
    summary["export_dir"] = summary["sft"]["export_dir"]
    return summary


def fine_tune_student(cfg, settings: UnifyConfig, records_path: Path, output_dir: Path) -> dict[str, Any]:
    """`onerec reason stage=sft` of the student on ``records_path`` into ``output_dir`` (export: output_dir/export);
    ``unify.rft.max_epochs`` caps it at that many passes over the kept rationales (trainer.max_epochs): the kept set
    is a few hundred records, and reasoning.sft.max_steps, sized for the bootstrap's thousands, would repeat each
    of them tens of times."""
    from omegaconf import open_dict

    from onerec_dist.recipes.reason_sft import run_sft

    sft_cfg = copy.deepcopy(cfg)
    with open_dict(sft_cfg):
        sft_cfg.model.name_or_path = student_dir(cfg, settings)
        sft_cfg.reasoning.sft.rationales_path = str(records_path)
        if settings.rft.max_epochs is not None:
            sft_cfg.trainer.max_epochs = settings.rft.max_epochs
    return run_sft(sft_cfg, output_dir)


def student_dir(cfg, settings: UnifyConfig) -> str:
    from onerec_dist.model_setup import model_config

    directory = settings.student or model_config(cfg).name_or_path
    if not directory:
        raise ValueError("unify.student: set it (or model.name_or_path) to the shared CoT SFT export the "
                         "specialists started from (`onerec reason stage=sft`)")
    return str(directory)


# ---------------------------------------------------------------------------------------------- distillation
def teacher_logprobs(teachers: dict[int, Any], batch: dict[str, torch.Tensor], domains: np.ndarray) -> torch.Tensor:
    """[N, T-1] log pi_teacher(token) of every row under its own domain's teacher (rows grouped by domain)."""
    from onerec_dist.recipes.grpo import sequence_logprobs

    ids = batch["input_ids"]
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    with torch.no_grad():
        for d in np.unique(domains).tolist():
            rows = torch.as_tensor(np.flatnonzero(domains == d), device=ids.device)
            part = {k: v[rows] for k, v in batch.items()}
            out[rows] = sequence_logprobs(teachers[d], part, 1.0)[0].to(out.device)
    return out


def distill_step(student, teachers: dict[int, Any], optimizer, think, prompts, cfg: DistillConfig,
                 pad_token_id: int, seed: int) -> dict[str, float]:
    """One on-policy distillation step on ``prompts`` (a grpo.PromptSet whose restriction gives each user's domain):
    sample ``cfg.samples_per_prompt`` rationales per user from the student, score them with the teachers, one
    AdamW step on ``distill_loss``. Returns the loss statistics."""
    from onerec_dist.recipes.grpo import Rollout, policy_batch, sequence_logprobs
    from onerec_dist.reasoning.think_eval import generate_rationales
    from onerec_dist.rl.distill import distill_loss

    n = cfg.samples_per_prompt
    repeated = [p for p in prompts.prompts for _ in range(n)]                                       # [B * n]
    student.eval()
    bodies, closed = generate_rationales(student, think, repeated, cfg.max_new_tokens, pad_token_id, do_sample=True,
                                         temperature=cfg.temperature, top_p=1.0, seed=seed)
    rollout = Rollout(repeated, bodies, closed, torch.zeros(len(repeated), 0), n)
    device = student.get_output_embeddings().weight.device
    batch = {k: v.to(device) for k, v in policy_batch(think, rollout, torch.zeros(len(repeated)),
                                                      pad_token_id).items()}                      # [B*n, T]
    domains = np.repeat(prompts.restriction.user_domains, n)                                        # [B*n]
    mask = batch["action_mask"][:, 1:]                                                              # [B*n, T-1]
    with torch.no_grad():
        sampling = sequence_logprobs(student, batch, 1.0)[0]                                        # pi_old
    target = teacher_logprobs(teachers, batch, domains)
    student.train()
    logprobs = sequence_logprobs(student, batch, 1.0)[0]                                            # [B*n, T-1]
    loss, stats = distill_loss(logprobs, sampling, target, mask, cfg.importance_cap)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    stats["loss"] = float(loss.detach())
    stats["rationale_length"] = float(mask.sum()) / len(repeated)
    return stats


def fixed_prompt_kl(student, teachers: dict[int, Any], think, prompts, max_new_tokens: int, pad_token_id: int
                    ) -> float:
    """Mean exact per-token KL(student || teacher) over the greedy rationales the student writes for ``prompts``
    (each user scored against its domain's teacher): what distillation should lower."""
    from onerec_dist.recipes.grpo import Rollout, policy_batch
    from onerec_dist.reasoning.think_eval import generate_rationales
    from onerec_dist.rl.distill import exact_reverse_kl

    if len(prompts) == 0:
        return float("nan")
    student.eval()
    bodies, closed = generate_rationales(student, think, prompts.prompts, max_new_tokens, pad_token_id)
    device = student.get_output_embeddings().weight.device
    batch = {k: v.to(device) for k, v in policy_batch(think, Rollout(prompts.prompts, bodies, closed,
                                                                     torch.zeros(len(prompts), 0), 1),
                                                      torch.zeros(len(prompts)), pad_token_id).items()}
    domains = prompts.restriction.user_domains
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for d in np.unique(domains).tolist():
            rows = torch.as_tensor(np.flatnonzero(domains == d), device=device)
            ids, attention = batch["input_ids"][rows], batch["attention_mask"][rows]
            mask = batch["action_mask"][rows][:, 1:]
            s = student(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
            t = teachers[d](input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
            count = float(mask.sum())
            total += exact_reverse_kl(s, t, mask) * count
            tokens += count
    return total / max(tokens, 1.0)


def distill_prompts(settings: UnifyConfig, policy, data, examples: Examples, item_codes, limit: int | None):
    """PromptSet of ``examples``' users of every domain (``limit`` per domain, seeded), prompts naming the domain."""
    from onerec_dist.recipes.grpo import prompt_set

    rows = sorted(r for d in range(len(data.domain_names))
                  for r in sampled_domain_rows(examples, data, d, limit, settings.seed))
    return prompt_set(policy.tokenizer, policy.think, item_codes, examples.take(rows),
                      settings.max_prompt_length, data=data)


def run_distill(cfg, settings: UnifyConfig, data, splits, item_codes: np.ndarray, output_dir: Path) -> dict:
    """The distillation loop (single process, module docstring); exports the student to output_dir/export."""
    from onerec_dist.recipes.grpo import PromptSampler
    from onerec_dist.sid.model_ids import copy_model_ids

    from onerec_dist.devices import resolve_device

    dcfg = settings.distill
    device = resolve_device("auto")  # one device: the first GPU when there is one, else the CPU
    source = student_dir(cfg, settings)
    student = load_policy(cfg, data, source, item_codes, "unify.student")
    student.model.to(device)
    teachers = {}
    for d, name in enumerate(data.domain_names):
        teacher = load_policy(cfg, data, settings.teachers[name], item_codes, f"unify.teachers.{name}")
        check_same_vocabulary(student, teacher, name)
        teachers[d] = teacher.model.to(device).eval().requires_grad_(False)
    train = distill_prompts(settings, student, data, splits["train"], item_codes, dcfg.max_users_per_domain)
    valid = splits.get("valid")
    fixed = (distill_prompts(settings, student, data, valid, item_codes, dcfg.kl_users)
             if valid is not None and dcfg.kl_users else train.take([]))
    if dcfg.trainable == "no_embeddings":
        student.model.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.model.parameters() if p.requires_grad], lr=dcfg.lr,
                                  weight_decay=0.0)
    sampler = PromptSampler(len(train), min(dcfg.prompts_per_step, len(train)), 0, 1, settings.seed)
    pad = student.tokenizer.pad_token_id or 0
    kl_args = (student.model, teachers, student.think, fixed, dcfg.max_new_tokens, pad)
    history, kl_history = [], [{"step": 0, "exact_reverse_kl": fixed_prompt_kl(*kl_args)}]
    start = time.perf_counter()
    for step in range(1, dcfg.steps + 1):
        stats = distill_step(student.model, teachers, optimizer, student.think, train.take(sampler.next_rows()),
                             dcfg, pad, settings.seed + step)
        history.append({"step": step, **stats})
        if step % dcfg.log_every == 0 or step == dcfg.steps:
            kl_history.append({"step": step, "exact_reverse_kl": fixed_prompt_kl(*kl_args)})
            print(f"unify distill step {step}: loss {stats['loss']:.4f}, sampled reverse KL "
                  f"{stats['reverse_kl']:.4f}, fixed users' KL {kl_history[-1]['exact_reverse_kl']:.4f}", flush=True)
    export = output_dir / "export"
    student.model.save_pretrained(export)
    student.tokenizer.save_pretrained(export)
    copy_model_ids(source, export)
    return {"history": history, "kl_history": kl_history, "steps": dcfg.steps, "train_users": len(train),
            "fixed_users": len(fixed), "train_seconds": round(time.perf_counter() - start, 3),
            "export_dir": str(export), "single_process": True}


# ---------------------------------------------------------------------------------------------- the stage
def run_unify(cfg, output_dir) -> dict[str, Any]:
    """`onerec unify`: validate, load the data, run the method; summary.json (written by the stage runner) holds
    per-domain kept counts (rft) or loss / KL histories (distill)."""
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.model_setup import semantic_ids_for_run

    settings = unify_section(cfg)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_config(cfg))
    settings.check_teachers(list(data.domain_names))
    source = student_dir(cfg, settings)
    for name, directory in [("unify.student", source)] + [(f"unify.teachers.{d}", settings.teachers[d])
                                                          for d in data.domain_names]:
        if not Path(directory).is_dir():  # before any ID building or model loading
            raise ValueError(f"{name}={directory!r} is not a directory: it must be an export (the shared CoT SFT "
                             "export for the student, <output_dir>/export of `onerec rl rl.domain=<name>` for a "
                             "teacher)")
    splits = make_splits(data, data_config(cfg))
    if splits.get("train") is None or len(splits["train"]) == 0:
        raise ValueError(f"dataset {data.name!r} has no training split: unify needs training users")
    item_codes, _, ids_source = semantic_ids_for_run(cfg, data, source)
    run = run_rft if settings.method == "rft" else run_distill
    summary = run(cfg, settings, data, splits, np.asarray(item_codes), output_dir)
    return {"method": settings.method, "student": source, "teachers": dict(settings.teachers),
            "domains": list(data.domain_names), "semantic_ids": ids_source, **summary}
