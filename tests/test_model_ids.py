"""A model carries its item IDs (onerec_dist/sid/model_ids.py): the model's table wins, explicit settings are checked
against it, and a run that trained a model evaluates it with the same IDs."""

import json

import numpy as np
import pytest

from onerec_dist.cli import compose, main, mark_explicit_sid
from onerec_dist.data.config import DataConfig, SyntheticConfig
from onerec_dist.data.synthetic import generate_synthetic
from onerec_dist.sid.config import SidConfig
from onerec_dist.sid.model_ids import (ITEM_TOKENS_FILE, TABLE_FILE, check_item_token_layout, copy_model_ids,
                                       load_model_ids, save_model_ids)
from onerec_dist.sid.table import save_table

DATA = generate_synthetic(SyntheticConfig(num_users=10, num_items=12, num_top_categories=2, subcategories_per_top=2))
DATA_CFG = DataConfig(format="synthetic", name="synthetic")
SIZES = [4, 3]


def codes_of(seed: int) -> np.ndarray:
    """A collision-free [12, 2] assignment: the 12 IDs of a 4 x 3 grid, permuted by ``seed``."""
    grid = np.array([[a, b] for a in range(4) for b in range(3)])
    return grid[np.random.default_rng(seed).permutation(12)]


def model_dir_with(tmp_path, codes, item_ids=None):
    model = tmp_path / "model"
    save_table(model / TABLE_FILE, codes, item_ids or DATA.catalogue.item_ids, SIZES)
    return model


def file_cfg(path) -> SidConfig:
    return SidConfig(source="file", index_path=str(path), codebook_size=2, num_levels=2)


def test_model_table_wins_when_nothing_is_given(tmp_path):
    # Table rows written in reverse catalogue order: the loader must put them back in catalogue order.
    codes = codes_of(0)
    model = model_dir_with(tmp_path, codes[::-1], DATA.catalogue.item_ids[::-1])
    # The sid config says kmeans 4 x 256: ignored, nothing was given explicitly (and no embedding runs).
    loaded, sizes, source = load_model_ids(model, DATA, DATA_CFG, SidConfig(), explicit=[])
    assert np.array_equal(loaded, codes) and sizes == SIZES
    assert str(model / TABLE_FILE) in source


def test_explicit_index_that_disagrees_names_both_sources(tmp_path):
    model = model_dir_with(tmp_path, codes_of(0))
    other = save_table(tmp_path / "other.json", codes_of(1), DATA.catalogue.item_ids, SIZES)
    with pytest.raises(ValueError) as err:
        load_model_ids(model, DATA, DATA_CFG, file_cfg(other), explicit=["index_path"])
    message = str(err.value)
    assert str(model / TABLE_FILE) in message and str(other) in message and "sid.index_path=" in message
    # codes_of(0) and codes_of(1) are two permutations of the same 12 IDs; count the rows that differ.
    expected = int((codes_of(0) != codes_of(1)).any(axis=1).sum())
    assert f"{expected} of 12 items have other codes" in message


def test_explicit_index_that_agrees_is_accepted(tmp_path):
    model = model_dir_with(tmp_path, codes_of(0))
    same = save_table(tmp_path / "same.json", codes_of(0), DATA.catalogue.item_ids, SIZES)
    loaded, _, source = load_model_ids(model, DATA, DATA_CFG, file_cfg(same), explicit=["index_path", "source"])
    assert np.array_equal(loaded, codes_of(0)) and "model's own table" in source


def test_other_codebook_sizes_are_an_error(tmp_path):
    model = model_dir_with(tmp_path, codes_of(0))
    wider = save_table(tmp_path / "wide.json", codes_of(0), DATA.catalogue.item_ids, [5, 3])
    with pytest.raises(ValueError, match=r"codebook sizes \[4, 3\], but .*wide.json.* gives \[5, 3\]"):
        load_model_ids(model, DATA, DATA_CFG, file_cfg(wider), explicit=["index_path"])


def test_table_without_a_catalogue_item_is_an_error(tmp_path):
    model = model_dir_with(tmp_path, codes_of(0)[:11], DATA.catalogue.item_ids[:11])
    with pytest.raises(ValueError, match=r"no semantic ID for 1 of the 12 catalogue items \(e.g. \['11'\]\)"):
        load_model_ids(model, DATA, DATA_CFG, SidConfig(), explicit=[])


def test_no_model_takes_the_configured_ids(tmp_path):
    index = save_table(tmp_path / "ids.json", codes_of(2), DATA.catalogue.item_ids, SIZES)
    loaded, sizes, source = load_model_ids(None, DATA, DATA_CFG, file_cfg(index))
    assert np.array_equal(loaded, codes_of(2)) and sizes == SIZES and str(index) in source


def item_model(tmp_path):
    """A tokenizer with item tokens for SIZES, saved as a model directory would save it."""
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    tokenizer = build_tokenizer_from_corpus(["a few words of item text"] * 4, 300)
    model = build_tiny_model(tokenizer, "tiny", True, "eager", seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(2, SIZES))
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    return path, item_tok


