"""Rationale bootstrapping (OneRec-Think, arXiv:2510.11639, Sec. 4.2): training windows -> pruned history ->
teacher -> leak lint -> records.

``bootstrap_rationales`` is the library function a thin stage (``onerec reason stage=bootstrap``) calls. It takes
the split dict and reads only ``splits["train"]``: validation and test targets never reach a teacher. Per batch of
``reasoning.teacher.batch_size`` windows it prunes each history to the k items most similar to the target
(onerec_dist.reasoning.prune), asks the teacher, lints every rationale (onerec_dist.reasoning.lint) and keeps the
clean ones. Output in ``out_dir``:

  * ``rationales.parquet`` (or ``.jsonl``): one record per kept rationale: user, example_index (position in the
    training split), history, pruned, target, target_id, rationale, teacher, and provenance (a JSON string: teacher
    config, pruning settings, dataset, seed, time);
  * ``dropped.jsonl``: the dropped ones with their reason, for inspection;
  * the returned summary: ``examples``, ``kept``, ``dropped_leak``, ``dropped_other``, ``dropped_by_reason``,
    ``rationales_per_s`` (windows handled per second of the whole loop: pruning, teacher and lint), and settings.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onerec_dist.config import from_mapping, require
from onerec_dist.data.types import Examples, InteractionData
from onerec_dist.reasoning.lint import LintConfig, LintCounts, lint_rationale
from onerec_dist.reasoning.prune import ItemSimilarity, PruneConfig, prune_history
from onerec_dist.reasoning.sft_config import REASON_STAGES, SFTConfig
from onerec_dist.reasoning.teachers import Teacher, TeacherConfig, TeacherRequest, teacher_config

RECORDS_STEM = "rationales"
DROPPED_FILE = "dropped.jsonl"


@dataclass
class BootstrapConfig:
    """``reasoning.bootstrap`` (conf/reasoning/default.yaml documents every field)."""

    format: Literal["parquet", "jsonl"] = "parquet"
    max_examples: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        require(self.format in ("parquet", "jsonl"), "reasoning.bootstrap.format",
                f"{self.format!r} is not allowed; allowed values: 'parquet', 'jsonl'")
        require(self.max_examples is None or self.max_examples >= 1, "reasoning.bootstrap.max_examples",
                f"must be null or >= 1, got {self.max_examples}")


@dataclass
class ReasoningConfig:
    """The ``reasoning`` section: pruning, lint, bootstrap and the teacher (kind-specific, see teacher_config)."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    lint: LintConfig = field(default_factory=LintConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    teacher: Any = None
    stage: Literal["bootstrap", "sft"] = "bootstrap"  # `onerec reason stage=...` (conf/stage/{bootstrap,sft}.yaml)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        require(self.stage in REASON_STAGES, "reasoning.stage",
                f"{self.stage!r} is not allowed; allowed values: {', '.join(map(repr, REASON_STAGES))}")
        if not dataclasses.is_dataclass(self.teacher):
            self.teacher = teacher_config(self.teacher)


def reasoning_config(mapping: Mapping[str, Any] | None) -> ReasoningConfig:
    """Validated ``reasoning`` section (a plain mapping); errors name the field and the allowed values."""
    return from_mapping(ReasoningConfig, dict(mapping or {}), "reasoning")


def _windows(train: Examples, cfg: BootstrapConfig) -> np.ndarray:
    """Indices of the training windows to explain: all, or a seeded sample of ``max_examples`` (sorted)."""
    count = len(train)
    if cfg.max_examples is None or cfg.max_examples >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(cfg.seed).choice(count, size=cfg.max_examples, replace=False))


