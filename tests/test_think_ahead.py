"""Think-Ahead cache build, lookup, fingerprint refusal and fallback counting on a tiny model (no Ray).

The world: 24 catalogue items with 3-level IDs over codebooks [3, 4, 5], a tiny Qwen3 with item and think tokens,
saved as a model directory that carries its IDs (sid_table.json + item_tokens.json), loaded back like serving does.
"""

import itertools
import shutil

import numpy as np
import pytest
import torch

from onerec_dist.decoding.constraints import AllowedPrefixes
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus, load_pretrained
from onerec_dist.reasoning.cot_format import ThinkTokens, add_think_tokens, close_think, inference_prompt
from onerec_dist.serving.config import ServingConfig
from onerec_dist.serving.think_ahead import (Fingerprints, ThinkAheadService, build_shards, load_cache,
                                             prefix_decoder, prepare_cache_dir, shard_path, shard_ranges)
from onerec_dist.sid.model_ids import save_model_ids
from onerec_dist.sid.tokens import ItemTokenizer, ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary

SIZES = [3, 4, 5]
NUM_ITEMS = 24


def make_model_dir(path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [60, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:NUM_ITEMS]].numpy()  # [24, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, seed=seed).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=seed)
    add_think_tokens(model, tokenizer, seed=seed)
    with torch.no_grad():  # spread the code logits (the init gives nearly uniform ones) so rankings differ
        rows = item_tok.item_token_ids()
        emb = model.get_input_embeddings().weight
        emb[rows] += torch.randn(len(rows), emb.shape[1], generator=gen) * 0.5
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_model_ids(path, codes, [f"i{i}" for i in range(NUM_ITEMS)], SIZES, item_tok)
    return codes




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ta_model")
    codes = make_model_dir(root)
    model, tokenizer = load_pretrained(str(root), "sdpa")
    model.eval()
    item_tok = ItemTokenizer.from_tokenizer(tokenizer)
    rng = np.random.default_rng(0)
    users = [f"u{u}" for u in range(7)]
    histories = [rng.integers(0, NUM_ITEMS, size=rng.integers(2, 6)).tolist() for _ in users]
    return root, codes, model, tokenizer, item_tok, users, histories


def settings(**kw):
    base = dict(num_rationales=3, prefix_levels=2, prefix_beam=4, max_think_tokens=6, shard_size=3,
                beam_width=NUM_ITEMS, max_k=NUM_ITEMS, recent_items=3, generate_batch_size=4)
    return ServingConfig(**{**base, **kw})


def build(world, cache_dir, cfg):
    root, codes, model, tokenizer, item_tok, users, histories = world
    fps = Fingerprints.of(root)
    todo = prepare_cache_dir(cache_dir, fps, cfg, users)
    build_shards(model, tokenizer, item_tok, codes, users, histories, cfg, cache_dir, todo, fps)
    return load_cache(cache_dir, fps)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """(cache dir, cache) of the default settings(), built once for the tests that only read it."""
    cache_dir = tmp_path_factory.mktemp("ta_cache")
    return cache_dir, build(world, cache_dir, settings())


def test_cache_is_the_union_of_the_rationales_prefixes(world, built):
    root, codes, model, tokenizer, item_tok, users, histories = world
    cfg, cache = settings(), built[1]
    assert len(cache) == len(users) and cache.prefix_levels == 2
    catalogue_prefixes = {tuple(c[:2]) for c in codes.tolist()}
    for user in users:
        prefixes = cache.get(user)
        # sorted, unique, catalogue prefixes; at least b (one rationale's beams) and at most T * b of them
        assert prefixes == [list(p) for p in sorted(set(map(tuple, prefixes)))]
        assert all(tuple(p) in catalogue_prefixes for p in prefixes)
        assert cfg.prefix_beam <= len(prefixes) <= cfg.num_rationales * cfg.prefix_beam
        assert len(cache.rationales[user]) == cfg.num_rationales


def test_greedy_single_rationale_equals_a_hand_built_partial_decode(world, tmp_path):
    """T = 1, greedy: the cache entry is exactly the b prefixes decode_prefixes finds after the rationale that
    HF generate writes (stopping at </think>), closed by hand."""
    root, codes, model, tokenizer, item_tok, users, histories = world
    cfg = settings(num_rationales=1, do_sample=False)
    cache = build(world, tmp_path / "g", cfg)
    think = ThinkTokens.from_tokenizer(tokenizer)
    decoder = prefix_decoder(model, item_tok, codes, cfg, tokenizer.pad_token_id)
    for user, history in zip(users[:3], histories[:3]):
        prompt = inference_prompt(tokenizer, think, codes, history)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=cfg.max_think_tokens, do_sample=False,
                             eos_token_id=think.end_id, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        body = out[:out.index(think.end_id)] if think.end_id in out else out
        expected = decoder.decode_prefixes([close_think(think, prompt, body)], 2).prefixes[0]  # [b, 2]
        assert cache.get(user) == sorted(expected.tolist())


