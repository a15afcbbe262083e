"""`onerec unify method=rft|distill` (onerec_dist/recipes/unify.py): OneReason's unify step.

The world: the synthetic generator with 2 domains ("Shop A", "Shop B"; 40 items and 20 users each), a tiny Qwen3 with
3-level item tokens (codebooks 8 x 8 x 8, random unique IDs) and <think> / </think> saved as the shared "CoT SFT"
export; each domain's teacher is that export with its output layer perturbed differently (so teacher and student
disagree, and distillation has something to close). All single-process, seconds.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from onerec_dist.recipes import unify
from onerec_dist.recipes.unify_config import UnifyConfig, unify_config

SIZES = [8, 8, 8]
# The student's output rows of FAVOURED ordinary words are moved along the mean hidden state so that their logits rise by ~SHIFT:
# it samples them most of the time, the teachers rarely; reverse KL(student || teacher) is large, and the gradient
# on exactly the sampled rows undoes it quickly.
FAVOURED = 8
SHIFT = 6.0
DATA = ["data.synthetic.num_domains=2", "data.synthetic.num_users=40", "data.synthetic.num_items=80",
        "data.synthetic.min_seq_len=4", "data.synthetic.max_seq_len=6"]


def _save(model, tokenizer, item_tok, codes, data, directory):
    from onerec_dist.sid.model_ids import save_model_ids

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_model_ids(directory, codes, data.catalogue.item_ids, SIZES, item_tok)
    return str(directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(cfg, data, splits, codes [80, 3], student Policy, {domain index: teacher model}, exports)."""
    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.model_setup import tokenizer_corpus
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.reasoning.cot_format import add_think_tokens
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    root = tmp_path_factory.mktemp("unify")
    cfg = compose(DATA)
    data = load_dataset(data_config(cfg))
    gen = torch.Generator().manual_seed(0)
    codes = np.array(np.unravel_index(torch.randperm(512, generator=gen)[:80].numpy(), SIZES)).T  # [80, 3] unique
    tokenizer = build_tokenizer_from_corpus(tokenizer_corpus(data), vocab_size=300)
    model = build_tiny_model(tokenizer, tie_word_embeddings=False, seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=0)
    add_think_tokens(model, tokenizer, seed=0)
    teacher_base = copy.deepcopy(model)
    with torch.no_grad():  # the student favours FAVOURED words by ~SHIFT nats more than the teachers do
        prompt = torch.tensor([tokenizer.encode("The user has purchased, in order:")])
        hidden = model(input_ids=prompt, output_hidden_states=True).hidden_states[-1][0].mean(0)  # [d]
        rows = sorted(i for t, i in tokenizer.get_vocab().items() if t.isalpha() and len(t) > 2)[:FAVOURED]
        model.get_output_embeddings().weight[rows] += SHIFT * hidden / hidden.square().sum()
    exports = {"student": _save(model, tokenizer, item_tok, codes, data, root / "student")}
    for d, name in enumerate(data.domain_names):
        teacher = copy.deepcopy(teacher_base)
        with torch.no_grad():  # and each domain's teacher is a little different
            head = teacher.get_output_embeddings().weight
            head += torch.randn(head.shape, generator=torch.Generator().manual_seed(10 + d)) * 0.02
        exports[name] = _save(teacher, tokenizer, item_tok, codes, data, root / f"teacher_{d}")
    settings = unify_config({"teachers": {n: exports[n] for n in data.domain_names}, "max_prompt_length": 128})
    student = unify.load_policy(cfg, data, exports["student"], codes, "unify.student")
    teachers = {d: unify.load_policy(cfg, data, exports[n], codes, "t").model.eval().requires_grad_(False)
                for d, n in enumerate(data.domain_names)}
    return cfg, settings, data, make_splits(data, data_config(cfg)), codes, student, teachers, exports


# ---------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"unify.method='sft' is not allowed; allowed values: 'rft', 'distill'"):
        unify_config({"method": "sft"})
    with pytest.raises(ValueError, match=r"unify.rft.top_k.*1..unify.rft.beam_width \(4\)"):
        unify_config({"rft": {"beam_width": 4, "top_k": 5}})
    with pytest.raises(ValueError, match="unify.distill.importance_cap"):
        unify_config({"distill": {"importance_cap": 0.0}})
    with pytest.raises(ValueError, match="unknown key.*samples in unify.rft"):
        unify_config({"rft": {"samples": 2}})
    settings = UnifyConfig(teachers={"A": "a/export", "C": "c/export"})
    with pytest.raises(ValueError, match=r"allowed \(and required\) keys: 'A', 'B'; missing: 'B'; unknown: 'C'"):
        settings.check_teachers(["A", "B"])
    with pytest.raises(ValueError, match="unify.teachers: .* single domain"):
        settings.check_teachers(["all"])
    UnifyConfig(teachers={"A": "a", "B": "b"}).check_teachers(["A", "B"])  # complete: no error


