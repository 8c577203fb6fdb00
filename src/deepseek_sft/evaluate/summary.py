"""The evaluation part of the report: headline base -> SFT table, efficiency, per-task errors, figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config.data import TaskSpec
from . import plots
from .baseline import MAJORITY
from .baseline import NAME as BASELINE
from .errors import ENTITY_KINDS
from .report import Block, data_qa_blocks, training_blocks

HEADLINE = {
    "classification": ["accuracy", "macro_f1", "weighted_f1", "unparseable_rate", "perplexity"],
    "extraction": ["f1", "precision", "recall", "exact_match", "bleu", "unparseable_rate", "perplexity"],
    "generation": ["bleu", "chrf", "exact_match", "unparseable_rate", "perplexity"],
}
EFFICIENCY = [
    "params_total",
    "params_active_per_token",
    "size_weights_bytes",
    "prefill_ms_per_token_p50",
    "prefill_ms_per_token_p95",
    "decode_ms_per_token_p50",
    "decode_ms_per_token_p95",
    "decode_tokens_per_s",
    "batched_tokens_per_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "generate_s",
    "ppl_s",
    "latency_s",
    "total_s",
    "cpu_s",
]
PRIMARY = {"classification": ("macro_f1", 1.0), "extraction": ("f1", 1.0), "generation": ("chrf", 100.0)}
EXAMPLES_IN_REPORT = 5


def headline_table(
    metrics: dict, tasks: dict[str, TaskSpec], models: list[str], untrained: set[str] = frozenset()
) -> pd.DataFrame:
    """task x metric rows, one column per model (+ the baselines), and `delta` = last model - first model.

    An untrained first model (random weights built from a config) gets no delta: beating it says nothing.
    """
    rows = []
    for task_name, task in tasks.items():
        for metric in HEADLINE[task.type]:
            row = {"task": task_name, "metric": metric}
            for model in [*models, BASELINE, MAJORITY]:
                value = metrics.get(model, {}).get(task_name, {}).get(metric)
                if value is not None or model in models:
                    row[_column(model, untrained)] = value
            first, last = models[0], models[-1]
            comparable = len(models) > 1 and first not in untrained
            if comparable and None not in (
                metrics.get(first, {}).get(task_name, {}).get(metric),
                row.get(last),
            ):
                row["delta"] = row[last] - row[_column(first, untrained)]
            rows.append(row)
    return pd.DataFrame(rows)


def _column(model: str, untrained: set[str]) -> str:
    return f"{model} (untrained)" if model in untrained else model


def verdict_lines(
    metrics: dict, tasks: dict[str, TaskSpec], models: list[str], untrained: set[str]
) -> list[str]:
    """One sentence per task: the final model's primary metric against the baselines and the base model."""
    final, first = models[-1], models[0]
    lines = []
    for name, task in tasks.items():
        metric, scale = PRIMARY[task.type]
        value = metrics.get(final, {}).get(name, {}).get(metric)
        if value is None:
            continue
        parts = [f"{name}: {final} {metric} {value / scale:.3f}"]
        reference = metrics.get(BASELINE, {}).get(name, {}).get(metric)
        if reference is not None:
            gap = (value - reference) / scale
            verb = "LOSES to" if gap < 0 else "beats" if gap > 0 else "ties"
            parts.append(f"{verb} the TF-IDF baseline ({reference / scale:.3f}, {gap:+.3f})")
        floor = metrics.get(MAJORITY, {}).get(name, {}).get(metric)
        if floor is not None:
            parts.append(f"majority class {floor / scale:.3f}")
        if len(models) > 1 and first in untrained:
            parts.append(f"{first} is untrained (random weights from a config): no comparison")
        elif len(models) > 1 and (before := metrics.get(first, {}).get(name, {}).get(metric)) is not None:
            parts.append(f"{first} {before / scale:.3f} ({(value - before) / scale:+.3f})")
        lines.append("; ".join(parts) + ".")
    return lines


def efficiency_table(metrics: dict, models: list[str]) -> pd.DataFrame:
    """One row per model with its latency, throughput, memory, size and parameter counts."""
    rows = []
    for model in models:
        eff = metrics[model]["efficiency"]
        rows.append({"model": model, **{k: eff.get(k) for k in EFFICIENCY}})
    return pd.DataFrame(rows)


def primary_table(metrics: dict, tasks: dict[str, TaskSpec], models: list[str]) -> pd.DataFrame:
    """Each task's primary metric on a 0-1 scale, per model and baseline (columns: label, model, value)."""
    rows = []
    for name, task in tasks.items():
        metric, scale = PRIMARY[task.type]
        for model in [*models, BASELINE]:
            value = metrics.get(model, {}).get(name, {}).get(metric)
            if value is not None:
                rows.append({"label": f"{name}\n{metric}", "model": model, "value": value / scale})
    return pd.DataFrame(rows, columns=["label", "model", "value"])