def test_resume_skips_finished_shards_and_other_settings_are_refused(world, tmp_path):
    root, codes, model, tokenizer, item_tok, users, histories = world
    cfg, fps = settings(), Fingerprints.of(root)
    assert len(shard_ranges(len(users), cfg.shard_size)) == 3  # 7 users in shards of 3: 3 + 3 + 1
    todo = prepare_cache_dir(tmp_path, fps, cfg, users)
    assert todo == [0, 1, 2]
    build_shards(model, tokenizer, item_tok, codes, users, histories, cfg, tmp_path, [1], fps)
    stamp = shard_path(tmp_path, 1).stat().st_mtime_ns
    todo = prepare_cache_dir(tmp_path, fps, cfg, users)
    assert todo == [0, 2]
    build_shards(model, tokenizer, item_tok, codes, users, histories, cfg, tmp_path, todo, fps)
    assert shard_path(tmp_path, 1).stat().st_mtime_ns == stamp  # not rewritten
    assert prepare_cache_dir(tmp_path, fps, cfg, users) == []
    assert sorted(load_cache(tmp_path, fps).prefixes) == sorted(users)
    with pytest.raises(ValueError, match="other settings"):
        prepare_cache_dir(tmp_path, fps, settings(num_rationales=4), users)


def test_a_cache_of_another_model_or_id_table_is_refused(world, built, tmp_path):
    root, codes, model, tokenizer, item_tok, users, histories = world
    cache_dir = built[0]
    other = tmp_path / "other"
    shutil.copytree(root, other)
    table = (other / "sid_table.json").read_text()
    (other / "sid_table.json").write_text(table.replace('"i0"', '"i0x"'))  # another ID table
    with pytest.raises(ValueError, match="another ID table"):
        load_cache(cache_dir, Fingerprints.of(other))
    retrained = tmp_path / "retrained"
    shutil.copytree(root, retrained)
    m, _ = load_pretrained(str(retrained), "sdpa")
    with torch.no_grad():
        m.get_input_embeddings().weight[0] += 1.0
    m.save_pretrained(retrained)
    with pytest.raises(ValueError, match="another model"):
        load_cache(cache_dir, Fingerprints.of(retrained))


def test_online_completion_is_the_exact_ranking_restricted_to_the_cache_and_fallbacks_are_counted(world, built):
    """Beam width = number of items prunes nothing, so an unrestricted decode ranks the whole catalogue exactly;
    a cached user's answer must be that ranking filtered to items below its cached prefixes (same order, same
    scores), a user without an entry gets the unrestricted ranking (fallback) and is counted."""
    root, codes, model, tokenizer, item_tok, users, histories = world
    cfg = settings()
    cache = load_cache(built[0], Fingerprints.of(root))
    del cache.prefixes["u1"]  # a user without a cache entry
    service = ThinkAheadService(model, tokenizer, item_tok, codes, cache, cfg)
    batch_users = ["u0", "u1", "u2", "unknown"]
    batch_hist = [histories[0], histories[1], histories[2], [3, 4]]
    answers = service.recommend(batch_users, batch_hist, k=NUM_ITEMS)
    assert [a.path for a in answers] == ["cached", "fallback", "cached", "fallback"]
    assert service.counts == {"cached": 2, "fallback": 2}
    free = service.decoder.decode([service.prompt(u, h) for u, h in zip(batch_users, batch_hist)])
    for row, (user, answer) in enumerate(zip(batch_users, answers)):
        full_items, full_scores = free.items[row].tolist(), free.scores[row].tolist()
        allowed = cache.get(user)
        if allowed is None:
            assert answer.items == full_items
            continue
        keep = [j for j, item in enumerate(full_items) if list(codes[item][:2]) in allowed]
        assert answer.items == [full_items[j] for j in keep]
        np.testing.assert_allclose(answer.scores, [full_scores[j] for j in keep], rtol=1e-5, atol=1e-5)
    assert len(answers[0].items) < NUM_ITEMS or len(cache.get("u0")) == 12


def test_the_short_prompt_keeps_the_latest_items_and_optionally_the_rationale(world, built):
    root, codes, model, tokenizer, item_tok, users, histories = world
    cfg, cache = settings(recent_items=2), built[1]
    think = ThinkTokens.from_tokenizer(tokenizer)
    plain = ThinkAheadService(model, tokenizer, item_tok, codes, cache, cfg)
    history = [5, 6, 7, 8]
    assert plain.prompt("u0", history) == close_think(think, inference_prompt(tokenizer, think, codes, [7, 8]), None)
    with_text = ThinkAheadService(model, tokenizer, item_tok, codes, cache, settings(recent_items=2,
                                                                                     use_rationale=True))
    text = cache.best_rationale("u0")
    body = think.body_ids(tokenizer, text) if text else None
    assert with_text.prompt("u0", history) == close_think(
        think, inference_prompt(tokenizer, think, codes, [7, 8]), body)


