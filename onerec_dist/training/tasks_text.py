"""Text helpers of the Itemic Alignment tasks (onerec_dist.training.tasks): reading a general-text corpus, the
derived interest summary of a user, and the fixed wordings of the persona and captioning texts.

Pure Python (json, pyarrow for parquet, imported lazily); no tokenizer here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from onerec_dist.data.types import Catalogue, DropReport
from onerec_dist.prompts import item_text

BUILTIN_GENERAL_TEXT = "general_text.txt"  # shipped beside this module (package data of onerec_dist)
TEXT_FORMATS = (".txt", ".jsonl", ".parquet")
TEXT_FIELD = "text"  # the JSONL field / parquet column holding a document

PERSONA_HEADER = "User profile.\nPurchased items, oldest first:\n"
PERSONA_ITEM_PREFIX = "- "
PERSONA_SUMMARY_PREFIX = "Summary of interests: "


def caption_question(codes: Sequence[int]) -> str:
    """Itemic dense captioning (OneRec-Think Sec. 3.2, task 3): the item's ID -> its title and description."""
    return f"Describe the item {item_text(codes)}: give its title and a short description."


def persona_item_suffix(catalogue: Catalogue, index: int) -> str:
    """What follows an item's ID on its line of the persona text: " <title> (<category> > <sub>)" and a newline."""
    title = catalogue.titles[index].strip()
    categories = " > ".join(c for c in catalogue.categories[index] if c)
    return (f" {title}" if title else "") + (f" ({categories})" if categories else "") + "\n"


def _join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def derive_interest_summary(catalogue: Catalogue, items: Sequence[int], num_categories: int = 3,
                            num_brands: int = 2) -> str:
    """A persona for datasets without one: the user's most frequent categories and brands over ``items``.

    Ties keep first-seen order (Counter.most_common is stable), so the text is deterministic. Empty when the
    catalogue has neither categories nor brands for these items (ids-only datasets).
    """
    categories = Counter(c for i in items for c in catalogue.categories[i] if c)
    brands = Counter(catalogue.brands[i] for i in items if catalogue.brands[i])
    parts = []
    if categories:
        parts.append("buys mostly " + _join_names([c for c, _ in categories.most_common(num_categories)]))
    if brands:
        top = [b for b, _ in brands.most_common(num_brands)]
        parts.append(("favourite brand " if len(top) == 1 else "favourite brands ") + _join_names(top))
    if not parts:
        return ""
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- general-text corpus


def read_documents(path: str | Path | None, report: DropReport | None = None) -> list[str]:
    """Documents of a general-text corpus; ``None`` reads the built-in ``general_text.txt``.

    * ``.txt``: documents are separated by blank lines; the lines of one document are joined with a space
      (so a hard-wrapped paragraph is one document, and a file with a blank line between lines has one per line);
    * ``.jsonl``: one JSON object per line with a string field "text";
    * ``.parquet``: a string column "text".
    Empty documents (and parquet nulls) are skipped and counted in ``report``; malformed files raise ValueError.
    """
    report = report if report is not None else DropReport()
    if path is None:
        text = resources.files(__package__).joinpath(BUILTIN_GENERAL_TEXT).read_text(encoding="utf-8")
        return _paragraphs(text)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_FORMATS:
        raise ValueError(f"general text file {str(path)!r}: unsupported extension {suffix!r}; allowed: {TEXT_FORMATS}")
    if not path.is_file():
        raise ValueError(f"general text file {str(path)!r} does not exist")
    if suffix == ".txt":
        return _paragraphs(path.read_text(encoding="utf-8"))
    documents = _read_jsonl(path) if suffix == ".jsonl" else _read_parquet(path)
    kept = [d for d in documents if d is not None and d.strip()]
    if len(kept) < len(documents):
        report.add(f"empty or null document in {path.name} (skipped)", count=len(documents) - len(kept))
    return kept


def _paragraphs(text: str) -> list[str]:
    documents, lines = [], []
    for line in text.splitlines() + [""]:  # the trailing "" closes the last paragraph
        if line.strip():
            lines.append(line.strip())
        elif lines:
            documents.append(" ".join(lines))
            lines = []
    return documents


def _read_jsonl(path: Path) -> list[str | None]:
    documents = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                raise ValueError(f"{path}:{number}: expected a JSON object with a {TEXT_FIELD!r} field")
            text = record[TEXT_FIELD]
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {TEXT_FIELD!r} must be a string, got {type(text).__name__}")
            documents.append(text)
    return documents


def _read_parquet(path: Path) -> list[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if TEXT_FIELD not in schema.names:
        raise ValueError(f"parquet file {str(path)!r} has no column {TEXT_FIELD!r}; columns: {schema.names}")
    column_type = schema.field(TEXT_FIELD).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"parquet file {str(path)!r}: column {TEXT_FIELD!r} must hold strings, got {column_type}")
    return pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD).to_pylist()
