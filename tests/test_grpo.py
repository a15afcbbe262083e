"""GRPO recipe (onerec_dist/recipes/grpo.py) and its worker loop (onerec_dist/distributed/rl_worker.py).

The world: a tiny Qwen3 with 3-level item tokens (codebooks 3 x 4 x 5) over 20 catalogue items and <think> /
</think>; users have 3-item histories. Single-process tests run the loop's ``grpo_step`` with ``LocalStrategy`` (the
strategy's interface on one process, plain torch AdamW); one test runs the whole loop on 2 gloo workers under Ray
with DeepSpeed ZeRO-2 through ``run_on_workers``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from onerec_dist.decoding.beam_search import ConstrainedDecoder
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.reasoning.cot_format import add_think_tokens, close_think, new_token_rows
from onerec_dist.recipes import grpo
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenizer, ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary
from onerec_dist.training.config import LoraSettings

SIZES = [3, 4, 5]
NUM_ITEMS = 20
SEED = 5


def build_world(think_tokens: bool = True, tie: bool = True):
    """(model, tokenizer, item_tokenizer, think, codes [20, 3] numpy, users PromptSet of 12 users)."""
    gen = torch.Generator().manual_seed(SEED)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [60, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:NUM_ITEMS]].numpy()  # [20, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair, then"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tie, seed=SEED)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=SEED)
    think = add_think_tokens(model, tokenizer, seed=SEED) if think_tokens else None
    rng = np.random.default_rng(SEED)
    histories = [rng.choice(NUM_ITEMS, 3, replace=False).tolist() for _ in range(12)]
    targets = rng.integers(0, NUM_ITEMS, 12)
    users = grpo.PromptSet(*(_prompts(tokenizer, think, codes, histories, targets) if think else ([], targets,
                                                                                                  codes[targets], [])))
    return model, tokenizer, item_tok, think, codes, users


SFT_STEPS = 120
RATIONALE_TOKENS = 6  # one-token rationales the trained world knows: token t_j leads to item ITEM_OF[j]


def trained_world():
    """``build_world`` after a short SFT in which the rationale decides the item: for every user and j < 6,
    prompt + t_j + </think> + separator + <|item_begin|> + ID of item j, loss on everything after <think>. A random
    tiny model decodes the same item whatever the rationale (its last positions dominate), so GRPO would get no
    reward spread; after this SFT pi(t_j | prompt) ~ 1/6 and t_j decodes item j. Also returns the t_j."""
    from onerec_dist.prompts import end_of_turn_ids

    model, tokenizer, item_tok, think, codes, users = build_world(tie=False)
    vocab = tokenizer.get_vocab()
    rationale_ids = sorted(i for t, i in vocab.items() if t.isalpha() and len(t) > 2)[:RATIONALE_TOKENS]
    rows = []
    for prompt in users.prompts[:4]:
        for j, token in enumerate(rationale_ids):
            answer = close_think(think, [], [token]) + item_tok.encode_with_boundaries(
                torch.as_tensor(codes[j])).tolist() + end_of_turn_ids(tokenizer)
            rows.append((list(prompt), answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.tensor([p + a + [0] * (width - len(p) - len(a)) for p, a in rows])            # [72, W]
    labels = torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(p) + len(a) for p, a in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(SEED)
    model.train()
    for _ in range(SFT_STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (model, tokenizer, item_tok, think, codes, users), rationale_ids


@pytest.fixture(scope="module")
def world_state():
    """The trained world's weights (trained once per module; each test gets a fresh copy)."""
    world, rationale_ids = trained_world()
    return world, rationale_ids


@pytest.fixture
def world(world_state):
    (model, *rest), rationale_ids = world_state
    return (copy.deepcopy(model), *rest)


def _prompts(tokenizer, think, codes, histories, targets):
    from onerec_dist.reasoning.cot_format import inference_prompt

    prompts = [inference_prompt(tokenizer, think, codes, h) for h in histories]
    return prompts, np.asarray(targets), codes[targets], histories


class LocalStrategy:
    """DeepSpeedStrategy's interface on one process: identity collectives, plain AdamW. ``prepare_reference(None)``
    is the strategy's own LoRA reference (the actor with its adapters disabled); a model is used as it is."""

    rank, world_size, is_rank0 = 0, 1, True
    device = torch.device("cpu")
    trainer = SimpleNamespace(precision="fp32", weight_decay=0.0)

    def __init__(self, model=None, lr: float = 1e-3):
        self.lr = lr
        if model is not None:
            self.prepare(model, [{"params": [p for p in model.parameters() if p.requires_grad]}])

    def prepare(self, model, param_groups):
        self.engine = model
        self.optimizer = torch.optim.AdamW(param_groups, lr=self.lr, weight_decay=0.0)
        return model

    def prepare_reference(self, model=None, dtype=None):
        from onerec_dist.distributed.strategy import ReferencePolicy

        if model is None:
            return ReferencePolicy(self.engine, "disabled_adapters", torch.float32)
        return model.eval().requires_grad_(False)

    def all_reduce(self, values):
        return values.detach().double().clone()

    @contextlib.contextmanager
    def gathered_parameters(self, model=None):
        module = model or self.engine
        was = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def run_steps(world, cfg: grpo.RLConfig, steps: int, frozen=(), hook=None, strategy_cls=None):
    """``steps`` GRPO steps of the loop's grpo_step (on ``strategy_cls``, default LocalStrategy); returns
    (strategy, reference, per-step rank stats)."""
    from onerec_dist.distributed.rl_worker import grpo_step

    model, tokenizer, item_tok, think, codes, users = world
    for name, param in model.named_parameters():
        param.requires_grad_(not any(name.startswith(f) for f in frozen))
    if hook is not None:
        hook()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    strategy = (strategy_cls or LocalStrategy)(model, cfg.lr)
    decoder = ConstrainedDecoder(model, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), cfg.beam_width,
                                 cfg.beam_width)
    sampler = grpo.PromptSampler(len(users), cfg.prompts_per_rank, 0, 1, cfg.seed)
    config = {"rl": cfg, "train": users}
    history = []
    model.train()
    for step in range(steps):
        stats, seconds = grpo_step(strategy, model, reference, config, think, tokenizer.pad_token_id, decoder,
                                   sampler, step)
        history.append((stats, seconds))
    return strategy, reference, history


