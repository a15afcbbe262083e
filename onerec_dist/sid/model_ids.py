"""A model carries its item IDs: every model directory the project writes holds the semantic-ID table it was trained
with and the layout of its item tokens, and every stage that takes a model reads its IDs from there.

Files of a model directory (next to config.json and the tokenizer):

- ``sid_table.json``: item id -> codes, the ``onerec-sid/1`` format of onerec_dist/sid/table.py.
- ``item_tokens.json``: where the item tokens sit in the vocabulary, ``onerec-item-tokens/1``::

      {"format": "onerec-item-tokens/1", "num_levels": 3, "codebook_sizes": [16, 16, 16],
       "begin_token_id": 2001, "end_token_id": 2002, "level_first_token_id": [2003, 2019, 2035]}

  code c of level l is token ``level_first_token_id[l] + c`` (the contract of onerec_dist.sid.tokens).

Why: the same ``sid.*`` settings do not always give the same codes (another seed, ``sid.balanced``, embeddings
computed on another device), and a model scored with IDs other than its own ranks the wrong items without a word.
So ``load_model_ids`` takes the model's table, and settings given explicitly (``explicit_sid_keys``, filled in by
the CLI) are only checked against it: IDs that differ stop the run with both sources named.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onerec_dist.data.config import DataConfig
from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.sid.build import build_ids, describe_source
from onerec_dist.sid.config import SidConfig
from onerec_dist.sid.table import load_table, save_table

TABLE_FILE = "sid_table.json"
ITEM_TOKENS_FILE = "item_tokens.json"
ITEM_TOKENS_FORMAT = "onerec-item-tokens/1"


def save_model_ids(model_dir: str | Path, codes: np.ndarray, item_ids: list[str], codebook_sizes: list[int],
                   item_tokenizer) -> None:
    """Write ``sid_table.json`` (codes [N, L] of ``item_ids``) and ``item_tokens.json`` into ``model_dir``."""
    model_dir = Path(model_dir)
    if list(item_tokenizer.codebook_sizes) != [int(k) for k in codebook_sizes]:
        raise ValueError(f"item tokens for codebook sizes {item_tokenizer.codebook_sizes} cannot carry IDs with "
                         f"codebook sizes {list(codebook_sizes)}")
    save_table(model_dir / TABLE_FILE, codes, item_ids, codebook_sizes)
    layout = item_token_layout(item_tokenizer)
    tmp = model_dir / (ITEM_TOKENS_FILE + ".tmp")
    tmp.write_text(json.dumps(layout) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / ITEM_TOKENS_FILE)


def copy_model_ids(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy a model's ID files into another model directory (e.g. the initial model's into its trained export)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in (TABLE_FILE, ITEM_TOKENS_FILE):
        if not (src_dir / name).is_file():
            raise FileNotFoundError(f"{src_dir / name} not found: the source model carries no item IDs")
        shutil.copyfile(src_dir / name, dst_dir / name)


def item_token_layout(item_tokenizer) -> dict:
    """The ``item_tokens.json`` payload of an ``ItemTokenizer``."""
    return {"format": ITEM_TOKENS_FORMAT, "num_levels": item_tokenizer.num_levels,
            "codebook_sizes": [int(k) for k in item_tokenizer.codebook_sizes],
            "begin_token_id": int(item_tokenizer.begin_id), "end_token_id": int(item_tokenizer.end_id),
            "level_first_token_id": [int(x) for x in item_tokenizer.level_offset.tolist()]}


def check_item_token_layout(model_dir: str | Path, item_tokenizer) -> None:
    """ValueError when the model's ``item_tokens.json`` disagrees with the item tokens its tokenizer has."""
    path = Path(model_dir) / ITEM_TOKENS_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    actual = item_token_layout(item_tokenizer)
    if recorded != actual:
        raise ValueError(f"{path} records the item-token layout {recorded}, but the model's tokenizer has {actual}; "
                         "the model directory was modified after it was written")


def model_table_path(model_dir: str | Path | None) -> Path | None:
    """``<model_dir>/sid_table.json`` when ``model_dir`` is a local directory holding one, else None."""
    if not model_dir:
        return None
    path = Path(model_dir) / TABLE_FILE
    return path if path.is_file() else None


