"""The ablation table from the row summaries that exist in an output directory: table.json / table.csv / table.md
and a bar plot (table.png). Rendering reads only files, is deterministic (seeded bootstraps, the rows' fixed order),
so rendering twice gives the same bytes.

Intervals (95 %, percentile bootstrap over users, onerec_dist.reasoning.think_eval.paired_bootstrap):
  * a row's own Recall@10: resample its users' hits h_u in {0, 1};
  * Δ Recall@10 against ``compare_to``: the pair (h_u(row), h_u(reference)) of a user is resampled together, which
    removes the between-user variance both rows share (Efron & Tibshirani 1993, Ch. 13). Both rows must have been
    evaluated on the same users with the same targets; the hits come from each row's predictions.parquet.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from onerec_dist.ablation.rows import ROWS
from onerec_dist.ablation.run_row import read_row_summary
from onerec_dist.reasoning.think_eval import hits_at_k, paired_bootstrap

K = 10  # the K of the Δ column and of the plot
PUBLISHED_FILE = Path(__file__).with_name("published.json")
COLUMNS = ["row", "kind", "parent", "recall@5", "recall@10", "recall@10_ci_low", "recall@10_ci_high", "ndcg@5",
           "ndcg@10", "validity", "delta_vs", "delta_recall@10", "delta_ci_low", "delta_ci_high", "think_recall@10",
           "nothink_recall@10", "rationale_tokens", "users_per_s", "training_tokens", "training_tokens_total",
           "wall_seconds", "num_users", "source"]


def user_hits(summary: dict, k: int = K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users [U], targets [U], hits@k [U]) of a row's main column from its predictions.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(summary["predictions_path"], columns=["user", "target", summary["column"]]).to_pydict()
    items = np.array([(list(r) + [-1] * k)[:k] for r in table[summary["column"]]], dtype=np.int64)  # [U, k]
    targets = np.asarray(table["target"], dtype=np.int64)
    return np.asarray(table["user"]), targets, hits_at_k(items, targets, k)


def paired_delta(row: dict, reference: dict, num_resamples: int, seed: int) -> dict:
    """Δ Recall@K of ``row`` minus ``reference`` over their common users, with its paired 95 % interval."""
    users_a, targets_a, hits_a = user_hits(row)
    users_b, targets_b, hits_b = user_hits(reference)
    position = {u: i for i, u in enumerate(users_b.tolist())}
    pairs = [(i, position[u]) for i, u in enumerate(users_a.tolist()) if u in position]
    if len(pairs) != len(users_a) or len(pairs) != len(users_b):
        raise ValueError(f"rows {row['ablation_row']} and {reference['ablation_row']} were evaluated on different "
                         f"users ({len(users_a)} vs {len(users_b)}, {len(pairs)} in common): use the same eval.split "
                         f"and eval.max_users for every row")
    a, b = np.array(pairs).T
    if not np.array_equal(targets_a[a], targets_b[b]):
        raise ValueError(f"rows {row['ablation_row']} and {reference['ablation_row']} have different targets for the "
                         "same users: they were evaluated on different data or splits")
    return paired_bootstrap(hits_a[a], hits_b[b], num_resamples, seed)


def table_record(summary: dict, rows: dict[str, dict], num_resamples: int, seed: int) -> dict:
    """One measured / baseline line of the table."""
    metrics = summary["metrics"]
    _, _, hits = user_hits(summary)
    own = paired_bootstrap(hits, np.zeros_like(hits), num_resamples, seed)  # interval of the mean hit rate
    record = {"row": summary["ablation_row"], "kind": summary["kind"], "parent": summary.get("parent"),
              **{key: metrics.get(key) for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "validity")},
              "recall@10_ci_low": own["ci95"][0], "recall@10_ci_high": own["ci95"][1],
              "think_recall@10": (summary.get("think") or {}).get("recall@10"),
              "nothink_recall@10": (summary.get("nothink") or {}).get("recall@10"),
              "num_users": summary.get("num_users"), "source": "measured"}
    for key in ("rationale_tokens", "users_per_s", "training_tokens", "training_tokens_total", "wall_seconds"):
        record[key] = summary.get(key)
    reference = summary.get("compare_to")
    record["delta_vs"] = reference if reference in rows else None
    if reference in rows:
        delta = paired_delta(summary, rows[reference], num_resamples, seed)
        record.update({"delta_recall@10": delta["mean"], "delta_ci_low": delta["ci95"][0],
                       "delta_ci_high": delta["ci95"][1]})
    return record


def published_records(dataset: str | None, mode: str) -> list[dict]:
    """Reference rows of published papers for ``dataset`` (all of them with mode=always), never measured here."""
    if mode == "never":
        return []
    table = json.loads(PUBLISHED_FILE.read_text())
    names = [n for n in table if not n.startswith("_")]
    chosen = names if mode == "always" else [n for n in names if dataset and n.lower() == dataset.lower()]
    return [{"kind": "published", "source": f"published, not measured: {r['source']} ({name})",
             **{k: v for k, v in r.items() if k != "source"}} for name in chosen for r in table[name]]


def build_table(output_dir: Path, num_resamples: int = 1000, seed: int = 0, published: str = "auto") -> list[dict]:
    """Records of every row that exists in ``output_dir`` (in the order of ROWS), then the published rows."""
    rows = {name: s for name in ROWS if (s := read_row_summary(output_dir, name)) is not None}
    records = [table_record(s, rows, num_resamples, seed) for s in rows.values()]
    datasets = {s.get("dataset") for s in rows.values()}
    dataset = datasets.pop() if len(datasets) == 1 else None
    records += published_records(dataset, published)
    return [{c: r.get(c) for c in COLUMNS} for r in records]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(records: list[dict]) -> str:
    header = ["row", "kind", "R@5", "R@10 [95% CI]", "N@5", "N@10", "validity", "Δ R@10 vs", "Δ R@10 [95% CI]",
              "R@10 think", "R@10 no-think", "rationale tok", "users/s", "train tokens (total)", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        ci = f" [{_fmt(r['recall@10_ci_low'])}, {_fmt(r['recall@10_ci_high'])}]" if r["recall@10_ci_low"] is not None \
            else ""
        delta = "" if r["delta_recall@10"] is None else \
            f"{r['delta_recall@10']:+.4f} [{r['delta_ci_low']:+.4f}, {r['delta_ci_high']:+.4f}]" + \
            (" *" if r["delta_ci_low"] > 0 or r["delta_ci_high"] < 0 else "")
        tokens = "" if r["training_tokens"] is None else f"{r['training_tokens']} ({r['training_tokens_total']})"
        cells = [r["row"], r["kind"], _fmt(r["recall@5"]), _fmt(r["recall@10"]) + ci, _fmt(r["ndcg@5"]),
                 _fmt(r["ndcg@10"]), _fmt(r["validity"], 3), r["delta_vs"] or "", delta, _fmt(r["think_recall@10"]),
                 _fmt(r["nothink_recall@10"]), _fmt(r["rationale_tokens"], 1), _fmt(r["users_per_s"], 1), tokens,
                 _fmt(r["wall_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "R = Recall, N = NDCG; intervals: 95 % percentile bootstrap over users; Δ: paired over users "
             "(* = interval excludes 0). Rows of kind `published` are numbers copied from papers "
             "(onerec_dist/ablation/published.json), NOT measured here.", "",
             "Rows: " + "; ".join(f"`{name}`: {row.what}" for name, row in ROWS.items()
                                  if any(r["row"] == name for r in records))]
    return "\n".join(lines + notes) + "\n"


def render_csv(records: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def plot_table(records: list[dict], path: Path) -> Path:
    """Recall@10 bars: measured rows with their 95 % interval, published rows hatched and without one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in records]
    values = [r["recall@10"] or 0.0 for r in records]
    low = [v - r["recall@10_ci_low"] if r["recall@10_ci_low"] is not None else 0.0 for v, r in zip(values, records)]
    high = [r["recall@10_ci_high"] - v if r["recall@10_ci_high"] is not None else 0.0
            for v, r in zip(values, records)]
    colors = {"measured": "tab:blue", "baseline": "tab:gray", "published": "white"}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(records) + 1), 3.5))
    bars = ax.bar(range(len(records)), values, yerr=[low, high], capsize=3,
                  color=[colors[r["kind"]] for r in records], edgecolor="black")
    for bar, r in zip(bars, records):
        if r["kind"] == "published":
            bar.set_hatch("//")
    ax.set_xticks(range(len(records)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"Recall@{K}")
    ax.set_title("ablation (bars: 95 % bootstrap interval; hatched: published, not measured)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: the same table, the same bytes
    plt.close(fig)
    return path


def render_table(output_dir: Path, num_resamples: int = 1000, seed: int = 0, published: str = "auto",
                 plot: bool = True) -> dict:
    """Write table.json / table.csv / table.md (and table.png) in ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    records = build_table(output_dir, num_resamples, seed, published)
    files = {"json": output_dir / "table.json", "csv": output_dir / "table.csv", "md": output_dir / "table.md"}
    files["json"].write_text(json.dumps(records, indent=1) + "\n")
    files["csv"].write_text(render_csv(records))
    files["md"].write_text(render_markdown(records))
    if plot and records:
        files["png"] = plot_table(records, output_dir / "table.png")
    print(render_markdown(records), end="")
    return {key: str(path) for key, path in files.items()}
