"""Thinking vs non-thinking evaluation (onerec_dist/reasoning/think_eval.py): the paired bootstrap on hand-made hit
vectors, both modes on the same users (each equal to a direct decode of its prefix), unclosed counting with a tiny
token cap, and an eval path that never reaches a teacher."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from onerec_dist.reasoning.think_eval import (
    ThinkEvalConfig,
    evaluate_thinking,
    generate_rationales,
    hits_at_k,
    paired_bootstrap,
    resolve_mode,
)

TINY = ["data.synthetic.num_users=40", "data.synthetic.num_items=40", "sid.codebook_size=4", "eval.beam_width=10",
        "eval.top_k=10", "eval.ks=[1,5,10]", "eval.ndcg_ks=[5,10]", "eval.batch_size=8", "eval.baseline=[]"]


# ------------------------------------------------------------------------------------------------ statistics


def test_hits_at_k_worked_example():
    items = np.array([[3, 1, 2], [5, 6, 7]])
    targets = np.array([2, 9])
    assert hits_at_k(items, targets, 2).tolist() == [0.0, 0.0]  # 2 is third in row 0; 9 is nowhere
    assert hits_at_k(items, targets, 3).tolist() == [1.0, 0.0]


def test_paired_bootstrap_worked_examples():
    # hits think [1,1,0,0,1], nothink [0,1,0,1,1] -> differences [1,0,0,-1,0], mean 0.
    a, b = np.array([1, 1, 0, 0, 1.0]), np.array([0, 1, 0, 1, 1.0])
    out = paired_bootstrap(a, b, num_resamples=1000, seed=7)
    assert out["mean"] == 0.0 and out["num_users"] == 5 and out["num_resamples"] == 1000
    # The same statistic written plainly: resample the 5 users with replacement, 1000 times, same generator.
    diff = a - b
    idx = np.random.default_rng(7).integers(0, 5, size=(1000, 5))
    assert out["ci95"] == pytest.approx(np.quantile(diff[idx].mean(1), [0.025, 0.975]).tolist())
    # Every user gains exactly 1: every resample's mean is 1, so the interval is [1, 1].
    assert paired_bootstrap(np.ones(4), np.zeros(4))["ci95"] == [1.0, 1.0]
    # Two users with differences [1, 0]: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4; of 1000
    # resamples ~250 are 0 and ~250 are 1 (far more than the 25 each tail quantile needs), so the 95% interval
    # is [0, 1], and the mean is 0.5.
    two = paired_bootstrap(np.array([1.0, 0.0]), np.zeros(2), seed=1)
    assert two["mean"] == 0.5 and two["ci95"] == [0.0, 1.0]
    # The same seed gives the same interval; the swap a <-> b mirrors it.
    swapped = paired_bootstrap(b, a, num_resamples=1000, seed=7)
    assert swapped["ci95"] == pytest.approx([-out["ci95"][1], -out["ci95"][0]])


def test_config_errors():
    with pytest.raises(ValueError, match="eval.reasoning.mode: 'deep' is not allowed"):
        ThinkEvalConfig(mode="deep")
    with pytest.raises(ValueError, match="eval.reasoning.max_think_tokens"):
        ThinkEvalConfig(max_think_tokens=0)


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A from-scratch tiny model with item tokens and <think> / </think> (untrained), saved with its IDs."""
    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.evaluation import eval_config
    from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
    from onerec_dist.reasoning.cot_format import add_think_tokens
    from onerec_dist.sid.model_ids import save_model_ids

    cfg = compose(TINY)
    data = load_dataset(data_config(cfg))
    examples = make_splits(data, data_config(cfg))["test"]
    codes, sizes, _ = semantic_ids_for_run(cfg, data, None)
    model, tokenizer, item_tok = build_recommender(model_config(cfg), data, sizes, codes, seed=0)
    plain_vocab = tokenizer.get_vocab()
    think = add_think_tokens(model, tokenizer, seed=0)
    model.eval()
    model_dir = tmp_path_factory.mktemp("think_model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_model_ids(model_dir, codes, data.catalogue.item_ids, sizes, item_tok)
    return dict(cfg=cfg, data=data, examples=examples, codes=codes, model=model, tokenizer=tokenizer,
                item_tok=item_tok, think=think, eval_cfg=eval_config(cfg), model_dir=model_dir,
                plain_vocab=plain_vocab)


def force_think_end(model, end_id: int, bias: float):
    """Give the output layer a bias: +big makes </think> the first greedy token of every row, -big never."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight  # the same (tied) matrix
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[end_id] = bias
    model.set_output_embeddings(biased)
    return head


def run_both(tiny, cap: int, tmp_path, mode="both"):
    from dataclasses import replace

    from onerec_dist.evaluation import build_prompts, length_batches

    eval_cfg = replace(tiny["eval_cfg"], reasoning=ThinkEvalConfig(mode=mode, max_think_tokens=cap))
    prompts = build_prompts(tiny["tokenizer"], tiny["examples"], tiny["codes"])
    batches = length_batches(prompts, eval_cfg.batch_size)
    report_args = dict(num_items=len(tiny["data"].catalogue), ks=eval_cfg.ks, ndcg_ks=eval_cfg.ndcg_ks)
    report, predictions = evaluate_thinking(eval_cfg, mode, tiny["model"], tiny["tokenizer"], tiny["item_tok"],
                                            tiny["codes"], tiny["data"].catalogue, tiny["examples"], batches,
                                            report_args, tmp_path)
    return eval_cfg, report, predictions


def direct(tiny, eval_cfg, cap: int):
    """Both modes written out user by user: prompt -> rationale (cap) -> close_think -> decode / score."""
    from onerec_dist.evaluation import build_decoder
    from onerec_dist.reasoning.cot_format import close_think, inference_prompt

    tok, think, codes = tiny["tokenizer"], tiny["think"], tiny["codes"]
    decoder = build_decoder(tiny["model"], tiny["item_tok"], codes, eval_cfg, tok.pad_token_id or 0)
    prompts = [inference_prompt(tok, think, codes, h) for h in tiny["examples"].histories]
    bodies, closed = [], []
    for p in prompts:  # one user at a time: no padding at all
        body, ok = generate_rationales(tiny["model"], think, [p], cap, tok.pad_token_id)
        bodies.append(body[0])
        closed.append(bool(ok[0]))
    with_think = [close_think(think, p, b) for p, b in zip(prompts, bodies)]
    empty = [close_think(think, p, None) for p in prompts]
    target = torch.as_tensor(np.asarray(tiny["examples"].targets))[:, None]
    return dict(items_think=decoder.decode(with_think).items.numpy(), items_nothink=decoder.decode(empty).items.numpy(),
                ll_think=decoder.score_items(with_think, items=target).scores[:, 0].numpy(),
                ll_nothink=decoder.score_items(empty, items=target).scores[:, 0].numpy(),
                closed=np.array(closed), bodies=bodies)


def test_think_and_nothink_on_the_same_users(tiny, tmp_path):
    cap = 6
    eval_cfg, report, predictions = run_both(tiny, cap, tmp_path)
    expected = direct(tiny, eval_cfg, cap)
    num_users = len(tiny["examples"])
    assert predictions["think"].shape == predictions["nothink"].shape == (num_users, 10)
    # Row u of both modes is user u: each equals the direct, unbatched decode of that user's prefix.
    np.testing.assert_array_equal(predictions["nothink"], expected["items_nothink"])
    np.testing.assert_array_equal(predictions["think"], expected["items_think"])
    assert report["think"]["validity"] == report["nothink"]["validity"] == 1.0
    assert report["delta_ll"] == pytest.approx(float(np.mean(expected["ll_think"] - expected["ll_nothink"])),
                                               abs=1e-4)
    assert report["unclosed_share"] == pytest.approx(1.0 - expected["closed"].mean())
    targets = np.asarray(tiny["examples"].targets)
    paired = report["paired"]["delta_recall@10"]
    assert paired["mean"] == pytest.approx(report["think"]["recall@10"] - report["nothink"]["recall@10"])
    assert paired["mean"] == pytest.approx(float(np.mean(hits_at_k(expected["items_think"], targets, 10)
                                                         - hits_at_k(expected["items_nothink"], targets, 10))))
    assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]


def test_unclosed_rationales_are_force_closed_and_counted(tiny, tmp_path):
    end_id = tiny["think"].end_id
    head = force_think_end(tiny["model"], end_id, -1e4)  # </think> never wins: every rationale hits the cap
    try:
        eval_cfg, report, predictions = run_both(tiny, 2, tmp_path)
        expected = direct(tiny, eval_cfg, 2)
    finally:
        tiny["model"].set_output_embeddings(head)
    assert report["unclosed_share"] == 1.0 and report["think"]["mean_think_tokens"] == 2.0
    assert all(len(b) == 2 and end_id not in b for b in expected["bodies"])
    # Force-closed: the 2 generated tokens + </think> + separator, then the same beam search.
    np.testing.assert_array_equal(predictions["think"], expected["items_think"])
    assert report["think"]["validity"] == 1.0


def test_an_immediately_closed_rationale_is_the_nothink_answer(tiny, tmp_path):
    head = force_think_end(tiny["model"], tiny["think"].end_id, 1e4)  # </think> is always the first token
    try:
        _, report, predictions = run_both(tiny, 4, tmp_path)
    finally:
        tiny["model"].set_output_embeddings(head)
    # Empty body -> close_think gives the empty block: both modes decode identical prefixes.
    assert report["unclosed_share"] == 0.0 and report["think"]["mean_think_tokens"] == 0.0
    np.testing.assert_array_equal(predictions["think"], predictions["nothink"])
    assert report["delta_ll"] == 0.0
    assert report["paired"]["delta_recall@10"]["mean"] == 0.0
    assert report["paired"]["delta_recall@10"]["ci95"] == [0.0, 0.0]


def test_think_mode_needs_think_tokens(tiny):
    class Plain:  # a tokenizer without <think> / </think>
        def get_vocab(self):
            return tiny["plain_vocab"]

    assert resolve_mode("auto", Plain()) == "none" and resolve_mode("auto", tiny["tokenizer"]) == "both"
    with pytest.raises(ValueError, match="needs a model with <think>"):
        resolve_mode("think", Plain())


def test_eval_cli_never_imports_a_teacher(tiny, tmp_path):
    code = (
        "import sys\n"
        "from onerec_dist.cli import main\n"
        f"rc = main(['eval', 'output_dir={tmp_path}', 'model.name_or_path={tiny['model_dir']}', "
        f"'eval.max_users=8', 'eval.reasoning.mode=both', 'eval.reasoning.max_think_tokens=3', "
        + ", ".join(repr(o) for o in TINY) + "])\n"
        "assert rc == 0, rc\n"
        "print('TEACHERS', sorted(m for m in sys.modules if m.startswith('onerec_dist.reasoning.teachers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TEACHERS []" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_users"] == 8 and summary["reasoning_mode"] == "both"
    for mode in ("think", "nothink"):
        assert {"recall@10", "ndcg@10", "validity"} <= set(summary[mode]) and summary[mode]["validity"] == 1.0
    assert set(summary["paired"]["delta_recall@10"]) >= {"mean", "ci95"}
