"""Train stage reports: parameter table, expert load (CSV for DVC plots + heatmap PNG) and metrics.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_path, write_json, write_metrics, write_text


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Write rows as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_param_table(reports_dir: Path, rows: list[dict], text: str) -> None:
    """params_table.csv (groups x trainable/frozen) and the same table as text."""
    write_csv(
        reports_dir / "params_table.csv",
        rows,
        ["group", "params", "trainable", "frozen", "intent", "ok", "problem"],
    )
    write_text(reports_dir / "params_table.txt", text + "\n")


def expert_load_rows(history: list[tuple[int, int, int, int]]) -> list[dict]:
    """Long-format rows (step, layer, expert, tokens, share of the layer's routed tokens at that step)."""
    totals: dict[tuple[int, int], int] = {}
    for step, layer, _, n in history:
        totals[(step, layer)] = totals.get((step, layer), 0) + n
    return [
        {
            "step": s,
            "layer": layer,
            "expert": e,
            "tokens": n,
            "share": round(n / max(totals[(s, layer)], 1), 5),
        }
        for s, layer, e, n in history
    ]


def write_expert_load(reports_dir: Path, history: list[tuple[int, int, int, int]], totals: dict) -> dict:
    """expert_load.csv (every logging window), expert_load_total.csv/json (whole run) and the heatmap PNG.

    Dense models get the same files (headers only, a placeholder image), so the DVC outputs always exist.
    Returns flat metrics for metrics.json (worst per-layer imbalance over the whole run).
    """
    rows = expert_load_rows(history)
    write_csv(reports_dir / "expert_load.csv", rows, ["step", "layer", "expert", "tokens", "share"])
    total_rows = []
    for layer, counts in sorted(totals.items()):
        whole = max(int(counts.sum()), 1)
        for expert, n in enumerate(counts.tolist()):
            total_rows.append(
                {
                    "expert": f"layer {layer} / expert {expert}",
                    "layer": layer,
                    "index": expert,
                    "tokens": int(n),
                    "share": round(n / whole, 5),
                }
            )
    write_csv(
        reports_dir / "expert_load_total.csv", total_rows, ["expert", "layer", "index", "tokens", "share"]
    )
    write_json(reports_dir / "expert_load_total.json", total_rows)
    _heatmap(reports_dir / "expert_load.png", rows)
    if not rows:
        return {}
    worst = max(
        (float(c.max()) * len(c) / max(int(c.sum()), 1) for c in totals.values() if int(c.sum())), default=0.0
    )
    dead = sum(int((c == 0).sum()) for c in totals.values())
    return {"moe_max_expert_load": round(worst, 4), "moe_dead_experts": dead}


def _heatmap(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    if not rows:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "dense model: no MoE routers", ha="center", va="center")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return
    frame = pd.DataFrame(rows)
    layers = sorted(frame["layer"].unique())
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 1.2 + 1.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        grid = frame[frame["layer"] == layer].pivot_table(index="expert", columns="step", values="share")
        sns.heatmap(
            grid,
            ax=ax,
            vmin=0.0,
            vmax=min(1.0, 3.0 / len(grid)),
            cmap="viridis",
            cbar_kws={"label": "token share"},
        )
        ax.set(
            title=f"layer {layer}: routed-token share per expert (uniform = {1 / len(grid):.3f})",
            xlabel="step",
            ylabel="expert",
        )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_train_metrics(reports_dir: Path, metrics: dict) -> None:
    """reports/train/metrics.json: flat and numeric only (what `dvc exp show` shows)."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    flat |= {k: int(v) for k, v in metrics.items() if isinstance(v, bool)}
    write_metrics(reports_dir / "metrics.json", flat)