# ---------------------------------------------------------------------------------------------- one step
def test_one_step_changes_only_trainable_params_and_is_finite(world):
    model = world[0]
    cfg = grpo.RLConfig(group_size=8, beam_width=1, prompts_per_rank=3, max_think_tokens=1, lr=1e-2, max_steps=1,
                        reward="rollout_beam")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy, reference, history = run_steps(world, cfg, 1, frozen=("model.embed_tokens",))
    stats, seconds = history[0]
    # the guard: a step whose groups all had equal rewards has advantage 0 everywhere and must not move anything
    assert stats["zero_spread_groups"] < stats["groups"], "fixture gives no reward spread: the test could not fail"
    row = grpo.step_row(stats, 1)
    assert all(math.isfinite(row[k]) for k in ("reward", "kl", "pg_loss", "entropy", "clip_frac"))
    # step 1: actor == reference, so every k3 term exp(0) - 0 - 1 = 0; on-policy ratio 1 never clips
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["clip_frac"] == 0.0
    assert 0.0 <= row["reward"] <= 1.0 and 0 < row["rationale_length"] <= cfg.max_think_tokens
    assert row["loss_tokens"] == stats["tokens"] > 0
    assert set(seconds) == {"rollout", "reward", "reference", "update", "sync"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and not any(n.startswith("model.embed_tokens") for n in changed)   # frozen stays bit-identical
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())    # the reference never moves


LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def test_lora_steps_train_only_adapters_and_token_rows_against_the_base_model(world, tmp_path):
    """rl.trainable=lora through the worker's prepare_policy, the trained world saved as the starting model.

    peft starts every lora_B at 0 and the trainable token rows (``trainable_tokens_delta``) as copies of the base
    rows, so at step 1 the actor is the loaded model and each k3 KL term to the reference (the actor with adapters
    disabled) is exp(0) - 0 - 1 = 0. The first update moves lora_B (dL/dB = dL/dh (A x)^T != 0) and the token rows
    the batch uses, not lora_A: dL/dA = B^T dL/dh x^T = 0 while B = 0, and
    AdamW without weight decay does not move a parameter whose gradient is 0. Base weights never move. At step 2
    the actor is no longer the base, so KL > 0; it would stay exactly 0 if the reference followed the actor."""
    from onerec_dist.distributed.rl_worker import grpo_step, prepare_policy
    from onerec_dist.distributed.rollout_pool import ADAPTER_MARKERS

    model, tokenizer, item_tok, think, codes, users = world
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = grpo.RLConfig(group_size=8, beam_width=1, prompts_per_rank=3, max_think_tokens=1, lr=1e-2, max_steps=2,
                        trainable="lora", lora=LORA)
    config = {"rl": cfg, "model_dir": str(tmp_path / "model"), "train": users}
    strategy = LocalStrategy(lr=cfg.lr)
    engine, reference, tokenizer, think, item_tok = prepare_policy(strategy, config, NUM_ITEMS)
    assert reference.kind == "disabled_adapters" and reference.module is engine   # no second model
    probe = {"input_ids": torch.tensor([users.prompts[0]])}                                  # [1, P]
    with torch.no_grad():
        initial_logits = model.eval()(**probe).logits
    before = {n: p.detach().clone() for n, p in engine.named_parameters()}
    adapters = {n for n in before if any(marker in n for marker in ADAPTER_MARKERS)}
    assert adapters == {n for n, p in engine.named_parameters() if p.requires_grad}       # peft froze the rest
    lora_a, lora_b = ({n for n in adapters if f".{m}." in n} for m in ("lora_A", "lora_B"))
    deltas = {n for n in adapters if "trainable_tokens_delta" in n}
    # 2 layers x (q_proj, v_proj) each; one token delta (untied world: the input embedding only)
    assert len(lora_a) == len(lora_b) == 2 * model.config.num_hidden_layers and len(deltas) == 1

    decoder = ConstrainedDecoder(engine, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), 1, 1)
    sampler = grpo.PromptSampler(len(users), cfg.prompts_per_rank, 0, 1, cfg.seed)
    engine.train()
    stats = []
    for step in range(cfg.max_steps):
        stats.append(grpo_step(strategy, engine, reference, config, think, tokenizer.pad_token_id, decoder, sampler,
                               step)[0])
        if step == 0:
            after_one = {n: p.detach().clone() for n, p in engine.named_parameters()}
    assert stats[0]["zero_spread_groups"] < stats[0]["groups"], "no reward spread: the test could not fail"
    assert {n for n in before if not torch.equal(after_one[n], before[n])} == lora_b | deltas
    after = dict(engine.named_parameters())
    assert all(torch.equal(after[n].detach(), before[n]) for n in before if n not in adapters)   # base bit-identical
    assert not any(torch.equal(after[n].detach(), before[n]) for n in lora_a)   # step 2: B != 0, A trains too
    rows = [grpo.step_row(s, i + 1) for i, s in enumerate(stats)]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[1]["kl"] > 1e-6
    # the reference is still the starting model; the actor is not
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(**probe).logits, initial_logits, rtol=0, atol=1e-6)
        assert (engine(**probe).logits - initial_logits).abs().max() > 1e-3
    # merged (what the export writes): of the embedding, only item / think token rows moved, <think> among them
    merged = copy.deepcopy(engine).merge_and_unload()
    moved = (merged.get_input_embeddings().weight != model.get_input_embeddings().weight).any(dim=1)   # [V]
    assert think.begin_id in moved.nonzero().flatten().tolist()
    assert set(moved.nonzero().flatten().tolist()) <= set(new_token_rows(item_tok, think))
    torch.testing.assert_close(merged.get_output_embeddings().weight, model.get_output_embeddings().weight,
                               rtol=0, atol=0)   # untied head: no adapter, no token rows
    with pytest.raises(ValueError, match="reference_dir is only for rl.trainable=full"):
        prepare_policy(LocalStrategy(), {**config, "reference_dir": str(tmp_path / "model")}, NUM_ITEMS)


