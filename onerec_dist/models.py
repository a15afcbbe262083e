"""Model and tokenizer builders: offline tokenizers and tiny Qwen3 models for tests, pretrained checkpoints for runs.

  * ``build_tokenizer_from_corpus``: a byte-level BPE trained offline on a list of texts (the ``tokenizers``
    library), with pad/bos/eos/unk tokens and a ChatML chat template, so from-scratch runs and tests need no hub;
  * ``build_tiny_model``: a randomly initialised ``Qwen3ForCausalLM`` of a preset shape (torchtune-style builder);
  * ``load_pretrained``: any Hugging Face causal-LM checkpoint (hub name in the local cache, or a local directory),
    with the attention implementation chosen from what the machine has.

Everything works with HF_HUB_OFFLINE=1. flash_attn is looked up with importlib.util.find_spec and never imported.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|im_end|>"  # ends every chat turn, so generation stops at the end of the assistant's turn
UNK_TOKEN = "<|unk|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START_TOKEN]  # ids 0..4 in this order

# ChatML, the format of Qwen chat models: <|im_start|>role\ncontent<|im_end|>\n per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_BYTE_ALPHABET_SIZE = 256
VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (tensor-core friendly)

# Model shapes. head_dim = hidden_size // num_attention_heads except where the real model says otherwise.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, head_dim=16, max_position_embeddings=2048),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=768, head_dim=32, max_position_embeddings=4096),
    # The shape of Qwen/Qwen3-0.6B (its config.json), randomly initialised: for benchmarks without the weights.
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=3072, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
}
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def build_tokenizer_from_corpus(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (offline, deterministic) and wrap it as a HF fast tokenizer.

    Byte-level means every string is encodable and decodes back exactly. Special tokens take ids 0..4
    (pad, bos, eos = <|im_end|>, unk, <|im_start|>); no token is added automatically around encoded text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = list(texts)
    if not texts or not any(texts):
        raise ValueError("texts must hold at least one non-empty string to train the tokenizer on")
    min_size = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials), got "
                         f"{vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those absent from the corpus
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer, preset: str = "tiny", tie_word_embeddings: bool = True, **overrides
) -> Qwen3Config:
    """The Qwen3Config of a preset for ``tokenizer``: vocab padded to a multiple of 64, the tokenizer's special ids.

    ``overrides`` are Qwen3Config fields (e.g. ``num_hidden_layers=1``); unknown names raise ValueError.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    known = set(Qwen3Config().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown Qwen3Config fields {unknown}; known fields: {sorted(known)}")
    fields = dict(PRESETS[preset])
    fields.update(
        vocab_size=math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    fields.update(overrides)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={fields['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return Qwen3Config(**fields)


def build_tiny_model(
    tokenizer,
    preset: str = "tiny",
    tie_word_embeddings: bool = True,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
    **overrides,
):
    """A randomly initialised Qwen3ForCausalLM (float32, train mode) of a preset shape for ``tokenizer``.

    Presets: "tiny" (hidden 64, 2 layers, 4/2 heads), "small" (hidden 256, 4 layers, 8/4 heads), "qwen3-0.6b"
    (the real Qwen3-0.6B shape, ~0.44B non-embedding parameters). ``seed`` makes the init reproducible.
    """
    config = build_config(tokenizer, preset, tie_word_embeddings, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.train()


def flash_attn_available() -> bool:
    """flash_attn is installed and a CUDA device exists (found by find_spec, never imported here)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """"auto" -> "flash_attention_2" when flash_attn is usable and the dtype is half precision, else "sdpa".

    An explicit "flash_attention_2" without flash_attn or CUDA raises ValueError instead of failing mid-load.
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() and half else "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ValueError("attn_implementation='flash_attention_2' needs the flash_attn package and a CUDA device; "
                         "use 'sdpa' or 'auto'")
    return requested


def load_pretrained(
    name_or_path: str, attn_implementation: str = "auto", dtype: str | torch.dtype = "auto"
):
    """(model, tokenizer) of any HF causal-LM checkpoint: a local directory or a hub name already in the cache.

    ``dtype="auto"`` keeps the checkpoint's dtype (float32 when it records none); a string such as "bfloat16" or a
    torch.dtype casts. A tokenizer without a pad token gets its eos token as pad.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load a model config from {name_or_path!r}: not a local checkpoint directory and not in the "
            f"Hugging Face cache (runs are offline, HF_HUB_OFFLINE=1): {err}"
        ) from err
    torch_dtype = _resolve_dtype(dtype, config)
    attn = resolve_attn_implementation(attn_implementation, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{name_or_path!r}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                         "embedding rows")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _resolve_dtype(dtype: str | torch.dtype, config) -> torch.dtype:
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must be 'auto', a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return dtype
