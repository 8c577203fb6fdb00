"""Figures of the evaluate stage (seaborn/matplotlib, Agg backend), each written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: DVC stages and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..io import atomic_path


def save(fig, path: str | Path) -> Path:
    """Write `fig` as PNG atomically and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def confusion_heatmap(confusion: dict, title: str, path: str | Path) -> Path:
    """Row-normalised confusion heatmap (colour = share of the gold class, numbers = counts)."""
    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    sns.heatmap(
        share,
        annot=matrix.astype(int) if len(labels) <= 25 else False,
        fmt="d",
        cmap="Blues",
        vmin=0,
        vmax=1,
        xticklabels=labels,
        yticklabels=labels,
        cbar_kws={"label": "share of gold class"},
        ax=ax,
        annot_kws={"fontsize": 7},
    )
    ax.set(title=title, xlabel="predicted", ylabel="gold")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    return save(fig, path)


def headline_bars(table: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars of each task's primary metric, one bar per model (columns: label, model, value)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * table["label"].nunique() + 2), 4))
    sns.barplot(data=table, x="label", y="value", hue="model", ax=ax)
    ax.set(title="primary metric per task", xlabel="", ylabel="score (0-1)", ylim=(0, 1.05))
    return save(fig, path)


def long_tail_plot(table: pd.DataFrame, title: str, path: str | Path) -> Path:
    """Per-class F1 against train frequency (columns: label, train_count, f1, model)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(data=table, x="train_count", y="f1", hue="model", style="model", s=60, ax=ax)
    if table["train_count"].gt(0).all() and table["train_count"].max() > 10 * max(
        table["train_count"].min(), 1
    ):
        ax.set_xscale("log")
    ax.set(title=title, xlabel="examples of the class in train", ylabel="F1 on test", ylim=(-0.05, 1.05))
    return save(fig, path)


def entity_error_bars(table: pd.DataFrame, path: str | Path) -> Path:
    """Counts of entity error kinds per model (columns: model, kind, count)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=table, x="kind", y="count", hue="model", ax=ax)
    ax.set(title="entity errors by kind", xlabel="", ylabel="errors")
    return save(fig, path)


def latency_bars(table: pd.DataFrame, path: str | Path) -> Path:
    """Prefill and decode ms/token (p50 bars) per model (columns: model, phase, ms_per_token)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.barplot(data=table, x="phase", y="ms_per_token", hue="model", ax=ax)
    ax.set(title="batch-1 latency, p50", xlabel="", ylabel="ms per token")
    return save(fig, path)


def training_curves(curves: dict[str, pd.DataFrame], path: str | Path, max_panels: int = 9) -> Path | None:
    """One panel per metric logged more than once (dvclive TSV: step, value), losses first; else None."""
    names = sorted(
        (k for k, v in curves.items() if len(v) > 1), key=lambda k: ("loss" not in k, "/layer_" in k, k)
    )
    if not names:
        return None
    names = names[:max_panels]
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        frame = curves[name]
        ax.plot(frame["step"], frame.iloc[:, -1], marker="." if len(frame) < 30 else None)
        ax.set(title=name, xlabel="step")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    return save(fig, path)