def test_trainable_settings_are_validated(tmp_path):
    from onerec_dist.cli import compose

    with pytest.raises(ValueError, match="rl.trainable: 'qlora' is not allowed; allowed values: full, lora"):
        grpo.RLConfig(trainable="qlora")
    with pytest.raises(ValueError, match="rl.trainable='qlora' is not allowed; allowed values: 'full', 'lora'"):
        grpo.rl_config({"trainable": "qlora"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) rank in rl.lora"):
        grpo.rl_config({"trainable": "lora", "lora": {"rank": 4}})
    documented = grpo.rl_config(OmegaConf.to_container(compose([]).rl, resolve=True))     # conf/rl/default.yaml
    assert documented.trainable == "full" and documented.lora == LoraSettings()
    lora = grpo.RLConfig(trainable="lora")
    grpo.check_engine(lora, zero_stage=2, precision="fp32")
    grpo.check_engine(grpo.RLConfig(reference_dtype="bf16"), zero_stage=3, precision="fp32")   # full: any of both
    with pytest.raises(ValueError, match="rl.trainable=lora contradicts deepspeed.zero_stage=3"):
        grpo.check_engine(lora, zero_stage=3, precision="fp32")
    with pytest.raises(ValueError, match="rl.reference_dtype='bf16' contradicts rl.trainable=lora.*allowed values: "
                                         "null, 'fp32'"):
        grpo.check_engine(grpo.RLConfig(trainable="lora", reference_dtype="bf16"), zero_stage=2, precision="fp32")
    with pytest.raises(ValueError, match="rl.trainable=lora contradicts deepspeed.zero_stage=3"):   # before any load
        grpo.run_rl(compose(["rl.trainable=lora", "deepspeed.zero_stage=3"]), tmp_path)


def test_policy_batch_masks_generated_tokens_only():
    world = build_world()
    think = world[3]
    rollout = grpo.Rollout(prompts=[[7, 8, think.begin_id], [7, think.begin_id]], bodies=[[20, 21], [22, 23, 24]],
                           closed=np.array([True, False]), target_codes=torch.zeros(2, 3, dtype=torch.long),
                           group_size=2)
    batch = grpo.policy_batch(think, rollout, torch.tensor([[0.5, -0.5]]), pad_token_id=0)
    # row 0: prompt (3) + body (2) + </think> it wrote; row 1: prompt (2) + body (3), force-closed: no </think> action
    assert batch["input_ids"].tolist() == [[7, 8, think.begin_id, 20, 21, think.end_id],
                                           [7, think.begin_id, 22, 23, 24, 0]]
    assert batch["action_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert batch["advantages"].tolist() == [0.5, -0.5]


def test_shuffle_rewards_is_a_permutation_that_breaks_the_pairing():
    rewards = torch.arange(12, dtype=torch.float32).view(3, 4) / 12
    shuffled = grpo.shuffle_rewards(rewards, seed=1)
    assert sorted(shuffled.flatten().tolist()) == sorted(rewards.flatten().tolist())
    assert not torch.equal(shuffled, rewards)


# ---------------------------------------------------------------------------------------------- learning signal
def item_masses(model, decoder, think, prompt) -> np.ndarray:
    """[items] E[r] of the hit reward of each item for one-token rationales t, exactly: sum_t pi(t | prompt) *
    h(t), h(t) = 1 when the greedy item (K = 1) after prompt + t + </think> is that item (every vocabulary token t
    is decoded in one batch; a t that is </think> itself is the closed empty rationale)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)  # [V]
        prefixes = [close_think(think, prompt, None if t == think.end_id else [t]) for t in range(len(probs))]
        items = decoder.decode(prefixes).items[:, 0]                                             # [V]
    model.train(was_training)
    return np.bincount(items.numpy(), weights=probs.numpy(), minlength=NUM_ITEMS)


def test_reward_favouring_one_item_rises(world):
    """One user, one-token rationales t, K = 1 and the hit reward of one item (of those some t lead to, the least
    likely one).

    Only the (untied) output-layer rows of non-item tokens train: the hidden states and the item-code rows stay
    fixed, so h(t) (the greedy item after t; the full-vocabulary lse is common to all codes of a row and never
    changes an argmax) is fixed exactly, and E[r] = sum_t pi(t | prompt) h(t) changes only through pi. GRPO's
    expected gradient sum_t pi(t) A(t) grad log pi(t) is the covariance of h and grad log pi, so each step moves pi
    towards the tokens with h(t) = 1 and E[r] rises. Measured exactly (every t decoded), not sampled."""
    from onerec_dist.training.engine_api import restrict_rows

    model, tokenizer, item_tok, think, codes, users = world
    one = users.take([0])
    decoder = ConstrainedDecoder(model, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), 1, 1)
    # the target: of the items that one-token rationales lead to with probability > 5 %, the least likely one
    masses = item_masses(model, decoder, think, one.prompts[0])
    target = min((m, i) for i, m in enumerate(masses) if m > 0.05)[1]
    one = grpo.PromptSet(one.prompts, np.array([target]), codes[[target]], one.histories)
    start = masses[target]
    with torch.no_grad():
        items_before = decoder.decode([close_think(think, one.prompts[0], [t])
                                       for t in range(model.get_output_embeddings().weight.shape[0])]).items
    cfg = grpo.RLConfig(group_size=16, beam_width=1, prompts_per_rank=1, max_think_tokens=1, lr=1e-2, kl_coef=0.0,
                        reward="hit", max_steps=6)
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight
    item_rows = set(item_tok.item_token_ids().tolist())
    frozen = [name for name, p in model.named_parameters() if p is not head]
    run_steps((model, tokenizer, item_tok, think, codes, one), cfg, cfg.max_steps, frozen=tuple(frozen),
              hook=lambda: restrict_rows(head, [r for r in range(head.shape[0]) if r not in item_rows]))
    items_after = decoder.decode([close_think(think, one.prompts[0], [t]) for t in range(head.shape[0])]).items
    end = item_masses(model, decoder, think, one.prompts[0])[target]
    assert 0.0 < start < 1.0
    assert torch.equal(items_after, items_before)       # h fixed, as the argument needs
    assert end > start + 0.05, (start, end)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model, tokenizer, item_tok, think, codes, users = build_world()
    cfg = grpo.RLConfig(group_size=2, beam_width=4)
    with pytest.raises(ValueError, match="rl.group_size"):
        grpo.RLConfig(group_size=1)
    with pytest.raises(ValueError, match="rl.beam_width=21 is larger than the catalogue"):
        grpo.check_policy(tokenizer, ItemTokenizer.from_tokenizer, NUM_ITEMS, grpo.RLConfig(beam_width=21))
    with pytest.raises(ValueError, match="rl.reward: 'nope' is not allowed; allowed values: rollout_beam, "):
        grpo.RLConfig(reward="nope")
    with pytest.raises(ValueError, match="rl.item_nll_coef"):
        grpo.RLConfig(item_nll_coef=-0.1)
    bare = build_world(think_tokens=False)
    with pytest.raises(ValueError, match="<think> / </think>"):
        grpo.check_policy(bare[1], ItemTokenizer.from_tokenizer, NUM_ITEMS, cfg)
    plain = build_tokenizer_from_corpus(["a b c"] * 4, vocab_size=300)
    add_think_tokens(build_tiny_model(plain, seed=0), plain)
    with pytest.raises(ValueError, match="item tokens"):
        grpo.check_policy(plain, ItemTokenizer.from_tokenizer, NUM_ITEMS, cfg)
    other = build_tiny_model(tokenizer, preset="small", seed=0)
    with pytest.raises(ValueError, match="reference policy does not match the actor"):
        grpo.check_reference(model, other)
    grpo.check_reference(model, copy.deepcopy(model))  # a copy matches
    with pytest.raises(ValueError, match="prompts_per_rank=4 x 2 workers needs at least 8"):
        grpo.PromptSampler(5, 4, 0, 2, 0)


def test_unclosed_rollouts_are_counted():
    world = build_world()
    cfg = grpo.RLConfig(group_size=2, beam_width=2, prompts_per_rank=2, max_think_tokens=2, lr=1e-3)
    _, _, history = run_steps(world, cfg, 1)
    stats = history[0][0]
    # a 2-token cap on a random model: (almost) no row writes </think>; the count is what step_row reports
    row = grpo.step_row(stats, 1)
    assert stats["unclosed"] >= 1 and row["unclosed_share"] == stats["unclosed"] / stats["samples"]
    assert row["rationale_length"] <= 2


def test_prompt_sampler_is_deterministic_and_disjoint_across_ranks():
    a0, a1 = grpo.PromptSampler(10, 2, 0, 2, 3), grpo.PromptSampler(10, 2, 1, 2, 3)
    rows0 = [a0.next_rows() for _ in range(2)]
    rows1 = [a1.next_rows() for _ in range(2)]
    assert not set(sum(rows0, [])) & set(sum(rows1, []))        # one epoch: ranks take disjoint users
    resumed = grpo.PromptSampler(10, 2, 0, 2, 3)
    resumed.load_state_dict({"position": 1})
    assert resumed.next_rows() == rows0[1]


def test_heldout_probe_scores_greedy_nothink_and_sampled(world):
    # The probe's three modes on the same users. At a temperature near 0, sampling picks the argmax token (the
    # greedy rationale), so the "sampled" figures must equal the greedy think-mode ones; "nothink" must equal a
    # decode after an empty think block; and the run's torch RNG stream is left as it was.
    model, tokenizer, item_tok, think, codes, users = world
    decoder = ConstrainedDecoder(model, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), 4, 4)
    pad = tokenizer.pad_token_id
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        sums = grpo.heldout_sums(model, decoder, think, users, "rollout_beam", 3, pad, k=4, probe_temperature=1e-4)
        plain = grpo.heldout_sums(model, decoder, think, users, "rollout_beam", 3, pad, k=4)
    assert torch.equal(torch.rand(3), expected_next)
    assert np.array_equal(sums.pop("user_hits"), plain["user_hits"]) and plain.pop("user_hits").sum() == plain["hits"]
    # a rank without held-out users (fewer users than ranks) still hands its [0] hits to the all-reduce
    assert grpo.heldout_sums(model, decoder, think, users.take([]), "rollout_beam", 3, pad)["user_hits"].shape == (0,)
    assert {k: sums[k] for k in plain} == plain                       # the probe adds keys, changes none
    assert (sums["sampled_hits"], sums["sampled_reward_sum"]) == (sums["hits"], sums["reward_sum"])
    no_rationale = users.take(range(len(users)))
    hits, reward = grpo._decode_sums(decoder, think, no_rationale, [[]] * len(users), "rollout_beam", 4)
    assert (sums["nothink_hits"], sums["nothink_reward_sum"]) == (float(hits.sum()), reward)


def test_heldout_keeps_hits_per_user_and_the_paired_change_worked_by_hand():
    # 4 users, hits before [1, 0, 1, 0] and after [1, 1, 1, 0]: users 0, 2, 3 unchanged, user 1 gained, so the
    # change is (0 + 1 + 0 + 0) / 4 = +0.25; a resample's mean is (number of user-1 draws) / 4, in {0, .25, .5, ..}, so
    # the interval's ends lie on that grid, low >= 0 (no user lost) and high <= 1.
    before = grpo.heldout_report({"users": 4.0, "hits": 2.0, "reward_sum": 2.0, "unclosed": 0.0},
                                 np.array([1.0, 0.0, 1.0, 0.0]))
    after = grpo.heldout_report({"users": 4.0, "hits": 3.0, "reward_sum": 3.0, "unclosed": 0.0},
                                np.array([1.0, 1.0, 1.0, 0.0]))
    assert before["user_hits"] == [1, 0, 1, 0] and before["recall@10"] == 0.5
    change = grpo.heldout_change({"before": before, "after": after})
    assert change["mean"] == 0.25 and change["num_users"] == 4
    low, high = change["ci95"]
    assert 0.0 <= low <= 0.25 <= high <= 1.0 and (low * 4).is_integer() and (high * 4).is_integer()
    line = grpo.heldout_line({"heldout": {"before": before, "after": after}, "heldout_change": change})
    assert line.startswith("held-out think Recall@10 0.5000 -> 0.7500 (4 users), change +0.2500 (95% paired")
    # no per-user hits (a report of an older run) or no "after": no change, and the line says what it has
    assert grpo.heldout_change({"before": grpo.heldout_report({"users": 4.0, "hits": 2.0, "reward_sum": 2.0,
                                                               "unclosed": 0.0}), "after": after}) is None
    assert grpo.heldout_line({"heldout": {}, "heldout_change": None}) == "no held-out users"


def test_heldout_report_and_probe_warning_worked_by_hand():
    # 4 users: greedy 2 hits and reward 2.0 in all; no rationale 1 hit, 2.4; sampled 0 hits, 1.2, 40 tokens.
    totals = {"users": 4.0, "hits": 2.0, "reward_sum": 2.0, "unclosed": 1.0, "nothink_hits": 1.0,
              "nothink_reward_sum": 2.4, "sampled_hits": 0.0, "sampled_reward_sum": 1.2, "sampled_tokens": 40.0}
    report = grpo.heldout_report(totals)
    assert report == {"users": 4, "recall@10": 0.5, "reward": 0.5, "unclosed_share": 0.25,
                      "nothink": {"recall@10": 0.25, "reward": pytest.approx(0.6)},
                      "sampled": {"recall@10": 0.0, "reward": pytest.approx(0.3), "rationale_length": 10.0}}
    # sampled 0.3 < no rationale 0.6: the warning names both numbers and the temperature
    assert "T=0.7" in grpo.probe_warning(report, 0.7) and "(0.300) than no rationale (0.600)" in \
        grpo.probe_warning(report, 0.7)
    report["sampled"]["reward"] = 0.6                                  # equal: no warning
    assert grpo.probe_warning(report, 0.7) is None
    assert grpo.probe_warning(grpo.heldout_report({k: totals[k] for k in ("users", "hits", "reward_sum",
                                                                          "unclosed")}), 0.7) is None


def test_policy_batch_appends_the_target_item_after_the_rationale():
    world = build_world()
    think, item_tok = world[3], world[2]
    rollout = grpo.Rollout(prompts=[[7, 8, think.begin_id], [7, think.begin_id]], bodies=[[20, 21], [22, 23, 24]],
                           closed=np.array([True, False]), target_codes=torch.tensor([[0, 1, 2], [2, 3, 4]]),
                           group_size=2)
    targets = grpo.target_item_ids(item_tok, rollout)                                      # [2, 1 + 3]
    # <|item_begin|> then code c of level l is token offset_l + c: the decoder's answer after the rationale
    assert targets.tolist() == [[item_tok.begin_id, *item_tok.encode(torch.tensor(c)).tolist()]
                                for c in ([0, 1, 2], [2, 3, 4])]
    batch = grpo.policy_batch(think, rollout, torch.tensor([[0.5, -0.5]]), pad_token_id=0, target_ids=targets)
    after = list(think.after_ids)
    # row 0 wrote </think> (an action); row 1 was force-closed, so its </think> is context like the separator
    row0 = [7, 8, think.begin_id, 20, 21, think.end_id] + after + targets[0].tolist()
    row1 = [7, think.begin_id, 22, 23, 24, think.end_id] + after + targets[1].tolist()
    width = max(len(row0), len(row1))
    assert batch["input_ids"].tolist() == [row0 + [0] * (width - len(row0)), row1 + [0] * (width - len(row1))]
    # the actions are the same as without the target; the next-item loss sits on the 3 code tokens only
    assert batch["action_mask"].tolist() == [[0, 0, 0, 1, 1, 1] + [0] * (width - 6),
                                             [0, 0, 1, 1, 1] + [0] * (width - 5)]
    assert batch["item_mask"].tolist() == [[0] * (len(row0) - 3) + [1, 1, 1] + [0] * (width - len(row0)),
                                           [0] * (len(row1) - 3) + [1, 1, 1] + [0] * (width - len(row1))]
    assert "item_mask" not in grpo.policy_batch(think, rollout, torch.zeros(1, 2), 0)


def test_item_nll_sum_is_the_cross_entropy_of_the_code_tokens():
    # 1 row of 4 tokens [5, 1, 2, 0], code tokens at positions 2 and 3 (item_mask), vocabulary 3:
    # position 1 predicts token 2 with logits [0, 0, ln 2] -> p = 2/4, -log p = ln 2;
    # position 2 predicts token 0 with logits [0, 0, 0] -> p = 1/3, -log p = ln 3. Position 0 (token 1) is no code.
    batch = {"input_ids": torch.tensor([[5, 1, 2, 0]]), "item_mask": torch.tensor([[0, 0, 1, 1]])}
    logits = torch.tensor([[[9.0, -9.0, 0.0], [0.0, 0.0, math.log(2)], [0.0, 0.0, 0.0]]])        # [1, T-1, 3]
    total, count = grpo.item_nll_sum(logits, batch)
    assert count == 2 and float(total) == pytest.approx(math.log(2) + math.log(3))


def test_item_nll_rows_best_keeps_each_groups_best_rewarded_rollouts():
    rewards = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.25, 0.0]])             # [B=3, G=3]
    # group 0: the two hits; group 1: best reward 0, nothing to teach; group 2: the 0.5 alone
    assert grpo.item_nll_row_mask(rewards, "best").tolist() == [False, True, True, False, False, False,
                                                                True, False, False]
    assert grpo.item_nll_row_mask(rewards, "all").all() and grpo.item_nll_row_mask(rewards, "all").numel() == 9
    with pytest.raises(ValueError, match="rl.item_nll_rows: 'hits' is not allowed; allowed values: all, best"):
        grpo.RLConfig(item_nll_rows="hits")


def test_item_nll_rows_best_puts_the_code_tokens_of_the_best_rollouts_only_in_the_step(world, monkeypatch):
    from onerec_dist.distributed import rl_worker

    seen = {}
    advantages = rl_worker.group_advantages
    monkeypatch.setattr(rl_worker, "group_advantages",
                        lambda rewards, mode: advantages(seen.setdefault("rewards", rewards), mode))
    policy_batch = grpo.policy_batch
    monkeypatch.setattr(grpo, "policy_batch", lambda *a, **k: seen.setdefault("batch", policy_batch(*a, **k)))
    cfg = grpo.RLConfig(group_size=4, beam_width=2, prompts_per_rank=3, max_think_tokens=1, lr=1e-2, max_steps=1,
                        reward="rollout_beam", item_nll_coef=1.0, item_nll_rows="best")
    stats = run_steps(world, cfg, 1)[2][0][0]
    chosen = grpo.item_nll_row_mask(seen["rewards"], "best")                                  # [12]
    assert 0 < int(chosen.sum()) < 12, "every rollout or none is a best one: the test could not fail"
    # L = 3 code tokens on each chosen row, none elsewhere; the step's item tokens count exactly those
    assert seen["batch"]["item_mask"].sum(dim=1).tolist() == (3 * chosen.long()).tolist()
    assert stats["item_tokens"] == 3 * int(chosen.sum())


def test_training_pool_is_a_seeded_sample_of_the_training_users():
    users = build_world()[5]                                                                  # 12 users
    pool = grpo.training_pool(users, 5, seed=3)
    rows = [users.prompts.index(p) for p in pool.prompts]
    # 5 distinct users in their original order, their targets carried along; the same seed draws the same ones
    assert len(set(rows)) == 5 and rows == sorted(rows) and pool.targets.tolist() == users.targets[rows].tolist()
    assert grpo.training_pool(users, 5, seed=3).prompts == pool.prompts
    assert grpo.training_pool(users, None, 0) is users and grpo.training_pool(users, 12, 0) is users
    with pytest.raises(ValueError, match="rl.train_users"):
        grpo.RLConfig(train_users=0)


def test_reasoning_experiment_runs_the_measured_grpo_recipe():
    from onerec_dist.cli import compose

    # README "What we measured": the paper's objective (no next-item loss) with the hit reward at T = 0.5, G = 8 and
    # KL 0.2, on a pool of training users that is exactly 10 steps' prompts with 2 workers (8 x 2 x 10 = 160), so
    # reward_first10 and reward_last10 are each one whole pass over the same users (40 steps = 4 passes)
    rl = grpo.rl_config(OmegaConf.to_container(compose(["experiment=reasoning"]).rl, resolve=True))
    assert (rl.reward, rl.temperature, rl.group_size, rl.kl_coef, rl.item_nll_coef) == ("hit", 0.5, 8, 0.2, 0.0)
    assert rl.train_users == rl.prompts_per_rank * 2 * 10 and rl.max_steps % 10 == 0
    default = grpo.rl_config(OmegaConf.to_container(compose([]).rl, resolve=True))
    assert (default.reward, default.temperature, default.item_nll_coef) == ("rollout_beam", 1.0, 0.0)


def test_item_nll_coef_adds_the_next_item_gradient(world, monkeypatch):
    """With every advantage 0 and the actor equal to its reference (step 1), the policy gradient and the k3 KL
    gradient (1 - exp(logp_ref - logp) = 0) vanish, so the update's gradient is exactly
    rl.item_nll_coef x d(mean NLL of the target code tokens after each sampled rationale), summed over micro-batches."""
    from onerec_dist.distributed import rl_worker

    monkeypatch.setattr(rl_worker, "group_advantages", lambda rewards, mode: torch.zeros_like(rewards))
    coef = 0.5
    cfg = grpo.RLConfig(group_size=2, beam_width=2, prompts_per_rank=3, max_think_tokens=2, lr=1e-2, max_steps=1,
                        item_nll_coef=coef, micro_batch_rollouts=4)   # 6 rollouts in micro-batches of 4 + 2
    model, tokenizer, item_tok, think, codes, users = world
    expected_model = copy.deepcopy(model)
    grads = {}

    class Recording(LocalStrategy):
        def step(self):  # no optimizer step: the gradient accumulates, so the last call holds the whole batch's
            grads.update({n: p.grad.clone() for n, p in self.engine.named_parameters() if p.grad is not None})

    captured = {}
    policy_batch = grpo.policy_batch
    monkeypatch.setattr(grpo, "policy_batch", lambda *a, **k: captured.setdefault("batch", policy_batch(*a, **k)))
    _, _, history = run_steps(world, cfg, 1, strategy_cls=Recording)
    stats = history[0][0]
    batch = captured["batch"]
    assert stats["item_tokens"] == 6 * 3 == int(batch["item_mask"].sum())                    # 6 rollouts x L = 3
    # the reference: coef x mean over the 18 code tokens of -log p, by a plain forward pass of the starting model
    logits = expected_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    nll, count = grpo.item_nll_sum(logits, batch)
    (coef * nll / count).backward()
    assert stats["item_nll_sum"] / stats["item_tokens"] == pytest.approx(float(nll.detach()) / count, rel=1e-5)
    for name, param in expected_model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads.values())


def test_summary_fields():
    history = [{"reward": r, "kl": 0.1 * i, "clip_frac": 0.0, "unclosed_share": 0.0, "loss_tokens": 100.0 + i}
               for i, r in enumerate(np.linspace(0, 1, 20))]
    out = grpo.summarise(history, {"before": {}, "after": {}}, {"rollout": 1.0})
    # first 10 of 0, 1/19, ..., 1: mean 4.5/19; last 10: mean 14.5/19
    assert out["reward_first10"] == pytest.approx(4.5 / 19) and out["reward_last10"] == pytest.approx(14.5 / 19)
    assert out["kl_max"] == pytest.approx(1.9)
    assert out["tokens"] == 20 * 100 + 190   # sum of 100 + i over i < 20: what the ablation table counts


# ---------------------------------------------------------------------------------------------- 2 workers, ZeRO-2
# One colocated run of the whole loop (rl_worker.rl_loop) on 2 gloo workers under Ray with DeepSpeed ZeRO-2, fp32 CPU,
# on the trained world (its rationales decide the item, so groups have reward spread and the weights move): 3 steps,
# held-out users before / after, a checkpoint after every step, the export. The tests below compare other runs (a
# resumed one, one with rollout actors) against it, so it runs once per module.
RUN_STEPS = 3


@pytest.fixture(scope="module")
def colocated_run(ray_local, world_state, tmp_path_factory):
    from onerec_dist.distributed.rl_worker import rl_loop
    from onerec_dist.distributed.worker_group import run_on_workers
    from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig

    (model, tokenizer, item_tok, think, codes, users), _ = world_state
    root = tmp_path_factory.mktemp("grpo_run")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rl = grpo.RLConfig(group_size=4, beam_width=2, prompts_per_rank=2, max_think_tokens=2, max_steps=RUN_STEPS,
                       lr=1e-2, heldout_users=4, checkpoint_every=1)
    config = {"rl": rl, "model_dir": str(root / "model"), "item_codes": codes, "train": users,
              "heldout": users.take(range(4)), "output_dir": str(root / "colocated")}
    trainer = TrainerConfig(num_workers=2, max_steps=RUN_STEPS, micro_batch_size=4, lr=1e-2, lr_schedule="constant",
                            precision="fp32", weight_decay=0.0, checkpoint_every=0, resume="never",
                            wandb={"mode": "disabled"})
    summary = run_on_workers(rl_loop, config, trainer, DeepSpeedConfig(zero_stage=2), root / "colocated")[0]
    return {"summary": summary, "config": config, "trainer": trainer, "root": root, "model": model, "codes": codes,
            "item_tok": item_tok, "think": think, "users": users, "pad": tokenizer.pad_token_id}


def _comparable(row):
    """A log row without wall-clock times and the actors' sync bytes."""
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "sync_bytes"}


@pytest.mark.slow
def test_two_worker_zero2_run_writes_the_summary(colocated_run):
    from onerec_dist.distributed.rl_worker import PHASES

    summary = colocated_run["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == RUN_STEPS
    assert len(summary["rewards"]) == RUN_STEPS and all(0.0 <= r <= 1.0 for r in summary["rewards"])
    assert math.isfinite(summary["kl_max"]) and summary["clip_frac_max"] == 0.0
    assert set(summary["heldout"]) == {"before", "after"} and summary["heldout"]["after"]["users"] == 4
    # the probe (rl.heldout_probe, on by default): no-rationale and sampled figures beside the greedy ones
    assert set(summary["heldout"]["before"]["nothink"]) == {"recall@10", "reward"}
    assert set(summary["heldout"]["before"]["sampled"]) == {"recall@10", "reward", "rationale_length"}
    # per-user hits in the held-out users' order although rank r scored users r, r + 2: the starting model's hits,
    # scored here on one process with the workers' held-out decoder (10 beams), must match "before" user by user
    from transformers import AutoModelForCausalLM

    codes, item_tok, think, users = (colocated_run[k] for k in ("codes", "item_tok", "think", "users"))
    model = AutoModelForCausalLM.from_pretrained(colocated_run["root"] / "model").eval()   # what the workers loaded
    decoder = ConstrainedDecoder(model, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), 10, 10, "full",
                                 pad_token_id=colocated_run["pad"])
    with torch.no_grad():
        single = grpo.heldout_sums(model, decoder, think, users.take(range(4)), "rollout_beam", 2, colocated_run["pad"])
    assert summary["heldout"]["before"]["user_hits"] == single["user_hits"].astype(int).tolist()
    assert sum(summary["heldout"]["after"]["user_hits"]) == 4 * summary["heldout"]["after"]["recall@10"]
    assert summary["heldout_change"]["num_users"] == 4
    assert set(summary["timing"]) == set(PHASES)
    assert Path(summary["checkpoint_dir"]).is_dir() and (Path(summary["export_dir"]) / "config.json").is_file()
    # step 1: actor == reference, so every k3 term is 0; the updates move the actor (lr 1e-2, reward spread)
    assert summary["log"][0]["kl"] == pytest.approx(0.0, abs=1e-9) and summary["log"][-1]["kl"] > 0


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_rewards_exactly(colocated_run):
    """Resumed from the step-1 checkpoint, steps 2-3 repeat the uninterrupted run exactly: the same sampled
    rationales (sampler position, per-step seeds) on the same weights and optimizer state (KL, entropy and the
    policy loss are functions of all of them), and the held-out result after training."""
    from onerec_dist.distributed.rl_worker import CHECKPOINTS_DIR, rl_loop
    from onerec_dist.distributed.worker_group import run_on_workers
    from onerec_dist.training.config import DeepSpeedConfig

    root, uninterrupted = colocated_run["root"], colocated_run["summary"]
    step1 = root / "colocated" / CHECKPOINTS_DIR / "checkpoint_step00000001"
    config = {**colocated_run["config"], "output_dir": str(root / "resumed"), "resume_dir": str(step1)}
    resumed = run_on_workers(rl_loop, config, colocated_run["trainer"], DeepSpeedConfig(zero_stage=2),
                             root / "resumed")[0]
    assert resumed["steps"] == RUN_STEPS and resumed["rewards"] == uninterrupted["rewards"]
    assert [_comparable(r) for r in resumed["log"]] == [_comparable(r) for r in uninterrupted["log"]]
    assert resumed["heldout"] == uninterrupted["heldout"]


@pytest.mark.slow
def test_rollout_actors_repeat_the_colocated_run_and_hold_the_trained_weights(colocated_run):
    """rl.rollout.backend=actors against the colocated run, same seed and weights: both ranks send their prompts to
    one rollout actor. Step 1 samples from the loaded model on both backends; steps 2-3 sample from the weights after
    1-2 updates, which the actor only has if the bucketed sync after each update was right, so every step's log row
    (reward, rationale length, KL, ...) must be identical. After the run the actor's weights equal the trained export
    exactly (version 3: one sync per update)."""
    from dataclasses import replace

    import ray
    from transformers import AutoModelForCausalLM

    from onerec_dist.distributed.rl_worker import rl_loop
    from onerec_dist.distributed.rollout_pool import rollout_actors
    from onerec_dist.distributed.worker_group import run_on_workers
    from onerec_dist.training.config import DeepSpeedConfig

    root, colocated, trainer = colocated_run["root"], colocated_run["summary"], colocated_run["trainer"]
    config = colocated_run["config"]
    # 0.25 MB buckets: the ~0.8 MB tiny model goes in several
    pooled = replace(config["rl"], checkpoint_every=0,
                     rollout=grpo.RolloutConfig(backend="actors", num_actors=1, sync_bucket_mb=0.25))
    with rollout_actors(pooled, trainer, config["model_dir"], colocated_run["codes"]) as actors:
        summary = run_on_workers(rl_loop, {**config, "rl": pooled, "rollout_actors": actors,
                                           "output_dir": str(root / "actors")},
                                 trainer, DeepSpeedConfig(zero_stage=2), root / "actors")[0]
        held = ray.get(actors[0].named_weights.remote())
        version = ray.get(actors[0].weight_version.remote())

    assert summary["rollout_backend"] == "actors" and colocated["rollout_backend"] == "colocated"
    assert summary["rewards"] == colocated["rewards"]
    assert [_comparable(r) for r in summary["log"]] == [_comparable(r) for r in colocated["log"]]
    trained = dict(AutoModelForCausalLM.from_pretrained(summary["export_dir"]).named_parameters())
    initial = dict(colocated_run["model"].named_parameters())
    assert version == RUN_STEPS and set(held) == set(trained)
    assert all(torch.equal(held[n], trained[n].detach()) for n in trained)
    moved = [n for n in trained if not torch.equal(trained[n].detach(), initial[n].detach())]
    assert moved, "training did not change the weights: the sync check could not fail"
    # every step sent every (trainable, fp32) parameter once: 4 bytes each
    total = 4 * sum(p.numel() for p in initial.values())
    assert [row["sync_bytes"] for row in summary["log"]] == [float(total)] * RUN_STEPS
    assert colocated["synced_bytes"] == 0


@pytest.mark.slow
def test_lora_run_on_rollout_actors_syncs_adapters_only_and_exports_the_merged_model(ray_local, world_state,
                                                                                      tmp_path_factory):
    """rl.trainable=lora on 2 ZeRO-2 workers with one rollout actor: the whole loop (prepare_policy, the disabled-
    adapter reference, the adapters-only sync, the merged export). Step 1's KL is 0 (fresh adapters are the
    identity), step 2's is not (the reference stays the base). Every sync sends exactly the adapter tensors (fp32: 4
    bytes per element); the actor then holds the trained adapters, and merging them into the starting model gives
    the export."""
    import ray
    from transformers import AutoModelForCausalLM

    from onerec_dist.distributed.rl_worker import rl_loop
    from onerec_dist.distributed.rollout_pool import rollout_actors, synced_names
    from onerec_dist.distributed.worker_group import run_on_workers
    from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig
    from onerec_dist.training.lora import wrap_lora

    (model, tokenizer, item_tok, think, codes, users), _ = world_state
    root = tmp_path_factory.mktemp("grpo_lora")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    steps = 2
    rl = grpo.RLConfig(group_size=4, beam_width=2, prompts_per_rank=2, max_think_tokens=2, max_steps=steps, lr=1e-2,
                       heldout_users=0, trainable="lora", lora=LORA,
                       rollout=grpo.RolloutConfig(backend="actors", num_actors=1, sync_bucket_mb=0.25))
    trainer = TrainerConfig(num_workers=2, max_steps=steps, micro_batch_size=4, lr=1e-2, lr_schedule="constant",
                            precision="fp32", weight_decay=0.0, checkpoint_every=0, resume="never",
                            wandb={"mode": "disabled"})
    config = {"rl": rl, "model_dir": str(root / "model"), "item_codes": codes, "train": users,
              "heldout": users.take([]), "output_dir": str(root / "run")}
    with rollout_actors(rl, trainer, config["model_dir"], codes) as actors:
        summary = run_on_workers(rl_loop, {**config, "rollout_actors": actors}, trainer,
                                 DeepSpeedConfig(zero_stage=2), root / "run")[0]
        held = ray.get(actors[0].named_weights.remote())
        version = ray.get(actors[0].weight_version.remote())

    local = wrap_lora(copy.deepcopy(model), LORA, new_token_rows(item_tok, think))   # the workers' layout
    adapters = synced_names(list(local.named_parameters()), adapters_only=True)
    assert summary["steps"] == steps and version == steps
    assert summary["log"][0]["kl"] == pytest.approx(0.0, abs=1e-7) and summary["log"][-1]["kl"] > 1e-6
    adapter_bytes = 4 * sum(p.numel() for n, p in local.named_parameters() if n in adapters)
    assert [row["sync_bytes"] for row in summary["log"]] == [float(adapter_bytes)] * steps
    assert adapter_bytes < 4 * sum(p.numel() for p in model.parameters()) / 10
    with torch.no_grad():
        params = dict(local.named_parameters())
        for name in adapters:
            params[name].copy_(held[name])
    expected = dict(local.merge_and_unload().named_parameters())
    exported = dict(AutoModelForCausalLM.from_pretrained(summary["export_dir"]).named_parameters())
    assert set(exported) == set(expected)
    for name, param in exported.items():
        torch.testing.assert_close(param.detach(), expected[name].detach(), rtol=0, atol=1e-6)
    initial = dict(model.named_parameters())
    assert not torch.equal(exported["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert torch.equal(exported["lm_head.weight"], initial["lm_head.weight"])   # untied head: never trained


def test_window_warning_says_when_the_reward_windows_see_different_users():
    # 80 users at 8 per step: an epoch is 10 steps, so steps 1-10 and 31-40 are whole passes over all 80 users
    assert grpo.window_warning(80, 4, 2, 40) is None
    # 40 users: an epoch of 5 steps; each window is 2 passes; the last window (steps 26-35) starts at epoch 5's start
    assert grpo.window_warning(40, 4, 2, 35) is None
    # ... but over 33 steps the last window (steps 24-33) starts mid-epoch (23 = 4 x 5 + 3)
    assert "first and last 10 steps of 33 see different users" in grpo.window_warning(40, 4, 2, 33)
    # 80 users at 16 per step (4 workers): an epoch of 5 steps, fine; 80 at 6 per step: 13 steps, 2 users sit out
    assert grpo.window_warning(80, 4, 4, 40) is None
    message = grpo.window_warning(80, 3, 2, 40)
    assert "an epoch of 13.3333 steps" in message and "rl.train_users to 6 x d with d dividing 10 (e.g. 60)" in message
    # 32 users at 8 per step: 4 steps per epoch, and 10 steps are not whole epochs
    assert grpo.window_warning(32, 4, 2, 40) is not None
    assert grpo.window_warning(80, 4, 2, 5) is None                   # shorter than a window: both are the whole run
