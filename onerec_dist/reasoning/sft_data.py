"""CoT SFT examples from bootstrap records (OneRec-Think, arXiv:2510.11639, Sec. 4.2): the *full* history of each
record's training window -> ``<think>`` rationale ``</think>`` -> the target's item tokens, in the one answer format
of ``cot_format`` (loss on everything after ``<think>``, equal weight per token).

  * ``nothink_ratio``: that share of the records (exactly round(ratio * n), a seeded choice without replacement) is
    written with an empty think block instead of its rationale, so one checkpoint learns both modes;
  * ``shuffle_rationales`` (the control of the issue): rationales are permuted across records (a seeded random
    permutation; a record may keep its own with probability ~1/n), so the model sees well-formed but unrelated
    reasoning. A gain that survives this control is not due to the rationales' content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onerec_dist.reasoning.cot_format import ThinkTokens, training_example
from onerec_dist.training.tasks import AlignmentExample, item_token_table


def cot_sft_examples(records: Sequence[dict], item_codes: np.ndarray, tokenizer, think: ThinkTokens, *,
                     max_length: int, nothink_ratio: float = 0.0, shuffle_rationales: bool = False,
                     seed: int = 0, user_domains: Mapping[str, str] | None = None) -> list[AlignmentExample]:
    """One training example per record (``history``, ``target``, ``rationale``, ``user``, ``example_index``).
    ``user_domains``: {user: domain name} on data with several domains (the prompt names the user's domain)."""
    if not 0.0 <= nothink_ratio <= 1.0:
        raise ValueError(f"reasoning.sft.nothink_ratio: must be in [0, 1], got {nothink_ratio}")
    codes = np.asarray(item_codes)
    ids = item_token_table(tokenizer, codes, codes.shape[0])  # [N][L + 2]
    rng = np.random.default_rng(seed)
    n = len(records)
    rationales = [r["rationale"] for r in records]
    if shuffle_rationales:
        rationales = [rationales[j] for j in rng.permutation(n)]
    nothink = np.zeros(n, dtype=bool)
    nothink[rng.choice(n, size=int(round(nothink_ratio * n)), replace=False)] = True
    examples = []
    for record, rationale, empty in zip(records, rationales, nothink.tolist()):
        source = f"train[{record.get('example_index', '?')}] user {record.get('user', '?')}"
        domain = user_domains[record["user"]] if user_domains else None
        examples.append(training_example(tokenizer, think, codes, ids[int(record["target"])], record["history"],
                                         None if empty else rationale, max_length, source, domain))
    return examples
