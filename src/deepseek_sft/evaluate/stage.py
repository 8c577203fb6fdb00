"""The evaluate stage: evaluate each model, fit the TF-IDF baseline, analyse errors, write every output.

Outputs under `reports_dir` (reports/evaluate):
  metrics.json                nested {model: {task: {metric}}, efficiency}, {tfidf_lr: ...}, {stage: ...}
  details.json                per-class / per-type reports, confusion matrices, confused pairs, long tail
  predictions/<model>.jsonl   one row per (test record, task): answer, parsed prediction, gold, correct
  errors/*.jsonl              unparseable (all of them), misclassified, entity_<kind>, confused_pairs, long_tail
  plots/*.png                 confusion heatmaps, long tail, entity errors, headline, latency, training curves
  confusion/<model>_<task>.csv  actual,predicted rows for DVC's `confusion` plot template
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..base_model import PROVENANCE_FILE
from ..config.data import TaskSpec
from ..config.evaluate import EvaluateParams
from ..io import atomic_path, write_json, write_jsonl, write_metrics
from . import errors as E
from . import plots
from .baseline import MAJORITY, evaluate_baseline, evaluate_majority
from .baseline import NAME as BASELINE
from .core import ModelResults, evaluate_model, resolve_device
from .report import dvclive_curves, write_report
from .summary import report_blocks

log = logging.getLogger(__name__)


def analyse(result: ModelResults, tasks: dict[str, TaskSpec], train: list[dict] | None, keep: int) -> dict:
    """Error analysis of one model: per task error examples, counts, confused pairs and long tail."""
    out = {"files": {}, "metrics": {}, "details": {}}
    for name, task in tasks.items():
        rows = [r for r in result.rows if r["task"] == name]
        flat: dict[str, float] = {"unparseable_count": sum(not r["ok"] for r in rows)}
        info: dict = {}
        if task.type == "classification":
            wrong = E.classification_error_examples(rows)
            out["files"].setdefault("misclassified", []).extend(wrong[:keep])
            pairs = E.confused_pairs([r["gold"] for r in rows], [r["pred"] for r in rows])
            info["confused_pairs"] = pairs
            out["files"].setdefault("confused_pairs", []).extend({"task": name, **p} for p in pairs)
            if train is not None:
                counts = Counter(str(r[task.field]) for r in train)
                table = E.long_tail(result.details[name]["per_class"], counts)
                info["long_tail"] = table
                flat |= E.frequency_buckets(table)
                out["files"].setdefault("long_tail", []).extend({"task": name, **t} for t in table)
        elif task.type == "extraction":
            by_kind = E.entity_error_examples(rows)
            for kind, examples in by_kind.items():
                flat[f"errors_{kind}"] = len(examples)
                out["files"].setdefault(f"entity_{kind}", []).extend(examples[:keep])
        out["metrics"][name] = flat
        out["details"][name] = info
    out["files"]["unparseable"] = E.unparseable_rows(result.rows)  # every one of them, never truncated
    return out


def write_confusion_csv(rows: list[dict], path: Path) -> None:
    """actual,predicted per test record: the data layout of DVC's `confusion` plot template."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows([r["gold"], r["pred"]] for r in rows)


def write_error_files(errors_dir: Path, per_model: dict[str, dict]) -> dict[str, int]:
    """errors/<kind>.jsonl with a `model` field on each row; returns rows written per file."""
    kinds = [
        "unparseable",
        "misclassified",
        "confused_pairs",
        "long_tail",
        *(f"entity_{k}" for k in E.ENTITY_KINDS),
    ]
    written = {}
    for kind in kinds:
        rows = [{"model": m, **row} for m, a in per_model.items() for row in a["files"].get(kind, [])]
        written[kind] = write_jsonl(errors_dir / f"{kind}.jsonl", rows)
    return written


def model_plots(result: ModelResults, tasks: dict[str, TaskSpec], reports_dir: Path) -> None:
    """Confusion heatmap (PNG) and DVC confusion CSV for each classification task of one model."""
    for name, task in tasks.items():
        if task.type != "classification":
            continue
        rows = [r for r in result.rows if r["task"] == name]
        plots.confusion_heatmap(
            result.details[name]["confusion"],
            f"{result.name}: {name}",
            reports_dir / "plots" / f"confusion_{result.name}_{name}.png",
        )
        write_confusion_csv(rows, reports_dir / "confusion" / f"{result.name}_{name}.csv")


