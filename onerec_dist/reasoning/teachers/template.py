"""The ``template`` teacher: the one-sentence category rationale of the public OneRec-Think code, as a baseline.

"The user recently bought <groups of the last ``recent`` pruned items>, so the next item is likely in <the
target's group>." Groups as in the metadata teacher (category, or ID prefix for ID-only data). Deterministic: the
seed is kept for provenance only.
"""

from __future__ import annotations

import numpy as np

from onerec_dist.data.types import InteractionData
from onerec_dist.reasoning.teachers import TeacherRequest, TemplateTeacherConfig
from onerec_dist.reasoning.teachers.metadata import ItemFacets


class TemplateTeacher:
    name = "template"

    def __init__(self, cfg: TemplateTeacherConfig, data: InteractionData, item_codes: np.ndarray | None = None):
        self.cfg = cfg
        self.facets = ItemFacets.from_catalogue(data.catalogue, item_codes)

    def rationales(self, requests: list[TeacherRequest]) -> list[str]:
        return [self.rationale(r) for r in requests]

    def rationale(self, request: TeacherRequest) -> str:
        f = self.facets
        items = (list(request.pruned) or list(request.history))[-self.cfg.recent:]
        seen: list[str] = []
        for i in items:
            if f.group[i] not in seen:
                seen.append(f.group[i])
        wrap = (lambda g: f"items with the ID prefix {g}") if f.by_prefix else (lambda g: g)
        history = ", ".join(wrap(g) for g in seen) or "nothing"
        return (f"The user recently bought {history}, so the next item is likely in "
                f"{wrap(f.group[request.target])}.")
