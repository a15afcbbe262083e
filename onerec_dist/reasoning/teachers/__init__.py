"""Rationale teachers (OneRec-Think, arXiv:2510.11639, Sec. 4.2), pluggable by config (``reasoning.teacher``,
conf/reasoning/teacher/{metadata,template,llm}.yaml):

  * ``metadata`` (teachers/metadata.py): deterministic, from item metadata and statistics of the training split, in
    OneReason's three levels (persona abstraction -> interest expansion -> transition inference);
  * ``template`` (teachers/template.py): one sentence naming the history's categories and the target's, the
    baseline of the public code;
  * ``llm`` (teachers/llm.py): any Hugging Face causal LM, prompt template in config, batched ``generate`` seeded per
    request; in-process, or sharded over ``num_workers`` Ray workers (CPU or GPU), with vLLM as a GPU backend.

A teacher sees a ``TeacherRequest`` (the pruned history, the full one, the target) of a *training* window only and
returns one rationale per request (``Teacher.rationales``, a batch at a time). Nothing here decides which windows
are asked: ``onerec_dist.reasoning.bootstrap`` hands over training windows and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from onerec_dist.config import from_mapping, require

TEACHER_KINDS = ("metadata", "template", "llm")
# The llm teacher's default user message (conf/reasoning/teacher/llm.yaml holds the same text).
DEFAULT_LLM_PROMPT = (
    "A shopper's past purchases that matter most for their next one, oldest first:\n{history}\n{persona}\n"
    "Their next purchase was: {target}\nWithout naming that item, its title or its ID, explain in three short "
    "steps why a shopper like this would want an item like it next: 1) who the shopper is (stable interests, "
    "brands), 2) which directions their interests could expand to, 3) which direction comes next and why now. "
    "Only state what the purchases above support."
)


@dataclass(frozen=True)
class TeacherRequest:
    """One training window to explain. Items are dense catalogue indices, oldest first."""

    user: str
    history: tuple[int, ...]  # the full history of the window
    pruned: tuple[int, ...]  # the k items of ``history`` most similar to the target, in time order
    target: int
    persona: str = ""  # the dataset's persona of the user, "" when it has none


class Teacher(Protocol):
    """Writes one rationale per request, deterministically given its seed and the request's position in the run
    (never on how requests were batched or sharded). Optional: ``takes_all_requests`` (True: hand over every request
    in one call, e.g. to shard them over workers) and ``close()`` (release workers when done)."""

    name: str

    def rationales(self, requests: list[TeacherRequest]) -> list[str]: ...


@dataclass
class TemplateTeacherConfig:
    kind: Literal["template"] = "template"
    seed: int = 0
    batch_size: int = 256
    recent: int = 3

    def __post_init__(self) -> None:
        _check_common(self)
        require(self.recent >= 1, "reasoning.teacher.recent", f"must be >= 1, got {self.recent}")


@dataclass
class MetadataTeacherConfig:
    kind: Literal["metadata"] = "metadata"
    seed: int = 0
    batch_size: int = 256
    transition_window: int = 4
    num_candidates: int = 3
    min_brand_count: int = 2
    prefix_levels: int = 1

    def __post_init__(self) -> None:
        _check_common(self)
        for name in ("transition_window", "num_candidates", "min_brand_count", "prefix_levels"):
            require(getattr(self, name) >= 1, f"reasoning.teacher.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass
class LLMTeacherConfig:
    kind: Literal["llm"] = "llm"
    seed: int = 0
    batch_size: int = 8
    model: str | None = None
    backend: Literal["hf", "vllm"] = "hf"
    dtype: str = "auto"
    prompt_template: str = DEFAULT_LLM_PROMPT
    max_new_tokens: int = 192
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    num_workers: int = 1  # 1: in-process; > 1: Ray workers (onerec_dist/distributed/teacher_shards.py)
    use_gpu: bool = False  # one GPU per Ray worker (and the in-process model loaded from `model` goes to the GPU)

    def __post_init__(self) -> None:
        _check_common(self)
        require(self.backend in ("hf", "vllm"), "reasoning.teacher.backend",
                f"{self.backend!r} is not allowed; allowed values: 'hf', 'vllm'")
        require(self.seed >= 0, "reasoning.teacher.seed", f"must be >= 0 (it seeds every request), got {self.seed}")
        require(self.num_workers >= 1, "reasoning.teacher.num_workers",
                f"must be >= 1 (1: in-process, more: Ray workers), got {self.num_workers}")
        require(self.backend != "vllm" or self.use_gpu, "reasoning.teacher.use_gpu",
                "backend='vllm' runs on GPUs only: set use_gpu=true, or backend='hf' on CPU")
        require("{history}" in self.prompt_template and "{target}" in self.prompt_template,
                "reasoning.teacher.prompt_template", "must contain the fields {history} and {target}")
        require(self.max_new_tokens >= 1, "reasoning.teacher.max_new_tokens",
                f"must be >= 1, got {self.max_new_tokens}")
        require(self.temperature > 0, "reasoning.teacher.temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "reasoning.teacher.top_p", f"must be in (0, 1], got {self.top_p}")


TeacherConfig = TemplateTeacherConfig | MetadataTeacherConfig | LLMTeacherConfig
_CONFIGS = {"metadata": MetadataTeacherConfig, "template": TemplateTeacherConfig, "llm": LLMTeacherConfig}


def _check_common(cfg: Any) -> None:
    require(cfg.kind in TEACHER_KINDS, "reasoning.teacher.kind",
            f"{cfg.kind!r} is not allowed; allowed values: {', '.join(map(repr, TEACHER_KINDS))}")
    require(cfg.batch_size >= 1, "reasoning.teacher.batch_size", f"must be >= 1, got {cfg.batch_size}")


def teacher_config(mapping: Mapping[str, Any] | None) -> TeacherConfig:
    """The typed config of ``reasoning.teacher`` (a plain mapping, e.g. OmegaConf.to_container of the section):
    ``kind`` picks the dataclass; unknown keys, wrong types and bad values raise ValueError naming the field."""
    mapping = dict(mapping or {})
    kind = mapping.get("kind", "metadata")
    if kind not in _CONFIGS:
        raise ValueError(f"reasoning.teacher.kind={kind!r} is not allowed; allowed values: "
                         f"{', '.join(map(repr, TEACHER_KINDS))}")
    return from_mapping(_CONFIGS[kind], mapping, "reasoning.teacher")


def build_teacher(cfg: TeacherConfig, data, train, *, item_codes=None, model=None, tokenizer=None,
                  work_dir=None) -> Teacher:
    """The teacher of ``cfg``. Statistics are fitted on ``train`` (the training split) only; ``item_codes`` [N, L]
    are the items' semantic IDs (needed for ID-only data, and for the LLM's history lines); ``model`` /
    ``tokenizer``: the loaded LLM when ``cfg.model`` is null (the aligned model of the run), saved under
    ``work_dir`` when Ray workers or vLLM must load it."""
    if isinstance(cfg, MetadataTeacherConfig):
        from onerec_dist.reasoning.teachers.metadata import MetadataTeacher

        return MetadataTeacher.fit(cfg, data, train, item_codes)
    if isinstance(cfg, TemplateTeacherConfig):
        from onerec_dist.reasoning.teachers.template import TemplateTeacher

        return TemplateTeacher(cfg, data, item_codes)
    from onerec_dist.reasoning.teachers.llm import LLMTeacher

    return LLMTeacher.from_config(cfg, data, item_codes, model=model, tokenizer=tokenizer, work_dir=work_dir)