def test_cli_refuses_missing_teachers_and_bad_methods(tmp_path, capsys):
    from onerec_dist.cli import main

    assert main(["unify", f"output_dir={tmp_path}", *DATA, "unify.teachers={Shop A: a/export}"]) == 2
    assert "missing: 'Shop B'" in capsys.readouterr().err
    assert main(["unify", f"output_dir={tmp_path}", *DATA, "unify.method=merge"]) == 2
    assert "allowed values: 'rft', 'distill'" in capsys.readouterr().err
    assert main(["unify", f"output_dir={tmp_path}", *DATA, "unify.teachers={Shop A: a, Shop B: b}"]) == 2
    assert "unify.student" in capsys.readouterr().err  # no student and no model.name_or_path
    assert main(["unify", f"output_dir={tmp_path}", *DATA, "unify.teachers={Shop A: a, Shop B: b}",
                 f"unify.student={tmp_path}"]) == 2
    assert "unify.teachers.Shop A='a' is not a directory" in capsys.readouterr().err  # checked before any loading


# ---------------------------------------------------------------------------------------------- RFT, pure
def test_filter_candidates_worked_example():
    # 2 users (targets 7 and 3), 3 samples each, top-2 items per sample:
    #  m  user  closed  top-2     text          reason
    #  0  0     yes     [7, 1]    "warm tones"  kept (hit)
    #  1  0     yes     [1, 2]    "cold"        miss (7 not in top-2)
    #  2  0     yes     [2, 7]    "warm tones"  duplicate (hit, lint-clean, but user 0 has that text already)
    #  3  1     no      [3, 4]    "gears"       unclosed (keep_unclosed=False)
    #  4  1     yes     [3, 4]    "LEAK"        the lint's reason (hit, but the lint drops it)
    #  5  1     yes     [4, 3]    "gears"       kept (the unclosed "gears" was never kept)
    candidates = unify.Candidates(np.array([0, 0, 0, 1, 1, 1]), [[1]] * 6,
                                  np.array([True, True, True, False, True, True]),
                                  np.array([[7, 1], [1, 2], [2, 7], [3, 4], [3, 4], [4, 3]]))
    texts = ["warm tones", "cold", "warm tones", "gears", "LEAK", "gears"]
    lint = lambda text, target: "leak_title" if text == "LEAK" else None  # noqa: E731
    reasons = unify.filter_candidates(candidates, np.array([7, 3]), texts, False, lint)
    assert reasons == [None, "miss", "duplicate", "unclosed", "leak_title", None]
    assert unify.count_reasons(reasons, 2) == {"users": 2, "sampled": 6, "kept": 2, "kept_share": 0.3333,
                                               "dropped_by_reason": {"duplicate": 1, "leak_title": 1, "miss": 1,
                                                                     "unclosed": 1}}
    # keep_unclosed=True: m = 3 hits and is clean -> kept, and then m = 5 repeats its text for user 1
    assert unify.filter_candidates(candidates, np.array([7, 3]), texts, True, lint)[3:] == [None, "leak_title",
                                                                                             "duplicate"]


