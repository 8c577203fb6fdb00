"""Reports of label_qa: the kappa heatmap, the label distribution per split and label counts for DVC."""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run in CI and on servers without a display

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .config import StageParams
from .config.data import TaskSpec
from .io import atomic_path, write_metrics, write_text
from .label_qa_agreement import Agreement

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "val", "test")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _message_figure(path: Path, message: str) -> None:
    """A placeholder PNG, so the DVC plot output exists even when there is nothing to draw."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    _save(fig, path)


def kappa_matrix(agreement: Agreement, layer: str) -> pd.DataFrame:
    """Annotator x annotator Cohen's kappa of one layer (symmetric, 1 on the diagonal, NaN if unknown)."""
    names = agreement.annotators
    matrix = pd.DataFrame(float("nan"), index=names, columns=names)
    for name in names:
        matrix.loc[name, name] = 1.0
    for (a, b), k in agreement.kappas.get(layer, {}).items():
        matrix.loc[a, b] = matrix.loc[b, a] = k
    return matrix


def plot_kappa_heatmap(agreement: Agreement, path: str | Path) -> None:
    """One heatmap panel per layer: Cohen's kappa for each annotator pair, the gate threshold in the title."""
    path = Path(path)
    layers = list(agreement.kappas)
    if agreement.skipped or not layers:
        _message_figure(path, "kappa skipped: fewer than two annotators")
        return
    all_kappas = [k for pairs in agreement.kappas.values() for k in pairs.values()]
    vmin = min([0.0, *all_kappas])
    size = 1.2 + 0.7 * len(agreement.annotators)
    fig, axes = plt.subplots(1, len(layers), figsize=(size * len(layers) + 1, size), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        sns.heatmap(
            kappa_matrix(agreement, layer),
            ax=ax,
            annot=True,
            fmt=".3f",
            vmin=vmin,
            vmax=1.0,
            cmap="RdYlGn",
            square=True,
            cbar=ax is axes[0][-1],
        )
        fleiss = agreement.fleiss.get(layer)
        ax.set_title(layer + (f" (Fleiss {fleiss:.3f})" if fleiss is not None else ""))
    fig.suptitle(f"Cohen's kappa per annotator pair (gate: >= {agreement.threshold})")
    fig.tight_layout()
    _save(fig, path)


def label_frame(splits: dict[str, list[dict]], field: str) -> pd.DataFrame:
    """Counts of each label per split (columns label, split, count), labels ordered by total count."""
    rows = [
        {"label": label, "split": name, "count": n}
        for name in SPLIT_ORDER
        for label, n in Counter(r[field] for r in splits.get(name, [])).items()
    ]
    frame = pd.DataFrame(rows, columns=["label", "split", "count"])
    order = frame.groupby("label")["count"].sum().sort_values(ascending=False, kind="stable").index
    frame["label"] = pd.Categorical(frame["label"], categories=list(order), ordered=True)
    return frame.sort_values(["label", "split"])


def plot_label_distribution(
    splits: dict[str, list[dict]], tasks: dict[str, TaskSpec], path: str | Path
) -> None:
    """Per classification field, label counts per split, most frequent first (the long tail shows)."""
    path = Path(path)
    fields = list(dict.fromkeys(t.field for t in tasks.values() if t.type == "classification"))
    if not fields:
        _message_figure(path, "no classification field in params tasks")
        return
    frames = {f: label_frame(splits, f) for f in fields}
    heights = [max(2.0, 0.3 * frames[f]["label"].nunique() + 1) for f in fields]
    fig, axes = plt.subplots(
        len(fields), 1, figsize=(8, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    fig.set_layout_engine("constrained")
    for ax, f in zip(axes[:, 0], fields, strict=True):
        sns.barplot(
            data=frames[f], x="count", y="label", hue="split", hue_order=SPLIT_ORDER, orient="h", ax=ax
        )
        ax.set_title(f"{f}: records per label and split")
        ax.set_ylabel("")
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    _save(fig, path)


def counts_field(tasks: dict[str, TaskSpec], stratify_by: str | None) -> str | None:
    """The field label_counts.csv counts: stratify_by, else the first classification field."""
    if stratify_by is not None:
        return stratify_by
    return next((t.field for t in tasks.values() if t.type == "classification"), None)


def write_label_counts(records: list[dict], field: str | None, path: str | Path) -> None:
    """label,count rows (most frequent first) of `field` over `records`, for a DVC bar plot."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "count"])
    if field is None:
        log.warning("no classification field: %s has a header only", path)
    else:
        counts = Counter(r[field] for r in records)
        writer.writerows(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        log.info("label_counts.csv counts field %r (%d labels)", field, len(counts))
    write_text(path, buffer.getvalue())


def write_reports(
    reports: Path,
    agreement: Agreement,
    metrics: dict,
    splits: dict[str, list[dict]] | None,
    params: StageParams,
) -> None:
    """metrics.json and the plots of label_qa; without splits (the gate failed) only the kappa heatmap."""
    write_metrics(reports / "metrics.json", metrics)
    plot_kappa_heatmap(agreement, reports / "kappa_heatmap.png")
    if splits is None:
        return
    plot_label_distribution(splits, params.tasks, reports / "label_distribution.png")
    adjudicated = [r for name in SPLIT_ORDER for r in splits[name]]
    write_label_counts(
        adjudicated, counts_field(params.tasks, params.section.stratify_by), reports / "label_counts.csv"
    )
