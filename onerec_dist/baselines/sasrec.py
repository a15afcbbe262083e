"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): a causal Transformer over the
item-ID sequence whose output at position t scores every catalogue item as the item at t + 1. The eval baseline
``eval.baseline=sasrec`` and the ablation harness's anchor row, on the project's leave-one-out split
(onerec_dist.data.splits), full-catalogue ranking and metrics (onerec_dist.metrics).

Why not RecBole (the well-kept implementation the issues suggest): recbole 1.2.1 (latest, 2025-02) declares
``ray>=1.13,<=2.6.3`` and ``colorlog==4.7.2``; installing it would downgrade the project's pinned ray 2.60 (our
engine's Ray Train API does not exist in 2.6). Its code also uses ``np.long`` (removed in numpy 2:
recbole/model/layers.py) and loads checkpoints with ``torch.load`` without ``weights_only=False`` (fails on torch
>= 2.6 for its pickled config). Checked with ``pip install --dry-run recbole`` on torch 2.13 CPU / numpy 2.4.
So this is a compact re-implementation (~250 lines) of the paper's model:

- item embedding E [N + 1, d] (row 0 = padding) + learned positions P [n, d], dropout (Sec. III-A/B);
- ``num_blocks`` pre-LayerNorm blocks: causal multi-head self-attention, point-wise two-layer FFN, residuals,
  dropout (Sec. III-B/C; the official code normalises the input of each sub-layer, as here); a final LayerNorm;
- score of item i at position t: <F_t, E_i> with the shared item embedding (Sec. III-D, "shared item embedding").

Settings: the paper's sparse-Amazon (Beauty) setting — d = 50 (we use 64), 2 blocks, 1 head, max length 50, dropout
0.5, Adam lr 1e-3, batch 128 (Sec. IV-B). Loss: ``loss=ce`` (default) is the full softmax cross-entropy over the
catalogue at every position, the now-common choice that is clearly stronger than the paper's binary cross-entropy
with one sampled negative (``loss=bce``, kept for reproduction; Klenitskiy & Vasilev, "Turning Dross Into Gold Loss:
is BERT4Rec really better than SASRec?", RecSys 2023). Training sequence of a user: the training interactions
s_0 .. s_{n-3} (validation and test targets never enter); inputs s_0..s_{m-1}, targets s_1..s_m, the last
``max_len`` positions. Model selection: validation Recall@10 after every ``eval_every_epochs`` epochs on the
validation users (all, or a fixed seeded sample of ``valid_users``), early stopping after ``patience`` evaluations
without improvement; the best epoch's weights are kept. The test split is never looked at while training.

Data with several domains (onerec_dist/data/domains.py): a user is ranked against its own domain's items only (the
scores of the other domains' items are set to -inf before top-K; -1 past a domain's item count), at test time and at
validation, as the model's constrained decoding and the popularity baseline do. Single-domain data: unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from onerec_dist.baselines.config import SASRecConfig
from onerec_dist.metrics import ndcg_at_k, recall_at_k


class SASRec(nn.Module):
    """Item indices are shifted by one inside the model: 0 is padding, catalogue item i is token i + 1."""

    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        self.num_items, self.max_len = num_items, cfg.max_len
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.num_blocks))
        self.attns = nn.ModuleList(nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
                                   for _ in range(cfg.num_blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.num_blocks))
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d),
                                                nn.Dropout(cfg.dropout)) for _ in range(cfg.num_blocks))
        self.last_norm = nn.LayerNorm(d, eps=1e-8)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, n] left-padded model tokens (0 = pad) -> hidden states F [B, n, d]."""
        batch, n = seq.shape
        positions = torch.arange(n, device=seq.device)
        h = self.item_emb(seq) * self.item_emb.embedding_dim ** 0.5 + self.pos_emb(positions)[None]  # [B, n, d]
        h = self.dropout(h)
        real = seq != 0  # [B, n]
        h = h * real[..., None]
        # Query t may attend to key s <= t that is a real item; a pad query attends to itself only (so no row is
        # fully masked; pad outputs are never read). True = blocked, as nn.MultiheadAttention expects.
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()  # [n, n]
        allowed = causal[None] & real[:, None, :]  # [B, n, n]
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=seq.device)[None]
        blocked = (~allowed).repeat_interleave(self.attns[0].num_heads, dim=0)  # [B * heads, n, n]
        for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = attn_norm(h)
            h = h + attn(q, q, q, attn_mask=blocked, need_weights=False)[0]
            h = h + ffn(ffn_norm(h))
            h = h * real[..., None]
        return self.last_norm(h)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> scores of the catalogue items [..., N] (the pad row is left out)."""
        return hidden @ self.item_emb.weight[1:].T


