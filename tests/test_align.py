"""`onerec align`: warm-up moves only the item-token rows, multitask starts from it, LoRA exports a merged model.

Engine-level equivalences (ZeRO stages, micro-batching, resume, export logits) are in test_distributed_engine.py;
these tests run the real recipe end to end through the CLI on 2 gloo workers under one Ray session.
"""

import json
import os

import pytest
import torch

from onerec_dist.cli import main

pytestmark = pytest.mark.slow

TINY = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "sid.codebook_size=4",
        "trainer.micro_batch_size=4", "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.precision=fp32",
        "trainer.log_every=2", "align.max_length=256"]


def state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def aligned(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    # A relative output_dir, as users type it: Ray workers run in another working directory and must still find
    # the stage's files.
    common = [f"output_dir={out.name}", "trainer.num_workers=2", "deepspeed.zero_stage=2", *TINY]
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        assert main(["align", "stage=warmup", *common]) == 0
        warmup = json.loads((out / "summary.json").read_text())
        assert main(["align", "stage=multitask", *common, "trainer.lr=3e-3"]) == 0
        multitask = json.loads((out / "summary.json").read_text())
    finally:
        os.chdir(cwd)
    return out, warmup, multitask


def test_warmup_changes_only_item_rows(aligned):
    out, warmup, _ = aligned
    assert warmup["align_stage"] == "warmup" and warmup["loss_last"] < warmup["loss_first"]
    assert warmup["changed_outside_item_rows"] == {}
    before, after = state(out / "warmup" / "init_model"), state(out / "warmup" / "export")
    from transformers import AutoTokenizer

    from onerec_dist.sid.tokens import ItemTokenizer

    rows = ItemTokenizer.from_tokenizer(AutoTokenizer.from_pretrained(out / "warmup" / "export")).item_token_ids()
    embed = "model.embed_tokens.weight"
    for name, value in before.items():  # every parameter compared bit for bit
        if name in (embed, "lm_head.weight"):  # tied: the same matrix
            other = torch.ones(value.shape[0], dtype=torch.bool)
            other[rows] = False
            assert torch.equal(value[other], after[name][other]), name
            assert not torch.equal(value[rows], after[name][rows]), "the item rows did not train"
        else:
            assert torch.equal(value, after[name]), name


def test_multitask_starts_from_warmup_and_learns(aligned):
    out, warmup, multitask = aligned
    assert multitask["align_stage"] == "multitask" and multitask["loss_last"] < multitask["loss_first"]
    # Stage 2's starting weights are stage 1's export.
    start, warm = state(out / "multitask" / "init_model"), state(warmup["export_dir"])
    assert all(torch.equal(start[k], warm[k]) for k in warm)
    assert set(multitask["data"]["tasks"]) == {"persona_grounding", "sequential_preference", "itemic_captioning",
                                               "general_text"}
    for key in ("loss_first", "loss_last", "steps", "tokens", "seconds", "checkpoint_dir", "export_dir"):
        assert key in multitask
    # The export is a plain transformers model that onerec eval decodes with 100 % validity.
    assert main(["eval", f"output_dir={out / 'eval'}", f"model.name_or_path={multitask['export_dir']}", *TINY,
                 "eval.beam_width=10", "eval.top_k=10", "eval.ks=[1,5,10]", "eval.ndcg_ks=[5,10]"]) == 0
    assert json.loads((out / "eval" / "summary.json").read_text())["model"]["validity"] == 1.0
    # Every model directory carries the same item IDs: both stages' initial models and exports.
    tables = {(out / stage / model / "sid_table.json").read_text() for stage in ("warmup", "multitask")
              for model in ("init_model", "export")}
    assert len(tables) == 1 and (out / "multitask" / "export" / "item_tokens.json").is_file()


def test_lora_multitask_exports_merged_model(aligned, tmp_path):
    out, warmup, _ = aligned
    assert main(["align", "stage=multitask", f"output_dir={tmp_path}", f"model.name_or_path={warmup['export_dir']}",
                 "align.multitask.trainable=lora", "align.multitask.lora.r=4", "trainer.num_workers=1",
                 "deepspeed.zero_stage=2", *TINY, "trainer.lr=1e-2", "trainer.micro_batch_size=16",
                 # One task only, so per-step losses are comparable and the fall is not batch noise.
                 "align.multitask.ratios.persona_grounding=0", "align.multitask.ratios.itemic_captioning=0",
                 "align.multitask.ratios.general_text=0"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trainable"] == "lora" and summary["loss_last"] < summary["loss_first"]
    merged, start = state(summary["export_dir"]), state(warmup["export_dir"])
    assert not any("lora" in k for k in merged)  # merged: loads without peft
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])  # the adapters were merged in
    assert torch.equal(merged["model.norm.weight"], start["model.norm.weight"])  # no adapter there


def test_align_bad_input(tmp_path, capsys):
    assert main(["align", "stage=multitask", f"output_dir={tmp_path}", *TINY]) == 2
    assert "starts from stage 1's output" in capsys.readouterr().err
    assert main(["align", "stage=multitask", f"output_dir={tmp_path}", "model.name_or_path=x",
                 "align.multitask.trainable=lora", "deepspeed.zero_stage=3", *TINY]) == 2
    assert "contradicts deepspeed.zero_stage=3" in capsys.readouterr().err
