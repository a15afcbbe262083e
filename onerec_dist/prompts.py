"""Prompt rendering shared by training and decoding, so both see exactly the same tokens.

A training example is ``prompt_ids + answer_ids``: the prompt is the chat-rendered user message with the generation
prompt (the base model's chat template when it has one, a plain "User: ... Assistant: " form otherwise), and the
answer is what the model must write (item tokens, a caption, a rationale). Decoding feeds the same ``prompt_ids``
and appends ``<|item_begin|>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from onerec_dist.sid.tokens import sid_to_text

PLAIN_USER, PLAIN_ASSISTANT = "User: ", "\nAssistant: "


def item_text(codes: Sequence[int]) -> str:
    """One item as its itemic-token string, e.g. <|item_begin|><item_a_1><item_b_2><|item_end|>."""
    return sid_to_text([int(c) for c in codes])


def domain_line(domain: str) -> str:
    """The line that names the user's domain in front of a question (data with several domains)."""
    return f"Domain: {domain}."


def next_item_question(history_codes: Sequence[Sequence[int]], domain: str | None = None) -> str:
    """Sequential preference modelling (OneRec-Think Sec. 3.2, task 2): history IDs -> next item. ``domain``: the
    user's domain when the data has several (OneReason: the prompt names the domain), as a first line; None (single
    domain) gives the question unchanged."""
    items = ", ".join(item_text(c) for c in history_codes)
    question = f"The user has purchased, in order: {items}. Which item will the user purchase next?"
    return question if domain is None else f"{domain_line(domain)}\n{question}"


def render_prompt(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation up to (and including) the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user_message}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = (f"{system}\n" if system else "") + PLAIN_USER + user_message + PLAIN_ASSISTANT
    return tokenizer.encode(text, add_special_tokens=False)


def end_of_turn_ids(tokenizer) -> list[int]:
    """What closes the assistant's answer: the tokenizer's eos token (<|im_end|> for Qwen-style templates)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
