"""`onerec reason stage=bootstrap|sft` end to end on a tiny model, and the thinking eval of its export (single
process == Ray-sharded). One 2-worker ZeRO-2 SFT run under one Ray session serves the SFT and sharded-eval tests.

The "aligned model" here is a from-scratch tiny model with item tokens saved with its IDs (what the multi-task
export is to the stages: a model directory that carries sid_table.json); training it first would only cost time.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch

from onerec_dist.cli import main

pytestmark = pytest.mark.slow

DATA = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "sid.codebook_size=4"]
ENGINE = ["trainer.num_workers=2", "deepspeed.zero_stage=2", "trainer.micro_batch_size=4", "trainer.max_steps=8",
          "trainer.precision=fp32", "trainer.log_every=2", "trainer.checkpoint_every=8", "trainer.lr=3e-3"]
EVAL = ["eval.beam_width=10", "eval.top_k=10", "eval.ks=[1,5,10]", "eval.ndcg_ks=[5,10]", "eval.batch_size=8",
        "eval.baseline=[]", "eval.max_users=16", "eval.reasoning.max_think_tokens=8"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset
    from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
    from onerec_dist.sid.model_ids import save_model_ids

    cfg = compose(DATA)
    data = load_dataset(data_config(cfg))
    codes, sizes, _ = semantic_ids_for_run(cfg, data, None)
    model, tokenizer, item_tok = build_recommender(model_config(cfg), data, sizes, codes, seed=0)
    out = tmp_path_factory.mktemp("aligned")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_model_ids(out, codes, data.catalogue.item_ids, sizes, item_tok)
    return out


@pytest.fixture(scope="module")
def bootstrapped(aligned, tmp_path_factory):
    out = tmp_path_factory.mktemp("reason")
    assert main(["reason", "stage=bootstrap", f"output_dir={out}", f"model.name_or_path={aligned}", *DATA]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_bootstrap_stage_summary(bootstrapped):
    out, summary = bootstrapped
    assert summary["reason_stage"] == "bootstrap" and summary["teacher"] == "metadata"
    # Every training window (max_examples: null) is checked once: kept + dropped = examples.
    assert summary["examples"] == summary["training_windows"] > 0
    assert summary["kept"] + summary["dropped_leak"] + summary["dropped_other"] == summary["examples"]
    assert summary["dropped_leak"] == 0 and summary["kept"] > 0 and summary["rationales_per_s"] > 0
    records = pq.read_table(out / "bootstrap" / "rationales.parquet").to_pylist()
    assert len(records) == summary["kept"] and summary["records"] == str(out / "bootstrap" / "rationales.parquet")
    assert all(r["teacher"] == "metadata" and len(r["pruned"]) <= 10 for r in records)


def test_pipeline_hands_the_rationales_and_the_export_on():
    from onerec_dist.stages import STAGES
    from onerec_dist.stages.pipeline import HANDOFFS

    assert {"reason", "reason_bootstrap", "reason_sft"} <= set(STAGES)
    # reason_sft still starts from the multi-task export: the bootstrap hands over the rationales only.
    assert HANDOFFS["reason_bootstrap"]({"records": "R"}) == {"reasoning.sft.rationales_path": "R"}
    assert HANDOFFS["reason_sft"]({"export_dir": "E"}) == {"model.name_or_path": "E"}


def test_sft_needs_a_model_and_rationales(tmp_path, aligned):
    from onerec_dist.recipes.reason_sft import run_sft
    from onerec_dist.cli import compose

    with pytest.raises(ValueError, match="starts from the aligned model: set model.name_or_path"):
        from onerec_dist.recipes.reason_sft import build_sft_model

        build_sft_model(compose(DATA), None, tmp_path, 0.02)
    with pytest.raises(ValueError, match="needs the bootstrap's rationales"):
        run_sft(compose([*DATA, f"model.name_or_path={aligned}"]), tmp_path / "sft")


@pytest.fixture(scope="module")
def trained(ray_local, bootstrapped, aligned):
    out, boot = bootstrapped
    assert main(["reason", "stage=sft", f"output_dir={out}", f"model.name_or_path={aligned}", *DATA, *ENGINE,
                 "reasoning.sft.nothink_ratio=0.5"]) == 0
    return out, boot, json.loads((out / "summary.json").read_text())


def test_sft_trains_think_rows_and_body(trained, aligned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onerec_dist.reasoning.cot_format import ThinkTokens

    out, boot, summary = trained
    assert summary["reason_stage"] == "sft" and summary["loss_last"] < summary["loss_first"]
    # Every kept rationale is one example; round(0.5 * kept) of them have an empty think block.
    assert summary["data"]["examples"] == boot["kept"]
    assert summary["data"]["nothink_examples"] == round(0.5 * boot["kept"])
    export, init = out / "sft" / "export", out / "sft" / "init_model"
    think = ThinkTokens.from_tokenizer(AutoTokenizer.from_pretrained(export))  # raises if the tokens are missing
    assert [think.begin_id, think.end_id] == summary["think_token_ids"]
    # The export carries the aligned model's IDs, unchanged.
    assert (export / "sid_table.json").read_bytes() == (aligned / "sid_table.json").read_bytes()
    before = AutoModelForCausalLM.from_pretrained(init).state_dict()
    after = AutoModelForCausalLM.from_pretrained(export).state_dict()
    rows = torch.tensor(summary["think_token_ids"])
    embed = "model.embed_tokens.weight"
    assert not torch.equal(before[embed][rows], after[embed][rows])  # the think-token rows trained
    body = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(before[body], after[body])  # full fine-tuning: the transformer body too
    # The starting point kept every older row of the aligned model (add_think_tokens only appends).
    aligned_embed = AutoModelForCausalLM.from_pretrained(aligned).state_dict()[embed]
    assert torch.equal(before[embed][: rows.min()], aligned_embed[: rows.min()])


def test_thinking_eval_of_the_export_sharded_equals_single(trained, tmp_path):
    out, _, summary = trained
    runs = {}
    for workers in (1, 2):
        run_dir = tmp_path / f"w{workers}"
        assert main(["eval", f"output_dir={run_dir}", f"model.name_or_path={summary['export_dir']}", *DATA, *EVAL,
                     f"eval.num_workers={workers}"]) == 0
        runs[workers] = json.loads((run_dir / "summary.json").read_text())
    single, sharded = runs[1], runs[2]
    assert single["reasoning_mode"] == "both"  # auto: the export has think tokens
    for mode in ("think", "nothink"):
        assert single[mode]["validity"] == 1.0
        for key in ("recall@10", "ndcg@10", "validity"):
            assert sharded[mode][key] == pytest.approx(single[mode][key])
    assert sharded["paired"] == single["paired"]  # per-user hits came back: the bootstrap ran on all 16 users
    assert single["paired"]["delta_recall@10"]["num_users"] == 16
    assert sharded["delta_ll"] == pytest.approx(single["delta_ll"], abs=1e-4)
    assert sharded["unclosed_share"] == single["unclosed_share"]