def test_item_token_model_without_table_is_an_error(tmp_path):
    path, _ = item_model(tmp_path)
    with pytest.raises(ValueError, match=r"has item tokens but no sid_table.json"):
        load_model_ids(str(path), DATA, DATA_CFG, SidConfig(), explicit=[])
    # IDs given explicitly: taken (the vocabulary's sizes are checked when the model is built).
    index = save_table(tmp_path / "ids.json", codes_of(3), DATA.catalogue.item_ids, SIZES)
    assert np.array_equal(load_model_ids(str(path), DATA, DATA_CFG, file_cfg(index), ["index_path"])[0], codes_of(3))


def test_save_copy_and_check_layout(tmp_path):
    path, item_tok = item_model(tmp_path)
    save_model_ids(path, codes_of(0), DATA.catalogue.item_ids, SIZES, item_tok)
    layout = json.loads((path / ITEM_TOKENS_FILE).read_text())
    # Item tokens are appended after the base vocabulary: begin, end, then level 0's 4 codes, then level 1's 3.
    assert layout["codebook_sizes"] == SIZES and layout["end_token_id"] == layout["begin_token_id"] + 1
    assert layout["level_first_token_id"] == [layout["begin_token_id"] + 2, layout["begin_token_id"] + 6]
    check_item_token_layout(path, item_tok)
    copy_model_ids(path, tmp_path / "export")
    assert load_model_ids(tmp_path / "export", DATA, DATA_CFG, SidConfig())[0].tolist() == codes_of(0).tolist()
    layout["level_first_token_id"][1] += 1
    (path / ITEM_TOKENS_FILE).write_text(json.dumps(layout))
    with pytest.raises(ValueError, match="item-token layout"):
        check_item_token_layout(path, item_tok)
    with pytest.raises(ValueError, match=r"codebook sizes \[4, 3\] cannot carry IDs with codebook sizes \[4, 4\]"):
        save_model_ids(path, codes_of(0), DATA.catalogue.item_ids, [4, 4], item_tok)


def test_cli_marks_explicit_sid_keys():
    def marked(*overrides):
        return list(mark_explicit_sid(compose(list(overrides)), list(overrides)).explicit_sid_keys)

    assert marked("seed=3") == []  # the global seed feeds sid.seed by interpolation, but was not set for sid
    assert marked("sid.seed=7") == ["seed"]
    assert marked("sid.seed=0") == ["seed"]  # named explicitly, even at its default value
    assert marked("sid=file") == ["source"]  # a preset: the keys whose value it changes
    # sid=industrial changes minibatch_above and balanced_iters (its levels and sizes are the synthetic experiment's).
    assert marked("sid=industrial", "sid.seed=1") == ["balanced_iters", "minibatch_above", "seed"]


# ---- end to end: a trained model is evaluated with its own IDs -------------------------------------------------------
SID = ["sid.codebook_size=4"]
TINY = ["data.synthetic.num_users=40", "data.synthetic.num_items=30", "trainer.num_workers=1",
        "trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.precision=fp32", "align.max_length=128",
        "align.warmup.max_steps=2", "eval.beam_width=5", "eval.top_k=5", "eval.ks=[1,5]", "eval.ndcg_ks=[5]",
        "eval.baseline=none", "eval.save_predictions=false"]


@pytest.fixture(scope="module")
def pipeline_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    assert main(["pipeline", f"output_dir={out}", "pipeline.stages=[sid,align_warmup,eval]", *TINY, *SID]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_pipeline_models_carry_their_ids_and_eval_reproduces(pipeline_run, tmp_path, capsys):
    out, summary = pipeline_run
    export = out / "align_warmup" / "warmup" / "export"
    for model in (export, out / "align_warmup" / "warmup" / "init_model"):
        assert (model / TABLE_FILE).read_text() == (out / "sid" / "sid_table.json").read_text()
        assert (model / ITEM_TOKENS_FILE).is_file()
    # Standalone eval of the export, no sid overrides (the config alone would give 3 x 16 codes, not the run's 3 x 4):
    # the model's IDs, the pipeline's numbers exactly.
    assert main(["eval", f"output_dir={tmp_path / 'same'}", f"model.name_or_path={export}", *TINY]) == 0
    again = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert again["model"]["recall@5"] == summary["eval"]["model"]["recall@5"]
    assert again["model"]["ndcg@5"] == summary["eval"]["model"]["ndcg@5"]
    assert str(export / TABLE_FILE) in again["semantic_ids"]
    # Another k-means seed gives other IDs (here even another shape: collision resolution adds a 4th level): the CLI
    # stops (exit 2) naming both sources, without a traceback.
    capsys.readouterr()
    assert main(["eval", f"output_dir={tmp_path / 'seed7'}", f"model.name_or_path={export}", "sid.seed=7", *TINY,
                 *SID]) == 2
    err = capsys.readouterr().err
    assert "error: semantic IDs disagree: the model's own table " + str(export / TABLE_FILE) in err
    assert "k-means over item text (sid.source=kmeans, sid.seed=7" in err
    assert "Traceback" not in err
