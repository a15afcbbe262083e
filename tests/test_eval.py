"""`onerec eval`: baselines worked by hand, validity of every prediction, sharded == single process."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from conftest import shared_dataset

from onerec_dist.cli import main
from onerec_dist.evaluation import (EvalConfig, eval_config, length_batches, merge_batches, most_popular, select_users,
                                   training_item_counts)
from onerec_dist.data.types import Examples

SMALL = ["data.synthetic.num_users=40", "data.synthetic.num_items=60", "eval.beam_width=10", "eval.top_k=10",
         "eval.ks=[1,5,10]", "eval.ndcg_ks=[5,10]", "sid.codebook_size=8"]


def test_popularity_counts_only_training_interactions():
    # Leave-one-out: the last two items of each sequence are validation/test targets and must not count.
    # u1 = [0, 1, 2, 3, 4] -> counts 0, 1, 2; u2 = [2, 2, 5, 6] -> counts 2, 2. So item 2: 3, items 0, 1: 1.
    counts = training_item_counts({"u1": [0, 1, 2, 3, 4], "u2": [2, 2, 5, 6]}, None, leave_one_out=True)
    assert counts == Counter({2: 3, 0: 1, 1: 1})
    # Top-3 of 7 items: 2 (3 times), then ties 0 and 1 broken by lower index; same list for every user.
    assert most_popular(counts, 7, 3, num_users=2).tolist() == [[2, 0, 1], [2, 0, 1]]
    given = Examples(["a"], [[4, 4]], [3])
    assert training_item_counts({}, given, leave_one_out=False) == Counter({4: 2, 3: 1})


def test_length_batches_and_merge_restore_user_order():
    prompts = [[1] * 5, [1] * 2, [1] * 9, [1] * 2]
    batches = length_batches(prompts, 2)
    assert batches == [[1, 3], [0, 2]]  # lengths 2, 2 | 5, 9 (stable)
    results = {0: (np.array([[11], [33]]), np.zeros((2, 1))), 1: (np.array([[0], [22]]), np.ones((2, 1)))}
    items, _ = merge_batches(results, batches, 4, 1)
    assert items[:, 0].tolist() == [0, 11, 22, 33]


def test_eval_config_errors():
    with pytest.raises(ValueError, match="eval.baseline: 'random' is not allowed; allowed values: popular, hf_generate"):
        EvalConfig(baseline="random")
    with pytest.raises(ValueError, match="eval.beam_width: must be >= eval.top_k=20"):
        EvalConfig(beam_width=5)
    assert EvalConfig(baseline="popular").baseline == ["popular"]


def test_select_users_first_or_a_seeded_sample_in_dataset_order():
    def users(n):  # users 0..n-1, as a 2-domain dataset lists them: domain 0's first ("a"), then domain 1's ("b")
        examples = Examples()
        for i in range(n):
            examples.append(f"{'a' if i < n // 2 else 'b'}{i}", [i], i)
        return examples
    assert select_users(users(10), None, "random", 0).targets == list(range(10))  # null: everyone
    assert select_users(users(10), 20, "random", 0).targets == list(range(10))    # more than there are: everyone
    assert select_users(users(10), 4, "first", 0).users == ["a0", "a1", "a2", "a3"]  # one domain only
    sample = select_users(users(1000), 100, "random", 7)
    # 100 distinct users in dataset order, the same for the same seed, each row still (user, history, target) aligned
    assert len(set(sample.targets)) == 100 and sample.targets == sorted(sample.targets)
    assert sample.targets == select_users(users(1000), 100, "random", 7).targets
    assert all(u[1:] == str(t) and h == [t] for u, h, t in zip(sample.users, sample.histories, sample.targets))
    # both halves are drawn: each holds 50 +- 15 of the 100 (hypergeometric sd ~4.7, so 15 is > 3 sd)
    assert 35 <= sum(u.startswith("a") for u in sample.users) <= 65
    with pytest.raises(ValueError, match="eval.user_sample"):
        eval_config(OmegaConf.create({"eval": {"user_sample": "every_other"}}))


def run_eval(tmp_path, *extra):
    assert main(["eval", f"output_dir={tmp_path}", *SMALL, *extra]) == 0
    return json.loads((tmp_path / "summary.json").read_text()), pq.read_table(tmp_path / "predictions.parquet")


def test_eval_model_and_baselines_on_synthetic(tmp_path):
    summary, table = run_eval(tmp_path, "eval.baseline=[popular,hf_generate]")
    assert summary["num_users"] == 40 and summary["model"]["validity"] == 1.0
    for name in ("model", "popular", "hf_generate"):
        assert {"recall@10", "ndcg@10", "validity", "users_per_s"} <= set(summary[name])
    model_items = np.array(table.column("model").to_pylist())
    assert model_items.shape == (40, 10)
    assert ((model_items >= 0) & (model_items < 60)).all()  # every returned item is a catalogue item
    # Same model, same beam, full normalisation: HF generate ranks exactly as our decoder.
    assert table.column("model").to_pylist() == table.column("hf_generate").to_pylist()
    # Metrics recomputed from the saved predictions agree with the summary.
    targets = np.array(table.column("target").to_pylist())
    hits = (model_items == targets[:, None])[:, :10].any(1).mean()
    assert summary["model"]["recall@10"] == pytest.approx(hits)


def test_exclude_history(tmp_path):
    summary, table = run_eval(tmp_path, "eval.exclude_history=true", "eval.baseline=none")
    assert summary["model"]["validity"] == 1.0


@pytest.mark.slow
def test_sharded_eval_equals_single_process(tmp_path):
    _, single = run_eval(tmp_path / "one", "eval.baseline=none", "eval.batch_size=8")
    _, sharded = run_eval(tmp_path / "two", "eval.baseline=none", "eval.batch_size=8", "eval.num_workers=2")
    assert single.column("model").to_pylist() == sharded.column("model").to_pylist()
    assert single.column("model_scores").to_pylist() == sharded.column("model_scores").to_pylist()


@pytest.mark.shared_data
def test_eval_scientific_untrained_tiny_model_is_valid(tmp_path):
    path = shared_dataset("scientific")
    summary, table = run_eval(tmp_path, "data=letter", f"data.dir={path}", "data.name=Scientific", "sid=file",
                              "eval.max_users=64", "eval.baseline=popular", "sid.codebook_size=256")
    assert summary["num_users"] == 64 and summary["model"]["validity"] == 1.0
    assert summary["popular"]["validity"] == 1.0
