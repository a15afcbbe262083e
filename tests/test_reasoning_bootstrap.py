"""Rationale bootstrap (onerec_dist.reasoning.bootstrap): only training windows reach the teacher, the leak lint
drops a teacher that copies the target, records and summary carry what the SFT stage needs."""

import json

import numpy as np
import pytest

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.splits import leave_one_out
from onerec_dist.data.synthetic import generate_synthetic
from onerec_dist.prompts import item_text
from onerec_dist.reasoning.bootstrap import (BootstrapConfig, bootstrap_rationales, read_rationales,
                                             reasoning_config)
from onerec_dist.reasoning.lint import LintConfig
from onerec_dist.reasoning.prune import CooccurrenceSimilarity, PruneConfig
from onerec_dist.reasoning.teachers import MetadataTeacherConfig, TemplateTeacherConfig, build_teacher


@pytest.fixture(scope="module")
def world():
    data = generate_synthetic(SyntheticConfig(num_users=60, mode="reasoning"))
    # Give the catalogue semantic IDs (item i -> (i // 16, i % 16)) so the lint can look for item tokens.
    data.catalogue.semantic_ids = np.stack([np.arange(300) // 16, np.arange(300) % 16], axis=1)
    splits = leave_one_out(data.sequences, max_history=50)
    return data, splits, CooccurrenceSimilarity.fit(splits["train"], 300)


class SpyTeacher:
    """Records every request; writes what ``write(request)`` says."""

    name = "spy"

    def __init__(self, write):
        self.write, self.requests = write, []

    def rationales(self, requests):
        self.requests.extend(requests)
        return [self.write(r) for r in requests]


def run(world, teacher, tmp_path, cfg=None, **kwargs):
    data, splits, similarity = world
    return bootstrap_rationales(data, splits, teacher, cfg or TemplateTeacherConfig(batch_size=32), similarity,
                                tmp_path, **kwargs)


def test_only_training_windows_reach_the_teacher(world, tmp_path):
    data, splits, _ = world
    spy = SpyTeacher(lambda r: "likes cameras")
    summary = run(world, spy, tmp_path, prune=PruneConfig(k=3))
    asked = {(r.user, r.history, r.target) for r in spy.requests}
    train = splits["train"]
    assert asked == {(u, tuple(h), t) for u, h, t in zip(train.users, train.histories, train.targets)}
    held_out = {(u, tuple(h)) for name in ("valid", "test") for u, h in zip(splits[name].users, splits[name].histories)}
    assert not held_out & {(r.user, r.history) for r in spy.requests}
    # Pruned histories: k = 3 items of the history, a subsequence of it (time order kept).
    for r in spy.requests:
        assert len(r.pruned) == min(3, len(r.history))
        rest = iter(r.history)
        assert all(any(i == j for j in rest) for i in r.pruned)
    assert summary["examples"] == summary["kept"] == len(train) and summary["dropped_leak"] == 0
    assert summary["rationales_per_s"] > 0


def test_a_teacher_that_copies_the_target_is_dropped_every_time(world, tmp_path):
    data, splits, _ = world
    cat = data.catalogue
    forms = [lambda y: f"Next: {item_text(cat.semantic_ids[y])}.",  # its item tokens
             lambda y: f"They will buy {cat.titles[y]}.",  # its title
             lambda y: f"Surely item {cat.item_ids[y]} comes next."]  # its ID text
    spy = SpyTeacher(lambda r: forms[r.target % 3](r.target))
    summary = run(world, spy, tmp_path, bootstrap=BootstrapConfig(format="jsonl"))
    n = len(splits["train"])
    assert summary["examples"] == n and summary["kept"] == 0 and summary["dropped_leak"] == n
    assert sum(summary["dropped_by_reason"].values()) == n
    assert set(summary["dropped_by_reason"]) == {"leak_item_tokens", "leak_title", "leak_id_text"}
    assert read_rationales(summary["records"]) == []
    dropped = [json.loads(line) for line in open(summary["dropped"])]
    assert len(dropped) == n and all(d["reason"].startswith("leak_") for d in dropped)


def test_empty_and_long_rationales_are_other_drops(world, tmp_path):
    spy = SpyTeacher(lambda r: "" if r.target % 2 else "word " * 20)
    summary = run(world, spy, tmp_path, lint=LintConfig(max_tokens=10))
    assert summary["kept"] == 0 and summary["dropped_leak"] == 0 and summary["dropped_other"] == summary["examples"]
    assert set(summary["dropped_by_reason"]) == {"empty", "too_long"}


def test_metadata_teacher_records_carry_provenance(world, tmp_path):
    data, splits, _ = world
    cfg = MetadataTeacherConfig(batch_size=64)
    teacher = build_teacher(cfg, data, splits["train"])
    summary = run(world, teacher, tmp_path, cfg=cfg, bootstrap=BootstrapConfig(max_examples=50, seed=1,
                                                                                progress=False))
    # The metadata teacher names groups and brands, never titles or IDs: nothing is dropped.
    assert summary["examples"] == 50 and summary["kept"] == 50 and summary["dropped_leak"] == 0
    records = read_rationales(summary["records"])
    assert len(records) == 50 and summary["records"].endswith("rationales.parquet")
    train = splits["train"]
    for record in records:
        i = record["example_index"]
        assert record["user"] == train.users[i] and record["history"] == train.histories[i]
        assert record["target"] == train.targets[i] and record["teacher"] == "metadata"
        assert record["rationale"].startswith("Persona:") and "\nTransition:" in record["rationale"]
        assert set(record["pruned"]) <= set(record["history"]) and len(record["pruned"]) <= 10
    provenance = json.loads(records[0]["provenance"])
    assert provenance["teacher"]["kind"] == "metadata" and provenance["prune"] == {"k": 10,
                                                                                   "similarity": "cooccurrence"}
    assert provenance["split"] == "train" and provenance["dataset"] == data.name
    # Same seed, same sample and same texts.
    again = run(world, build_teacher(cfg, data, splits["train"]), tmp_path / "again", cfg=cfg,
                bootstrap=BootstrapConfig(max_examples=50, seed=1, progress=False))
    assert [r["rationale"] for r in read_rationales(again["records"])] == [r["rationale"] for r in records]


def test_no_training_windows_is_an_error(world, tmp_path):
    data, splits, similarity = world
    with pytest.raises(ValueError, match=r"splits\['train'\] is missing or empty"):
        bootstrap_rationales(data, {"train": None, "test": splits["test"]}, SpyTeacher(str), TemplateTeacherConfig(),
                             similarity, tmp_path)


def test_reasoning_config_names_bad_fields():
    assert isinstance(reasoning_config({}).teacher, MetadataTeacherConfig)
    with pytest.raises(ValueError, match=r"reasoning.bootstrap.format='csv' is not allowed"):
        reasoning_config({"bootstrap": {"format": "csv"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) kk in reasoning.prune"):
        reasoning_config({"prune": {"kk": 3}})