# ---------------------------------------------------------------------------------------------- RFT, tiny model
def test_teacher_rationales_decode_inside_the_domain_and_become_sft_records(world, tmp_path):
    from onerec_dist.data.domains import domain_name_by_user
    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.reasoning.bootstrap import write_records, read_rationales
    from onerec_dist.reasoning.sft_data import cot_sft_examples
    from onerec_dist.recipes.grpo import prompt_set
    from onerec_dist.sid.prefix_index import PrefixIndex

    cfg, settings, data, splits, codes, student, _, _ = world
    train = splits["train"]
    rows = unify.sampled_domain_rows(train, data, 1, 3, seed=0)  # 3 users of "Shop B"
    assert len(rows) == 3 and all(data.user_domains[train.users[r]] == 1 for r in rows)
    examples = train.take(rows)
    prompts = prompt_set(student.tokenizer, student.think, codes, examples, 128, data=data)
    rft = settings.rft.__class__(samples_per_user=2, max_think_tokens=3, beam_width=40, top_k=40, batch_size=2,
                                 keep_unclosed=True)
    decoder = ConstrainedDecoder(student.model, student.item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES),
                                 40, 40, pad_token_id=student.tokenizer.pad_token_id, item_codes=torch.as_tensor(codes))
    candidates = unify.sample_candidates(student.model, student.think, decoder, prompts, rft,
                                         student.tokenizer.pad_token_id, seed=0)
    # 3 users x 2 samples, user-major (2 batches of 2 users and 1 user); K = 40 = the domain's items, so each row's
    # 40 answers are exactly Shop B's 40 items (the restriction), and therefore every sample hits its target.
    assert candidates.user_rows.tolist() == [0, 0, 1, 1, 2, 2] and candidates.items.shape == (6, 40)
    assert (data.item_domains[candidates.items] == 1).all() and len(set(candidates.items[0].tolist())) == 40
    assert all(0 < len(b) <= 3 for b in candidates.bodies)
    texts = [student.tokenizer.decode(b, skip_special_tokens=False) for b in candidates.bodies]
    reasons = unify.filter_candidates(candidates, prompts.targets, texts, True, lambda t, y: None)
    assert all(r in (None, "duplicate") for r in reasons) and reasons.count(None) >= 3  # one per user at least
    records = unify.rationale_records(candidates, reasons, texts, examples, rows, data.catalogue.item_ids,
                                      "specialist:Shop B", "{}")
    assert [r["user"] for r in records] == [train.users[rows[int(candidates.user_rows[m])]]
                                            for m, r in enumerate(reasons) if r is None]
    assert all(r["example_index"] in rows and r["target"] == train.targets[r["example_index"]] for r in records)
    # The bootstrap's writer and reader, and the CoT SFT's example builder, take these records as they are.
    back = read_rationales(write_records(records, tmp_path, "parquet"))
    assert back == records
    sft = cot_sft_examples(back, codes, student.tokenizer, student.think, max_length=256, nothink_ratio=0.0,
                           user_domains=domain_name_by_user(data))
    assert len(sft) == len(records) and all(student.think.begin_id in e.input_ids for e in sft)


# ---------------------------------------------------------------------------------------------- distillation
def test_distillation_lowers_the_reverse_kl_and_trains_only_the_trainable_weights(world):
    cfg, settings, data, splits, codes, student, teachers, _ = world
    model = copy.deepcopy(student.model)
    policy = unify.Policy(model, student.tokenizer, student.item_tok, student.think)
    train = unify.distill_prompts(settings, policy, data, splits["train"], codes, 4)  # 4 users per domain
    fixed = unify.distill_prompts(settings, policy, data, splits["valid"], codes, 3)
    assert sorted(set(train.restriction.user_domains.tolist())) == [0, 1]
    dcfg = settings.distill.__class__(samples_per_prompt=4, max_new_tokens=4, lr=3e-3, importance_cap=2.0)
    pad = student.tokenizer.pad_token_id
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen: must stay bit-identical
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teachers_before = {d: [p.detach().clone() for p in t.parameters()] for d, t in teachers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=dcfg.lr, weight_decay=0.0)
    kl_before = unify.fixed_prompt_kl(model, teachers, student.think, fixed, 4, pad)
    history = [unify.distill_step(model, teachers, optimizer, student.think, train, dcfg, pad, seed=s)
               for s in range(12)]
    kl_after = unify.fixed_prompt_kl(model, teachers, student.think, fixed, 4, pad)
    assert all(np.isfinite(h["loss"]) and h["tokens"] > 0 for h in history)
    assert all(h["weight_mean"] == pytest.approx(1.0) for h in history)  # one update per sample batch: w = 1
    # exact KL(student || teacher) per token on the fixed users' greedy rationales: ~0.76 -> ~0.07 (seeded run);
    # the bound leaves room for other CPUs' rounding
    assert kl_before > 0.3 and kl_after < 0.3 * kl_before, (kl_before, kl_after)
    sampled = [h["reverse_kl"] for h in history]
    assert np.mean(sampled[-3:]) < np.mean(sampled[:3])  # the sampled (k1) estimate falls too
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" not in changed
    assert all(torch.equal(p, q) for d, t in teachers.items() for p, q in zip(t.parameters(), teachers_before[d]))


