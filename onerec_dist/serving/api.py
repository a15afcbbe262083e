"""The JSON API of `onerec serve` (pure: parsing and validation, no Ray).

``POST /recommend`` body ``{"user": "<id>", "history": ["<item id>", ...], "k": 10, "domain": "<name>"}`` (``k``
optional, default min(10, serving.max_k); ``domain`` optional, only on a catalogue with several domains: the user's
domain, else the cache's or the latest history item's, see serving/think_ahead.py)
-> ``{"user", "items": [{"item", "score"}], "path": "cached" | "fallback", "latency_ms"}``. ``GET /health`` ->
``{"status": "ok", ...}``. A bad request raises ``RequestError`` with an HTTP 4xx status and a message; the server
answers it and keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_K = 10
MAX_HISTORY = 10_000


class RequestError(ValueError):
    """A bad request: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RecommendRequest:
    user: str
    history: list[int]  # catalogue rows, oldest first
    k: int
    domain: str | None = None  # the user's domain (catalogues with several domains); None: from cache or history


def parse_recommend(body: bytes, item_index: Callable[[str], int | None], max_k: int,
                    domains: Sequence[str] = ()) -> RecommendRequest:
    """Validate a /recommend body; ``item_index`` maps an item id to its catalogue row (None: unknown);
    ``domains``: the names a request's ``domain`` may take (empty: a single-domain catalogue, no ``domain``)."""
    try:
        payload = json.loads(body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object {\"user\", \"history\", \"k\"}")
    unknown_keys = sorted(set(payload) - {"user", "history", "k", "domain"})
    if unknown_keys:
        raise RequestError(400, f"unknown fields {unknown_keys}; allowed: user, history, k, domain")
    user = payload.get("user")
    if not isinstance(user, (str, int)) or isinstance(user, bool) or str(user) == "":
        raise RequestError(400, "\"user\" must be a non-empty string (or integer) user id")
    history = payload.get("history")
    if not isinstance(history, list) or not history:
        raise RequestError(400, "\"history\" must be a non-empty list of item ids, oldest first")
    if len(history) > MAX_HISTORY:
        raise RequestError(413, f"\"history\" has {len(history)} items; at most {MAX_HISTORY}")
    rows, unknown = [], []
    for item in history:
        row = item_index(str(item)) if isinstance(item, (str, int)) and not isinstance(item, bool) else None
        (unknown if row is None else rows).append(item if row is None else row)
    if unknown:
        raise RequestError(422, f"{len(unknown)} unknown item ids in \"history\" (e.g. {unknown[:3]})")
    k = payload.get("k", min(DEFAULT_K, max_k))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(400, f"\"k\" must be an integer in [1, {max_k}], got {k!r}")
    domain = payload.get("domain")
    if domain is not None and domain not in domains:
        allowed = ", ".join(map(repr, domains)) if domains else "none: this catalogue has a single domain"
        raise RequestError(422, f"\"domain\" {domain!r} is not a domain of this catalogue; allowed: {allowed}")
    return RecommendRequest(str(user), rows, k, domain)
