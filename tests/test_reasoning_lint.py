"""Leak lint of rationales (onerec_dist.reasoning.lint): one worked example per reason and per threshold."""

import pytest

from onerec_dist.reasoning.lint import LintConfig, LintCounts, lint_rationale, title_overlap

CFG = LintConfig()  # trigrams, overlap 0.5, ids >= 4 chars matched anywhere, 256 tokens
TITLE = "Lumora Compact Film Camera AB-123"  # words: lumora compact film camera ab 123 -> 4 trigrams


def lint(text, codes=(3, 7, 1), item_id="B00XYZ", title=TITLE, cfg=CFG, count=None):
    return lint_rationale(text, target_codes=list(codes), target_id=item_id, target_title=title, cfg=cfg,
                          count_tokens=count)


def test_title_overlap_is_the_share_of_title_ngrams():
    # Trigrams of the title: (lumora compact film) (compact film camera) (film camera ab) (camera ab 123).
    assert title_overlap("a Lumora film camera", TITLE, 3) == 0.0
    assert title_overlap("the Lumora Compact Film Camera", TITLE, 3) == 0.5  # first two of four
    assert title_overlap("Film Camera AB-123!", TITLE, 3) == 0.5  # the last two
    assert title_overlap("buy lumora compact film camera ab 123", TITLE, 3) == 1.0
    # A title shorter than n: all of it as a phrase (1.0) or not (0.0).
    assert title_overlap("a red lipstick again", "Red Lipstick", 3) == 1.0
    assert title_overlap("lipstick, red", "Red Lipstick", 3) == 0.0
    assert title_overlap("anything", "", 3) == 0.0


def test_clean_rationale_is_kept():
    assert lint("Persona: likes cameras and Lumora. Next: a Lumora film camera, since lenses came before.") is None


def test_each_leak_is_caught():
    assert lint("next: <|item_begin|><item_a_3><item_b_7><item_c_1><|item_end|>") == "leak_item_tokens"
    assert lint("codes <item_a_3> <item_b_7> <item_c_1> again") == "leak_item_tokens"  # spaces do not hide it
    assert lint("they share the prefix <item_a_3><item_b_7>") is None  # a prefix is allowed (documented)
    assert lint("the item B00XYZ fits") == "leak_id_text"
    assert lint("the item b00xyz fits") == "leak_id_text"  # case-insensitive
    assert lint("the item B00XYZW fits") is None  # another ID that merely starts the same
    assert lint("the Lumora Compact Film Camera fits") == "leak_title"


def test_short_ids_count_only_after_an_item_marker():
    # ID "42": "42 purchases" is a count, "item 42" / "#42" / "ID: 42" name it.
    assert lint("after 42 purchases", item_id="42") is None
    assert lint("so item 42 is next", item_id="42") == "leak_id_text"
    assert lint("so #42 is next", item_id="42") == "leak_id_text"
    assert lint("ID 42 next", item_id="42") == "leak_id_text"
    assert lint("item 420 next", item_id="42") is None
    assert lint("after 42 purchases", item_id="42", cfg=LintConfig(min_id_chars=2)) == "leak_id_text"


def test_empty_and_too_long():
    assert lint("   \n") == "empty"
    assert lint(" ".join(f"w{i}" for i in range(256))) is None  # 256 distinct words (a loop would be repetitive)
    assert lint(" ".join(["word"] * 257)) == "too_long"  # a loop, too: too_long is the earlier reason
    # With a tokenizer-like counter (2 tokens per word): 129 words = 258 tokens > 256.
    assert lint(" ".join(["word"] * 129), count=lambda t: 2 * len(t.split())) == "too_long"


def test_looping_generations_are_repetitive():
    # zlib size / UTF-8 size: "perior" x 50 (300 bytes) compresses to 18 bytes, 0.06 < 0.25; "the shopper likes
    # tapes. " x 8 (200 bytes): 0.18 < 0.25. A written rationale is kept (~0.6), and so is a short sentence, whose
    # compressed size exceeds its own (ratio > 1).
    assert lint("perior" * 50) == "repetitive"
    assert lint("the shopper likes tapes. " * 8) == "repetitive"
    assert lint("Persona: likes cameras and Lumora. Next: a Lumora film camera, since lenses came before.") is None
    assert lint("Next: tapes.") is None
    assert lint("perior" * 50, cfg=LintConfig(min_compression=0)) is None  # 0 turns the check off


def test_counts_split_leaks_from_other_drops():
    counts = LintCounts()
    for reason in [None, "leak_title", "leak_id_text", "empty", None, "too_long", "leak_item_tokens", "repetitive"]:
        counts.add(reason)
    assert (counts.checked, counts.kept, counts.dropped_leak, counts.dropped_other) == (8, 2, 3, 3)


def test_config_is_validated():
    with pytest.raises(ValueError, match="reasoning.lint.title_overlap"):
        LintConfig(title_overlap=0)
    with pytest.raises(ValueError, match="reasoning.lint.min_compression"):
        LintConfig(min_compression=1.0)
    with pytest.raises(ValueError, match="reasoning.lint.max_tokens"):
        LintConfig(max_tokens=0)
