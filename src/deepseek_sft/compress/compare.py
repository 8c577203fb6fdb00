"""The comparison of variants against the SFT model: flat metrics, a table (CSV + Markdown), trade-off plots."""

from __future__ import annotations

import math
from pathlib import Path

from ..io import atomic_path, write_text

TABLE_COLUMNS = [
    "model",
    "f1",
    "f1_delta",
    "relative_f1_loss",
    "size_weights_mb",
    "size_ratio",
    "params_ratio",
    "peak_rss_mb",
    "prefill_speedup",
    "decode_ms_per_token",
    "decode_speedup",
    "batched_speedup",
    "gate_passed",
]

# the panels of plots/summary.png: (column, title); speed-ups and size ratio > 1 = better than SFT
SUMMARY_PANELS = [
    ("size_weights_mb", "weights on disk (MiB)"),
    ("peak_rss_mb", "peak memory, evaluation (MiB)"),
    ("prefill_speedup", "prefill speed-up vs SFT (batch 1)"),
    ("decode_speedup", "decode speed-up vs SFT (batch 1)"),
    ("relative_f1_loss", "relative F1 loss vs SFT (gate: red = failed)"),
]


def table_rows(comparisons: dict[str, dict], sft: dict[str, float], gates: dict[str, bool]) -> list[dict]:
    """One row per model: the SFT reference first, then each variant with its gate verdict."""
    rows = [{"model": "sft", **sft, "gate_passed": ""}]
    for method, comp in comparisons.items():
        rows.append({"model": method, **comp, "gate_passed": int(gates[method])})
    return rows


def flat_metrics(
    comparisons: dict[str, dict], gates: dict[str, bool], extra: dict[str, dict]
) -> dict[str, float]:
    """`<method>_<metric>` numbers for reports/compress/metrics.json (NaN/inf written as null-free -1)."""
    out: dict[str, float] = {}
    for method, comp in comparisons.items():
        for key, value in {**comp, **extra.get(method, {})}.items():
            if isinstance(value, int | float):
                out[f"{method}_{key}"] = _finite(value)
        out[f"{method}_gate_passed"] = int(gates[method])
    out["gates_failed"] = sum(not passed for passed in gates.values())
    return out


def _finite(value: float) -> float:
    # JSON has no NaN/inf; DVC would choke on them, so an undefined ratio is reported as -1
    return value if isinstance(value, int) or math.isfinite(value) else -1.0


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_table(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    """The comparison table as CSV (for DVC / pandas) and Markdown (for people)."""
    import pandas as pd

    frame = pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in TABLE_COLUMNS) + " |")
    write_text(md_path, "\n".join(lines) + "\n")


def write_tradeoff_csv(rows: list[dict], x: str, path: Path) -> None:
    """model, `x`, f1 per model: the data of one DVC trade-off (scatter) plot."""
    import pandas as pd

    frame = pd.DataFrame(rows)[["model", x, "f1"]]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def tradeoff_plot(rows: list[dict], x: str, xlabel: str, path: Path) -> None:
    """A labelled scatter of F1 against `x` (size or latency), one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(
        x=[r[x] for r in rows], y=[r["f1"] for r in rows], hue=[r["model"] for r in rows], s=80, ax=ax
    )
    for row in rows:
        ax.annotate(row["model"], (row[x], row["f1"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel=xlabel, ylabel="mean F1 (test)", title=f"compression trade-off: F1 vs {xlabel}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_plot(rows: list[dict], path: Path) -> None:
    """One bar chart per SUMMARY_PANELS column, one bar per model; failed gates drawn red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    colors = [
        "tab:gray" if r["gate_passed"] == "" else ("tab:green" if r["gate_passed"] else "tab:red")
        for r in rows
    ]
    fig, axes = plt.subplots(1, len(SUMMARY_PANELS), figsize=(4 * len(SUMMARY_PANELS), 3.6))
    for ax, (column, title) in zip(axes, SUMMARY_PANELS, strict=True):
        values = [float(r.get(column, math.nan)) for r in rows]
        ax.bar(names, [v if math.isfinite(v) else 0.0 for v in values], color=colors)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        if column.endswith("speedup"):
            ax.axhline(1.0, color="black", linewidth=0.8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_comparison(rows: list[dict], reports_dir: Path) -> None:
    """Table (CSV, Markdown), the two trade-offs as DVC plot data (CSV) and as PNG, and the summary bars."""
    write_table(rows, reports_dir / "comparison.csv", reports_dir / "comparison.md")
    write_tradeoff_csv(rows, "size_weights_mb", reports_dir / "size_vs_f1.csv")
    write_tradeoff_csv(rows, "decode_ms_per_token", reports_dir / "latency_vs_f1.csv")
    tradeoff_plot(rows, "size_weights_mb", "weights on disk (MiB)", reports_dir / "plots" / "size_vs_f1.png")
    tradeoff_plot(
        rows, "decode_ms_per_token", "decode latency (ms/token)", reports_dir / "plots" / "latency_vs_f1.png"
    )
    summary_plot(rows, reports_dir / "plots" / "summary.png")