def bootstrap_rationales(data: InteractionData, splits: Mapping[str, Examples | None], teacher: Teacher,
                         teacher_cfg: TeacherConfig, similarity: ItemSimilarity, out_dir: str | Path, *,
                         prune: PruneConfig | None = None, lint: LintConfig | None = None,
                         bootstrap: BootstrapConfig | None = None, item_codes: np.ndarray | None = None,
                         tokenizer=None) -> dict:
    """Explain the training windows of ``splits["train"]`` (see the module docstring); returns the summary.

    ``item_codes`` [N, L] (default ``data.catalogue.semantic_ids``) let the lint catch item tokens; ``tokenizer``
    counts rationale length in tokens for ``reasoning.lint.max_tokens`` (whitespace words without it).
    """
    from tqdm.auto import tqdm

    prune, lint, bootstrap = prune or PruneConfig(), lint or LintConfig(), bootstrap or BootstrapConfig()
    train = splits.get("train")
    if train is None or len(train) == 0:
        raise ValueError("bootstrap needs training windows: splits['train'] is missing or empty")
    codes = np.asarray(item_codes) if item_codes is not None else data.catalogue.semantic_ids
    catalogue = data.catalogue
    count_tokens = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = json.dumps({
        "teacher": dataclasses.asdict(teacher_cfg), "prune": dataclasses.asdict(prune),
        "lint": dataclasses.asdict(lint), "dataset": data.name, "split": "train", "seed": bootstrap.seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, sort_keys=True)

    indices = _windows(train, bootstrap)
    counts, kept, dropped = LintCounts(), [], []
    # A sharded teacher gets every request in one call (its workers run side by side), the others a batch at a time.
    batch = len(indices) if getattr(teacher, "takes_all_requests", False) else teacher_cfg.batch_size
    start = time.perf_counter()
    with tqdm(total=len(indices), desc=f"bootstrap ({teacher.name})", unit="ex", disable=not bootstrap.progress,
              mininterval=2.0) as bar:
        for lo in range(0, len(indices), batch):
            chunk = indices[lo:lo + batch].tolist()
            requests = [TeacherRequest(train.users[i], tuple(train.histories[i]),
                                       tuple(prune_history(train.histories[i], train.targets[i], similarity, prune.k)),
                                       train.targets[i], data.personas.get(train.users[i], ""))
                        for i in chunk]
            rationales = teacher.rationales(requests)
            if len(rationales) != len(requests):
                raise RuntimeError(f"teacher {teacher.name!r} returned {len(rationales)} rationales for "
                                   f"{len(requests)} requests")
            for i, request, text in zip(chunk, requests, rationales):
                y = request.target
                reason = lint_rationale(text, target_codes=None if codes is None else codes[y].tolist(),
                                        target_id=catalogue.item_ids[y], target_title=catalogue.titles[y], cfg=lint,
                                        count_tokens=count_tokens)
                counts.add(reason)
                record = {"user": request.user, "example_index": int(i), "history": list(request.history),
                          "pruned": list(request.pruned), "target": int(y), "target_id": catalogue.item_ids[y],
                          "rationale": text, "teacher": teacher.name}
                if reason is None:
                    kept.append({**record, "provenance": provenance})
                else:
                    dropped.append({**record, "reason": reason})
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    if hasattr(teacher, "close"):
        teacher.close()  # e.g. the sharded teacher's Ray workers

    records_path = write_records(kept, out_dir, bootstrap.format)
    with (out_dir / DROPPED_FILE).open("w", encoding="utf-8") as f:
        for record in dropped:
            f.write(json.dumps(record) + "\n")
    return {"examples": counts.checked, "kept": counts.kept, "dropped_leak": counts.dropped_leak,
            "dropped_other": counts.dropped_other, "dropped_by_reason": dict(sorted(counts.by_reason.items())),
            "rationales_per_s": round(counts.checked / max(seconds, 1e-9), 2), "seconds": round(seconds, 3),
            "training_windows": len(train), "teacher": teacher.name, "similarity": prune.similarity, "k": prune.k,
            "records": str(records_path), "dropped": str(out_dir / DROPPED_FILE)}


def write_records(records: list[dict], out_dir: Path, fmt: str) -> Path:
    path = out_dir / f"{RECORDS_STEM}.{fmt}"
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("user", pa.string()), ("example_index", pa.int64()), ("history", pa.list_(pa.int64())),
                        ("pruned", pa.list_(pa.int64())), ("target", pa.int64()), ("target_id", pa.string()),
                        ("rationale", pa.string()), ("teacher", pa.string()), ("provenance", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def read_rationales(path: str | Path) -> list[dict]:
    """The records of ``rationales.parquet`` / ``.jsonl`` as dicts (the SFT stage's input)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