def _has_item_tokens(model_dir: str) -> bool:
    if not Path(model_dir).is_dir():
        return False  # a hub name: a base model, not one this project wrote
    from transformers import AutoTokenizer

    return any(t.startswith("<item_") for t in AutoTokenizer.from_pretrained(model_dir).get_added_vocab())


def table_codes_for_catalogue(path: Path, catalogue: Catalogue) -> tuple[np.ndarray, list[int]]:
    """The table's codes in catalogue order, [N, L]. Every catalogue item must be in the table (the model has no
    ID for the others); table items outside the catalogue are allowed (e.g. a catalogue filtered for evaluation)."""
    codes, item_ids, sizes = load_table(path)
    rows = dict(zip(item_ids, range(len(item_ids))))
    missing = [item for item in catalogue.item_ids if item not in rows]
    if missing:
        raise ValueError(f"the model's table {path} has no semantic ID for {len(missing)} of the {len(catalogue)} "
                         f"catalogue items (e.g. {missing[:3]}): the model was trained on another catalogue; "
                         "check data.* against the data the model was trained on")
    return codes[[rows[item] for item in catalogue.item_ids]], sizes


def load_model_ids(model_dir: str | Path | None, data: InteractionData, data_cfg: DataConfig, sid_cfg: SidConfig,
                   explicit: Sequence[str] = ()) -> tuple[np.ndarray, list[int], str]:
    """The run's item codes [N, L] (catalogue order), codebook sizes, and where they came from, in words.

    - ``model_dir`` carries a table: the model's IDs. When ``explicit`` names ``sid.*`` keys given for this run, the
      IDs those settings give (``build_ids``) must equal the model's, else ValueError naming both sources.
    - ``model_dir`` has item tokens but no table (and nothing explicit): ValueError, its IDs are unknown.
    - otherwise (no model, a hub name, a base model without item tokens): the IDs of ``sid.*`` (``build_ids``).
    """
    table = model_table_path(model_dir)
    if table is None:
        if model_dir and not explicit and _has_item_tokens(str(model_dir)):
            raise ValueError(f"model {model_dir} has item tokens but no {TABLE_FILE}, so its semantic IDs are unknown; "
                             f"give the IDs it was trained with explicitly, e.g. sid=file sid.index_path=<the "
                             f"{TABLE_FILE} of its `onerec sid` run>")
        codes, sizes, _ = build_ids(data, data_cfg, sid_cfg)
        return codes, sizes, describe_source(sid_cfg, data_cfg)
    model_codes, model_sizes = table_codes_for_catalogue(table, data.catalogue)
    source = f"the model's own table {table}"
    if explicit:
        given = ", ".join(f"sid.{key}={getattr(sid_cfg, key)}" for key in explicit)
        codes, sizes, _ = build_ids(data, data_cfg, sid_cfg)
        other = f"{describe_source(sid_cfg, data_cfg)}, from the settings given explicitly ({given})"
        check_same_ids(model_codes, model_sizes, source, codes, sizes, other, data.catalogue)
    return model_codes, model_sizes, source


def check_same_ids(codes_a: np.ndarray, sizes_a: list[int], source_a: str, codes_b: np.ndarray, sizes_b: list[int],
                   source_b: str, catalogue: Catalogue) -> None:
    """ValueError naming both sources when two ID assignments of the same catalogue differ."""
    advice = ("a model must be trained on and evaluated with its own IDs: drop the sid.* settings to use the "
              "model's table, or train a model with the IDs you want")
    if list(sizes_a) != list(sizes_b) or codes_a.shape != codes_b.shape:
        raise ValueError(f"semantic IDs disagree: {source_a} has codebook sizes {list(sizes_a)}, but {source_b} "
                         f"gives {list(sizes_b)}; {advice}")
    differ = np.flatnonzero((codes_a != codes_b).any(axis=1))
    if differ.size:
        first = int(differ[0])
        raise ValueError(f"semantic IDs disagree: {differ.size} of {len(codes_a)} items have other codes in "
                         f"{source_a} than in {source_b} (e.g. item {catalogue.item_ids[first]!r}: "
                         f"{codes_a[first].tolist()} vs {codes_b[first].tolist()}); {advice}")
