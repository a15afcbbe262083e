"""Build the recommender LLM of a run: a checkpoint (any HF causal LM name or path) or a from-scratch model, with
the item tokens of the run's semantic IDs in its vocabulary, and the IDs a run takes from the model it starts from.
Shared by `onerec align`, `onerec eval` and the stages after them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onerec_dist.config import from_section, require
from onerec_dist.data.types import InteractionData


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    preset: Literal["tiny", "small", "qwen3-0.6b"] = "tiny"
    tie_word_embeddings: bool = True
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    tokenizer_vocab_size: int = 2000
    embedding_init: Literal["mean", "semantic"] = "mean"
    embedding_init_noise: float = 0.02

    def __post_init__(self) -> None:
        require(self.tokenizer_vocab_size >= 300, "model.tokenizer_vocab_size", "must be >= 300")
        require(self.embedding_init_noise >= 0, "model.embedding_init_noise", "must be >= 0")


def model_config(cfg) -> ModelConfig:
    """The validated ``model`` section of a composed config."""
    return from_section(ModelConfig, cfg, "model")


def tokenizer_corpus(data: InteractionData) -> list[str]:
    """Text a from-scratch tokenizer is trained on: item text, personas, and the prompt templates' words (with the
    domain lines when the data has several domains)."""
    from onerec_dist.prompts import domain_line, next_item_question

    texts = [data.catalogue.text(i) for i in range(len(data.catalogue))]
    texts += list(data.personas.values())
    texts.append(next_item_question([]))
    if len(data.domain_names) > 1:
        texts += [domain_line(name) for name in data.domain_names]
    return [t for t in texts if t] or ["item"]


def build_recommender(model_cfg: ModelConfig, data: InteractionData, codebook_sizes: list[int],
                      item_codes: np.ndarray | None = None, seed: int = 0):
    """(model, tokenizer, item_tokenizer). A checkpoint that already has item tokens (an exported onerec model)
    must have the same codebook sizes; otherwise its vocabulary is extended here."""
    import torch

    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus, load_pretrained
    from onerec_dist.sid.model_ids import check_item_token_layout
    from onerec_dist.sid.tokens import ItemTokenizer, ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    spec = ItemTokenSpec(len(codebook_sizes), list(codebook_sizes))
    if model_cfg.name_or_path:
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[model_cfg.dtype]
        model, tokenizer = load_pretrained(model_cfg.name_or_path, model_cfg.attn_implementation, dtype)
        if any(t.startswith("<item_") for t in tokenizer.get_added_vocab()):
            item_tokenizer = ItemTokenizer.from_tokenizer(tokenizer)
            if item_tokenizer.codebook_sizes != spec.codebook_sizes:
                raise ValueError(f"model.name_or_path={model_cfg.name_or_path} has item tokens for codebook sizes "
                                 f"{item_tokenizer.codebook_sizes}, but the semantic IDs use {spec.codebook_sizes}")
            check_item_token_layout(model_cfg.name_or_path, item_tokenizer)
            return model, tokenizer, item_tokenizer
    else:
        tokenizer = build_tokenizer_from_corpus(tokenizer_corpus(data), model_cfg.tokenizer_vocab_size)
        from onerec_dist.models import resolve_attn_implementation

        attn = resolve_attn_implementation(model_cfg.attn_implementation)
        model = build_tiny_model(tokenizer, model_cfg.preset, model_cfg.tie_word_embeddings, attn, seed=seed)
    catalogue = data.catalogue
    item_tokenizer = extend_vocabulary(model, tokenizer, spec, init=model_cfg.embedding_init, catalogue=catalogue,
                                       semantic_ids=item_codes, noise_std=model_cfg.embedding_init_noise, seed=seed)
    return model, tokenizer, item_tokenizer


def semantic_ids_for_run(cfg, data: InteractionData, model_dir: str | None) -> tuple[np.ndarray, list[int], str]:
    """The item codes [N, L], codebook sizes and their source (in words) for a run that starts from ``model_dir``:
    the model's own table when it carries one, checked against the ``sid.*`` keys listed in ``explicit_sid_keys``;
    else the IDs ``sid.*`` gives (onerec_dist.sid.model_ids.load_model_ids)."""
    from onerec_dist.data.config import data_config
    from onerec_dist.sid.config import sid_config
    from onerec_dist.sid.model_ids import load_model_ids

    explicit = list(cfg.get("explicit_sid_keys") or [])
    return load_model_ids(model_dir, data, data_config(cfg), sid_config(cfg), explicit)