def _init_worker(num_threads: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if num_threads:
        torch.set_num_threads(num_threads)


def parallel_workers(params: EvaluateParams, n_models: int) -> int:
    """Models evaluated at a time: `params.workers` on CPU (at most one per model), 1 on a GPU."""
    return min(params.workers, n_models) if resolve_device(params.device).type == "cpu" else 1


def evaluate_all(
    models: dict[str, str | Path],
    test: list[dict],
    tasks: dict[str, TaskSpec],
    params: EvaluateParams,
    load_options: dict | None,
    seed: int,
    evaluator: Callable[..., ModelResults] | None = None,
) -> dict[str, ModelResults]:
    """`evaluator` (default evaluate_model; same signature) for every model, in table order; on CPU in
    `params.workers` parallel processes. A custom evaluator (e.g. the compress stage's, which also loads
    compressed checkpoints) must be a module-level function, so the worker processes can import it.

    Why processes: the tiny default's matrices are small, so extra OpenMP threads mostly add
    synchronisation (and stall badly when cores are shared); one single-threaded process per model
    uses the cores instead. `spawn` because forking a process with OpenMP/torch state can deadlock.
    """
    for name, model_dir in models.items():
        log.info("evaluating %s (%s) on %d records x %d tasks", name, model_dir, len(test), len(tasks))
    evaluator = evaluator or evaluate_model
    workers = parallel_workers(params, len(models))
    if workers <= 1:
        return {
            name: evaluator(path, test, tasks, params, name=name, load_options=load_options, seed=seed)
            for name, path in models.items()
        }
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(params.num_threads,)
    ) as pool:
        futures = {
            name: pool.submit(
                evaluator, path, test, tasks, params, name=name, load_options=load_options, seed=seed
            )
            for name, path in models.items()
        }
        return {name: future.result() for name, future in futures.items()}


def run_evaluation(
    test: list[dict],
    train: list[dict] | None,
    models: dict[str, str | Path],
    tasks: dict[str, TaskSpec],
    params: EvaluateParams,
    *,
    seed: int,
    reports_dir: str | Path,
    report_md: str | Path | None = None,
    report_html: str | Path | None = None,
    label_qa_dir: str | Path | None = None,
    train_reports_dir: str | Path | None = None,
    load_options: dict | None = None,
) -> dict:
    """Run the whole stage and write its outputs; returns the nested metrics written to metrics.json."""
    started = time.perf_counter()
    reports_dir = Path(reports_dir)
    test = test[: params.limit] if params.limit else test
    results = evaluate_all(models, test, tasks, params, load_options, seed)
    baseline = ({}, {}, {})
    if params.baseline.enabled and train:
        baseline = evaluate_baseline(train, test, tasks, params.baseline, seed)
        baseline[0].update({MAJORITY: evaluate_majority(train, test, tasks)})
    analyses = {name: analyse(r, tasks, train, params.error_examples) for name, r in results.items()}
    metrics = write_outputs(results, baseline, analyses, tasks, reports_dir)
    curves_png = plots.training_curves(
        dvclive_curves(train_reports_dir), reports_dir / "plots" / "training_curves.png"
    )
    metrics["stage"] = {
        "test_records": len(test),
        "tasks": len(tasks),
        "models": len(results),
        "workers": parallel_workers(params, len(models)),
        "seconds": time.perf_counter() - started,
    }
    write_metrics(reports_dir / "metrics.json", metrics)
    blocks = report_blocks(
        results,
        untrained_models(models),
        baseline[0],
        analyses,
        tasks,
        metrics,
        reports_dir,
        label_qa_dir,
        train_reports_dir,
        curves_png,
    )
    write_report(blocks, "SFT evaluation report", report_md, report_html)
    log.info("evaluate stage done in %.1fs", metrics["stage"]["seconds"])
    return metrics


def untrained_models(models: dict[str, str | Path]) -> set[str]:
    """Models whose weights were never trained (the tiny default as base_model built it from a config): the report
    shows no delta against them, because beating random weights says nothing."""
    untrained = set()
    for name, path in models.items():
        provenance = Path(path) / PROVENANCE_FILE
        if provenance.is_file() and not json.loads(provenance.read_text(encoding="utf-8")).get(
            "pretrained", True
        ):
            untrained.add(name)
    return untrained


def write_outputs(results, baseline, analyses, tasks, reports_dir: Path) -> dict:
    """Predictions, errors, details, plots; returns the nested metrics (not yet written)."""
    base_metrics, base_details, _ = baseline
    metrics: dict = {}
    details: dict = {}
    for name, result in results.items():
        write_jsonl(reports_dir / "predictions" / f"{name}.jsonl", result.rows)
        model_plots(result, tasks, reports_dir)
        nested = result.flat()
        for task, extra in analyses[name]["metrics"].items():
            nested[task] = nested[task] | extra
        metrics[name] = nested
        details[name] = {t: result.details[t] | analyses[name]["details"][t] for t in tasks}
    if base_metrics:
        majority = base_metrics.pop(MAJORITY, {})
        metrics[BASELINE] = base_metrics
        details[BASELINE] = base_details
        if majority:
            metrics[MAJORITY] = majority
    write_error_files(reports_dir / "errors", analyses)
    write_json(reports_dir / "details.json", details)
    return metrics