def test_allowed_prefix_rows_match_from_lists(built):
    cache = built[1]
    rows = AllowedPrefixes.from_lists([cache.get("u0"), None])
    assert rows.unrestricted.tolist() == [False, True] and rows.counts().tolist() == [len(cache.get("u0")), 0]


def test_greedy_rationale_preset_is_the_recall_keeping_setting():
    # serving=greedy_rationale: one greedy rationale, its text in the online prompt, the whole history (the setting
    # of benchmarks/results/think_ahead_cpu_greedy_rationale.json); every other field stays the default's.
    import dataclasses

    from onerec_dist.cli import compose
    from onerec_dist.serving.config import serving_config

    preset, default = serving_config(compose(["serving=greedy_rationale"])), serving_config(compose([]))
    changed = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
               if getattr(preset, f.name) != getattr(default, f.name)}
    assert changed == {"num_rationales": 1, "do_sample": False, "use_rationale": True, "recent_items": 100000}


def test_serving_config_errors_name_the_field_and_allowed_values():
    with pytest.raises(ValueError, match="serving.max_k: must be <= serving.beam_width=20"):
        ServingConfig(max_k=30)
    with pytest.raises(ValueError, match="serving.num_rationales: must be >= 1"):
        ServingConfig(num_rationales=0)
    from onerec_dist.serving.config import SERVE_ACTIONS, resolve_action

    with pytest.raises(ValueError, match="action: 'restart' is not allowed; allowed values: start, stop"):
        resolve_action({"action": "restart"}, SERVE_ACTIONS)
    assert resolve_action({"action": None}, SERVE_ACTIONS) == "start"


SMALL = ["data.synthetic.num_users=40", "data.synthetic.num_items=60", "sid.codebook_size=8"]


def test_think_ahead_stage_builds_then_skips_finished_shards(tmp_path):
    """`onerec think_ahead action=build` on the synthetic data with a model that carries its IDs: 5 users in
    shards of 2 -> 3 shards built; the same command again builds none."""
    import json

    from onerec_dist.cli import compose, main
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset
    from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run

    cfg = compose(SMALL)
    data = load_dataset(data_config(cfg))
    codes, sizes, _ = semantic_ids_for_run(cfg, data, None)
    model, tokenizer, item_tok = build_recommender(model_config(cfg), data, sizes, codes)
    add_think_tokens(model, tokenizer)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_model_ids(model_dir, codes, data.catalogue.item_ids, sizes, item_tok)
    args = ["think_ahead", "action=build", f"model.name_or_path={model_dir}", f"output_dir={tmp_path / 'out'}",
            "serving.max_users=5", "serving.shard_size=2", "serving.num_rationales=2", "serving.prefix_beam=3",
            "serving.max_think_tokens=3", *SMALL]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (first["shards_built"], first["shards_skipped"], first["num_users"]) == (3, 0, 5)
    assert 3 <= first["prefixes_per_user"]["mean"] <= 6  # b <= |union| <= T * b
    assert main(args) == 0
    second = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (second["shards_built"], second["shards_skipped"]) == (0, 3)
    assert main([*args[:1], "action=start", *args[2:]]) == 2  # not an action of think_ahead


def test_recommend_request_parsing_gives_4xx_with_a_message():
    from onerec_dist.serving.api import RequestError, parse_recommend

    index = {"a": 0, "b": 1}.get
    ok = parse_recommend(b'{"user": "u", "history": ["b", "a"], "k": 3}', index, max_k=5)
    assert (ok.user, ok.history, ok.k) == ("u", [1, 0], 3)
    assert parse_recommend(b'{"user": 7, "history": ["a"]}', index, max_k=5).k == 5  # default min(10, max_k)
    cases = [(b"{oops", 400, "malformed JSON"), (b"[1]", 400, "JSON object"),
             (b'{"user": "u", "history": []}', 400, "non-empty list"),
             (b'{"user": "u", "history": ["a", "zz"]}', 422, "unknown item ids"),
             (b'{"user": "u", "history": ["a"], "k": 6}', 400, r"\[1, 5\]"),
             (b'{"user": "u", "history": ["a"], "k": true}', 400, "integer"),
             (b'{"history": ["a"]}', 400, "user"), (b'{"user": "u", "history": ["a"], "x": 1}', 400, "unknown fields")]
    for body, status, message in cases:
        with pytest.raises(RequestError, match=message) as err:
            parse_recommend(body, index, max_k=5)
        assert err.value.status == status