def _classification_blocks(name, results, analyses, plots_dir: Path) -> list[Block]:
    blocks = []
    for model in results:
        png = plots_dir / f"confusion_{model}_{name}.png"
        if png.exists():
            blocks.append(Block("img", f"{model}: confusion matrix of {name}", png))
        pairs = analyses[model]["details"][name].get("confused_pairs", [])
        blocks.append(Block("p", f"{model}: most confused label pairs (semantic confusion)"))
        blocks.append(Block("table", data=pd.DataFrame(pairs[:EXAMPLES_IN_REPORT])))
    tails = [
        pd.DataFrame(analyses[m]["details"][name]["long_tail"]).assign(model=m)
        for m in results
        if analyses[m]["details"][name].get("long_tail")
    ]
    if tails:
        table = pd.concat(tails, ignore_index=True)
        png = plots.long_tail_plot(table, f"{name}: long tail", plots_dir / f"long_tail_{name}.png")
        blocks.append(Block("img", f"{name}: per-class F1 vs train frequency", png))
    return blocks


def _extraction_blocks(name, results, analyses, metrics, plots_dir: Path) -> list[Block]:
    counts = [
        {"model": m, "kind": k, "count": metrics[m][name].get(f"errors_{k}", 0)}
        for m in results
        for k in ENTITY_KINDS
    ]
    table = pd.DataFrame(counts)
    png = plots.entity_error_bars(table, plots_dir / f"entity_errors_{name}.png")
    blocks = [
        Block("table", data=table.pivot(index="kind", columns="model", values="count").reset_index()),
        Block("img", f"{name}: entity errors by kind", png),
    ]
    last = list(results)[-1]
    for kind in ENTITY_KINDS:
        examples = [e for e in analyses[last]["files"].get(f"entity_{kind}", []) if e["task"] == name]
        if examples:
            show = [{"text": e["text"], "gold": _span(e["gold"]), "pred": _span(e["pred"])} for e in examples]
            blocks += [
                Block("p", f"{last}: {kind} errors (first {EXAMPLES_IN_REPORT})"),
                Block("table", data=pd.DataFrame(show[:EXAMPLES_IN_REPORT])),
            ]
    return blocks


def _span(span: dict | None) -> str:
    return f"{span['type']}:{span['text']}" if span else "-"


def _unparseable_blocks(results, analyses) -> list[Block]:
    rows = [
        {"model": m, "task": r["task"], "answer": r["answer"][:80], "error": r["error"]}
        for m in results
        for r in analyses[m]["files"]["unparseable"]
    ]
    counts = (
        pd.DataFrame(rows).groupby(["model", "task"]).size().reset_index(name="count")
        if rows
        else pd.DataFrame()
    )
    text = (
        f"{len(rows)} answers did not parse; each counts as wrong and is listed in "
        "reports/evaluate/errors/unparseable.jsonl."
    )
    return [
        Block("h3", "Unparseable answers"),
        Block("p", text),
        Block("table", data=counts),
        Block("table", data=pd.DataFrame(rows[:EXAMPLES_IN_REPORT])),
    ]


def report_blocks(
    results,
    untrained,
    baseline_metrics,
    analyses,
    tasks,
    metrics,
    reports_dir: Path,
    label_qa_dir,
    train_reports_dir,
    curves_png,
) -> list[Block]:
    """Every section of report.md/html, in reading order."""
    models, plots_dir = list(results), Path(reports_dir) / "plots"
    stage = metrics["stage"]
    blocks = [Block("h2", "Verdict")]
    blocks += [Block("p", line) for line in verdict_lines(metrics, tasks, models, untrained)]
    table = headline_table(metrics, tasks, models, untrained)
    blocks += [
        Block("h2", f"Headline: {' -> '.join(models)}" + (" (TF-IDF baseline)" if baseline_metrics else "")),
        Block("table", data=table),
    ]
    primary = primary_table(metrics, tasks, models)
    if len(primary):
        png = plots.headline_bars(primary, plots_dir / "headline.png")
        blocks.append(Block("img", "primary metric per task (macro F1, entity F1, chrF/100)", png))
    eff = efficiency_table(metrics, models)
    latency = eff.melt(
        id_vars="model",
        value_vars=["prefill_ms_per_token_p50", "decode_ms_per_token_p50"],
        var_name="phase",
        value_name="ms_per_token",
    )
    latency["phase"] = latency["phase"].str.split("_").str[0]
    blocks += [
        Block("h2", "Efficiency"),
        Block(
            "p",
            "Latency is batch 1 on a sample of test prompts; "
            "batched_tokens_per_s is the throughput of the evaluation's batched generation.",
        ),
        Block("table", data=eff.set_index("model").T.reset_index(names="metric")),
        Block("img", "latency per phase", plots.latency_bars(latency, plots_dir / "latency.png")),
    ]
    blocks.append(Block("h2", "Error analysis"))
    for name, task in tasks.items():
        blocks.append(Block("h3", f"{name} ({task.type})"))
        if task.type == "classification":
            blocks += _classification_blocks(name, results, analyses, plots_dir)
        elif task.type == "extraction":
            blocks += _extraction_blocks(name, results, analyses, metrics, plots_dir)
    blocks += _unparseable_blocks(results, analyses)
    blocks.append(
        Block(
            "p",
            f"Models: {', '.join(models)}; {stage['test_records']} test records x {stage['tasks']} tasks. "
            f"The stage took {stage['seconds']:.1f}s wall ({stage['workers']} model(s) at a time); "
            "per-model wall and CPU seconds are in the efficiency table.",
        )
    )
    return blocks + data_qa_blocks(label_qa_dir) + training_blocks(train_reports_dir, curves_png)