def test_onerec_unify_distill_end_to_end(world, tmp_path):
    from onerec_dist.cli import main
    from onerec_dist.sid.model_ids import TABLE_FILE

    *_, data, _, _, _, _, exports = world[:2] + world[2:]
    teachers = ", ".join(f"{n}: {exports[n]}" for n in data.domain_names)
    assert main(["unify", f"output_dir={tmp_path}", *DATA, f"model.name_or_path={exports['student']}",
                 "unify.method=distill", f"unify.teachers={{{teachers}}}", "unify.max_prompt_length=128",
                 "unify.distill.steps=2", "unify.distill.prompts_per_step=2", "unify.distill.samples_per_prompt=2",
                 "unify.distill.max_new_tokens=3", "unify.distill.kl_users=1", "unify.distill.log_every=1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage"] == "unify" and summary["method"] == "distill" and summary["single_process"]
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert [h["step"] for h in summary["kl_history"]] == [0, 1, 2] and summary["fixed_users"] == 2
    assert (tmp_path / "export" / TABLE_FILE).is_file() and (tmp_path / "export" / "config.json").is_file()


def test_run_rft_writes_every_domains_hits_and_hands_them_to_the_cot_sft(world, tmp_path, monkeypatch):
    from onerec_dist.reasoning.bootstrap import read_rationales

    cfg, settings, data, splits, codes, *_, exports = world
    # K = 40 = a domain's catalogue: every closed rationale hits, so what is kept is decided by closing, the lint and
    # repeats; keep_unclosed so that the untrained teachers' (rarely closed) rationales count.
    settings = unify_config({"teachers": {n: exports[n] for n in data.domain_names}, "max_prompt_length": 128,
                             "rft": {"samples_per_user": 2, "max_think_tokens": 3, "max_users_per_domain": 2,
                                     "beam_width": 40, "top_k": 40, "keep_unclosed": True, "format": "jsonl"}})
    handed = {}

    def fake_sft(cfg_, settings_, path, output_dir):  # the CoT SFT runs on the engine (Ray): not in this test
        handed.update(path=path, student=unify.student_dir(cfg_, settings_))
        return {"export_dir": str(output_dir / "export")}

    monkeypatch.setattr(unify, "fine_tune_student", fake_sft)
    with pytest.raises(ValueError, match="unify.student"):
        unify.run_rft(cfg, settings, data, splits, codes, tmp_path)  # no student, no model.name_or_path
    settings.student = exports["student"]
    summary = unify.run_rft(cfg, settings, data, splits, codes, tmp_path)
    records = read_rationales(handed["path"])
    assert handed["student"] == exports["student"] and summary["records"] == str(handed["path"])
    per_domain = summary["per_domain"]
    assert list(per_domain) == ["Shop A", "Shop B"]
    assert all(v["users"] == 2 and v["sampled"] == 4 and 1 <= v["kept"] <= 4 for v in per_domain.values())
    assert summary["kept"] == len(records) == sum(v["kept"] for v in per_domain.values())
    for record in records:  # each record came from its own domain's teacher, for a user of that domain
        domain = data.domain_names[data.user_domains[record["user"]]]
        assert record["teacher"] == f"specialist:{domain}" and json.loads(record["provenance"])["domain"] == domain
        assert splits["train"].users[record["example_index"]] == record["user"]


def test_fine_tune_student_calls_the_cot_sft_with_the_student_and_the_records(world, tmp_path, monkeypatch):
    from onerec_dist.recipes import reason_sft

    cfg, settings, *_, exports = world
    seen = {}

    def fake_run_sft(sft_cfg, output_dir):  # the real one trains on the engine (Ray): its inputs are what matter
        seen.update(model=sft_cfg.model.name_or_path, records=sft_cfg.reasoning.sft.rationales_path, out=output_dir)
        return {"export_dir": str(output_dir / "export")}

    monkeypatch.setattr(reason_sft, "run_sft", fake_run_sft)
    settings = unify_config({"teachers": {"x": "y"}, "student": exports["student"]})
    summary = unify.fine_tune_student(cfg, settings, tmp_path / "rft" / "rationales.parquet", tmp_path)
    assert seen == {"model": exports["student"], "records": str(tmp_path / "rft" / "rationales.parquet"),
                    "out": tmp_path} and summary["export_dir"] == str(tmp_path / "export")
    assert cfg.model.name_or_path is None and cfg.reasoning.sft.rationales_path is None  # the run's cfg is untouched

    def epochs_of(max_epochs):  # trainer.max_epochs the SFT receives (its step_budget: epochs x steps per epoch)
        unify.fine_tune_student(cfg, unify_config({"teachers": {"x": "y"}, "student": exports["student"],
                                                   "rft": {"max_epochs": max_epochs}}), tmp_path / "r", tmp_path)
        return seen["epochs"]

    def fake_run_sft(sft_cfg, output_dir):
        seen["epochs"] = sft_cfg.trainer.get("max_epochs")
        return {"export_dir": str(output_dir / "export")}

    monkeypatch.setattr(reason_sft, "run_sft", fake_run_sft)
    run_epochs = cfg.trainer.get("max_epochs")
    assert epochs_of(3.0) == 3.0 and epochs_of(None) == run_epochs   # null: the run's own trainer.max_epochs
    assert cfg.trainer.get("max_epochs") == run_epochs
    with pytest.raises(ValueError, match=r"unify.rft.max_epochs: 0.0: allowed values: null or > 0"):
        unify_config({"rft": {"max_epochs": 0.0}})