def left_pad(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """Last ``max_len`` items of each history as model tokens (index + 1), left-padded with 0: [B, max_len]."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = history[-max_len:]
        if tail:
            out[row, max_len - len(tail):] = torch.as_tensor(tail, dtype=torch.long) + 1
    return out


def training_pairs(sequences: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per training sequence s_0..s_m: inputs s_0..s_{m-1} and targets s_1..s_m, last ``max_len`` positions,
    left-padded: ([S, max_len], [S, max_len]) model tokens; sequences of one item are skipped (no target)."""
    usable = [s for s in sequences if len(s) >= 2]
    return left_pad([s[:-1] for s in usable], max_len), left_pad([s[1:] for s in usable], max_len)


def sequence_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, loss: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean loss over the real positions of a batch. ce: softmax cross-entropy over all N items. bce: the paper's
    -log sigma(<F_t, E_pos>) - log(1 - sigma(<F_t, E_neg>)) with one negative drawn uniformly from the catalogue."""
    hidden = model(inputs)  # [B, n, d]
    real = targets != 0  # [B, n]
    hidden, positives = hidden[real], targets[real] - 1  # [P, d], [P]
    if loss == "ce":
        return nn.functional.cross_entropy(model.item_scores(hidden), positives)
    negatives = torch.randint(0, model.num_items, positives.shape, generator=generator, device=positives.device)
    item_rows = model.item_emb.weight[1:]
    pos_logit = (hidden * item_rows[positives]).sum(-1)
    neg_logit = (hidden * item_rows[negatives]).sum(-1)
    return -(nn.functional.logsigmoid(pos_logit) + nn.functional.logsigmoid(-neg_logit)).mean()


@torch.no_grad()
def recommend(model: SASRec, histories: list[list[int]], top_k: int, exclude_history: bool = False,
              batch_size: int = 1024, item_domains: np.ndarray | None = None,
              user_domains: np.ndarray | None = None) -> np.ndarray:
    """Top-K catalogue items (indices, best first) for each history, ranking all N items: [U, K] int64.
    With ``item_domains`` [N] and ``user_domains`` [U] (data with several domains): only the items of each user's
    domain are ranked (the others' scores -inf; -1 past the domain's item count)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_domain = item_domains is not None and user_domains is not None
    if by_domain:
        item_domains = torch.as_tensor(np.asarray(item_domains), dtype=torch.long, device=device)  # [N]
        user_domains = torch.as_tensor(np.asarray(user_domains), dtype=torch.long, device=device)  # [U]
    out = np.empty((len(histories), min(top_k, model.num_items)), dtype=np.int64)
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        seq = left_pad(chunk, model.max_len).to(device)
        scores = model.item_scores(model(seq)[:, -1])  # [b, N]: the last position predicts the next item
        if exclude_history:
            for row, history in enumerate(chunk):
                if history:
                    scores[row, torch.as_tensor(history, device=device)] = -torch.inf
        if by_domain:
            other = item_domains[None, :] != user_domains[start:start + len(chunk), None]  # [b, N]
            scores = scores.masked_fill(other, -torch.inf)
        best = scores.topk(out.shape[1], dim=-1)
        ranked = best.indices.masked_fill(best.values == -torch.inf, -1) if by_domain else best.indices  # [b, K]
        out[start:start + len(chunk)] = ranked.cpu().numpy()
    model.train(was_training)
    return out


@dataclass
class SASRecRun:
    model: SASRec
    best_epoch: int
    best_valid_recall10: float
    curve: list[dict] = field(default_factory=list)  # per evaluation: epoch, seconds, train loss, valid R@10/N@10
    seconds: float = 0.0
    stopped: str = ""


def _valid_sample(histories: list[list[int]], targets: list[int], domains: np.ndarray | None, limit: int | None,
                  seed: int):
    if limit is None or limit >= len(targets):
        return histories, np.asarray(targets), domains
    pick = np.sort(np.random.default_rng(seed).choice(len(targets), size=limit, replace=False))
    return [histories[i] for i in pick], np.asarray(targets)[pick], None if domains is None else domains[pick]


def train_sasrec(sequences: list[list[int]], num_items: int, valid_histories: list[list[int]],
                 valid_targets: list[int], cfg: SASRecConfig, log=print, item_domains: np.ndarray | None = None,
                 valid_domains: np.ndarray | None = None) -> SASRecRun:
    """Train on ``sequences`` (each user's training interactions, oldest first), select the epoch by validation
    Recall@10 with early stopping (module docstring). Returns the best model (eval mode) and the learning curve.
    ``item_domains`` [N] and ``valid_domains`` [V] (data with several domains): validation ranks each user's domain
    only, as the test does."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = SASRec(num_items, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    inputs, targets = training_pairs(sequences, cfg.max_len)  # [S, n] each
    v_domains = None if valid_domains is None else np.asarray(valid_domains)
    v_hist, v_targets, v_domains = _valid_sample(valid_histories, valid_targets, v_domains, cfg.valid_users, cfg.seed)
    run = SASRecRun(model, 0, -1.0)
    best_state, bad, start = None, 0, time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, batches = 0.0, 0
        for begin in range(0, len(order), cfg.batch_size):
            rows = order[begin:begin + cfg.batch_size]
            loss = sequence_loss(model, inputs[rows].to(device), targets[rows].to(device), cfg.loss, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds
        if epoch % cfg.eval_every_epochs and epoch != cfg.max_epochs and not out_of_time:
            continue
        ranked = recommend(model, v_hist, 10, item_domains=item_domains, user_domains=v_domains)
        point = {"epoch": epoch, "seconds": round(time.perf_counter() - start, 3),
                 "train_loss": total / max(batches, 1), "valid_recall@10": recall_at_k(ranked, v_targets, 10),
                 "valid_ndcg@10": ndcg_at_k(ranked, v_targets, 10)}
        run.curve.append(point)
        if log:
            log(f"sasrec epoch {epoch}: loss {point['train_loss']:.4f} valid R@10 {point['valid_recall@10']:.4f}")
        if point["valid_recall@10"] > run.best_valid_recall10:
            run.best_epoch, run.best_valid_recall10, bad = epoch, point["valid_recall@10"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if bad >= cfg.patience or out_of_time:
            run.stopped = "patience" if bad >= cfg.patience else "max_seconds"
            break
    run.stopped = run.stopped or "max_epochs"
    model.load_state_dict(best_state)
    run.model, run.seconds = model.eval(), round(time.perf_counter() - start, 3)
    return run


def training_sequences(data, splits: dict, leave_one_out: bool) -> list[list[int]]:
    """Each user's training interactions, oldest first: s_0 .. s_{n-3} under leave-one-out (the held-out validation
    and test items never enter); with a dataset's own split, the user's longest training example (history + target)."""
    if leave_one_out:
        return [list(seq[:-2]) for seq in data.sequences.values()]
    train = splits.get("train")
    if train is None:
        raise ValueError(f"dataset {data.name!r} has no train split: SASRec has nothing to train on")
    longest: dict[str, list[int]] = {}
    for user, history, target in zip(train.users, train.histories, train.targets):
        if len(history) + 1 >= len(longest.get(user, [])):
            longest[user] = list(history) + [target]
    return list(longest.values())


def sasrec_baseline(data, splits: dict, examples, cfg: SASRecConfig, top_k: int,
                    exclude_history: bool = False, log=print) -> tuple[np.ndarray, dict]:
    """Train SASRec on the training interactions, select on the validation split, rank ``examples``' users over the
    whole catalogue (data with several domains: over the user's domain's items): (items [U, K], info: best epoch,
    validation R@10, learning curve, seconds). Shared by ``onerec eval`` and the ablation harness."""
    from onerec_dist.data.domains import user_domain_indices

    valid = splits.get("valid")
    if valid is None:
        raise ValueError(f"dataset {data.name!r} has no valid split: SASRec's early stopping needs one")
    sequences = training_sequences(data, splits, data.given_splits is None)
    test_domains = user_domain_indices(data, examples.users)  # [U]; None: single domain
    item_domains = None if test_domains is None else np.asarray(data.item_domains)  # [N]
    run = train_sasrec(sequences, len(data.catalogue), valid.histories, valid.targets, cfg, log=log,
                       item_domains=item_domains, valid_domains=user_domain_indices(data, valid.users))
    clock = time.perf_counter()
    items = recommend(run.model, examples.histories, top_k, exclude_history, item_domains=item_domains,
                      user_domains=test_domains)
    info = {"best_epoch": run.best_epoch, "valid_recall@10": run.best_valid_recall10, "stopped": run.stopped,
            "train_seconds": run.seconds, "users_per_s": len(examples) / max(time.perf_counter() - clock, 1e-9),
            "curve": run.curve, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return items, info
