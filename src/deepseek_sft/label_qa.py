"""Stage label_qa: inter-annotator agreement gate, majority-vote adjudication, stratified split.

Interim records (records.py) carry one label set per annotator. This stage
1. measures agreement on every label layer (label_qa_agreement) and stops when a pair is below the gate;
2. adjudicates each record by majority vote; records without a strict majority on a classification layer
   go to needs_review (with every annotator's labels) instead of the splits;
3. splits the adjudicated records into train/val/test by a seeded hash of each record (label_qa_split:
   stable when other records come or go, identical texts together, stratification approximate and
   reported), or keeps the dataset's own split (records.py `split`), val carved from its train; and
   writes the reports (label_qa_plots), with a fingerprint of the test split.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import StageParams
from .config.base import ParamsError
from .config.data import TaskSpec
from .io import DataError, iter_jsonl_lines, read_jsonl, write_jsonl
from .label_qa_agreement import (
    Agreement,
    AgreementGateError,
    annotator_agreement,
    check_gate,
    measure_agreement,
)
from .label_qa_plots import write_reports
from .label_qa_split import cap_per_label, label_deviation, split_fingerprint, split_given, split_records
from .records import SPLITS, entity

__all__ = ["AgreementGateError", "QaResult", "label_qa", "load_interim", "run_label_qa", "split_records"]

log = logging.getLogger(__name__)

# a class needs one distinct text for each of train, val and test to be stratified; smaller ones go to train
MIN_STRATIFY_GROUPS = 3


@dataclass
class QaResult:
    """Everything label_qa produces: agreement, adjudicated splits, records needing review, metrics."""

    agreement: Agreement
    splits: dict[str, list[dict]]
    needs_review: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)


# --- input -------------------------------------------------------------------------------------------


def load_interim(path: str | Path, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Read and check the interim records; a bad one raises DataError naming file, line and key."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; expected the interim records written by the clean stage")
    records = read_jsonl(path)
    linenos = [lineno for lineno, _ in iter_jsonl_lines(path)]
    first_line: dict[str, int] = {}
    for record, lineno in zip(records, linenos, strict=True):
        where = f"{path}:{lineno}"
        check_record(record, tasks, where)
        if record["id"] in first_line:
            raise DataError(
                f"{where}: duplicate id {record['id']!r} (also on line {first_line[record['id']]})"
            )
        first_line[record["id"]] = lineno
    if not records:
        raise DataError(f"{path}: no records; expected the interim records written by the clean stage")
    return records


def check_record(record: dict, tasks: dict[str, TaskSpec], where: str) -> None:
    """Check one interim record against the records.py contract and the task labels."""
    for key in ("id", "text"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise DataError(f"{where}: key {key!r}: expected a non-empty string, got {record.get(key)!r}")
    if "split" in record and record["split"] not in SPLITS:
        raise DataError(f"{where}: key 'split': expected one of {', '.join(SPLITS)}, got {record['split']!r}")
    annotations = record.get("annotations")
    if not isinstance(annotations, dict) or not annotations:
        raise DataError(
            f"{where}: key 'annotations': expected a non-empty {{annotator: {{field: value}}}} map"
        )
    for annotator, labels in annotations.items():
        if not isinstance(labels, dict):
            raise DataError(f"{where}: key annotations.{annotator}: expected a {{field: value}} map")
        for task in tasks.values():
            value = labels.get(task.field)
            if value is not None:
                _check_value(
                    task, value, record["text"], f"{where}: key annotations.{annotator}.{task.field}"
                )


def _check_value(task: TaskSpec, value, text: str, where: str) -> None:
    if task.type != "extraction":
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: expected a non-empty string label, got {value!r}")
        if task.labels is not None and value not in task.labels:
            raise DataError(
                f"{where}: label {value!r} is not in params tasks labels ({', '.join(task.labels)})"
            )
        return
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of spans {{start, end, type}}, got {type(value).__name__}")
    for span in value:
        ok = isinstance(span, dict) and all(isinstance(span.get(k), int) for k in ("start", "end"))
        if (
            not ok
            or not isinstance(span.get("type"), str)
            or not 0 <= span["start"] < span["end"] <= len(text)
        ):
            raise DataError(
                f"{where}: bad span {span!r}; expected 0 <= start < end <= {len(text)} and a type"
            )
        if task.entity_types is not None and span["type"] not in task.entity_types:
            raise DataError(f"{where}: entity type {span['type']!r} is not in {', '.join(task.entity_types)}")


def select_annotators(records: list[dict], exclude: list[str], source: str) -> list[str]:
    """The annotators that take part in QA and votes: all of them minus label_qa.exclude_annotators."""
    known = sorted({a for record in records for a in record["annotations"]})
    unknown = [a for a in exclude if a not in known]
    if unknown:
        raise ParamsError(
            f"label_qa.exclude_annotators: unknown annotator(s) {', '.join(map(repr, unknown))}; "
            f"annotators in {source}: {', '.join(known)}"
        )
    kept = [a for a in known if a not in exclude]
    if not kept:
        raise ParamsError(
            f"label_qa.exclude_annotators leaves no annotator (all of {', '.join(known)} excluded)"
        )
    if exclude:
        log.info("excluded from QA and votes: %s; kept: %s", ", ".join(exclude), ", ".join(kept))
    return kept


def check_fields(records: list[dict], tasks: dict[str, TaskSpec], annotators: list[str], source: str) -> None:
    """Every task field must be labelled somewhere; a field nobody labelled is a params/data mismatch."""
    labelled = {
        f
        for r in records
        for a in annotators
        for f, v in r["annotations"].get(a, {}).items()
        if v is not None
    }
    for name, task in tasks.items():
        if task.field not in labelled:
            raise DataError(
                f"{source}: no record has field {task.field!r} (params tasks.{name}.field) from annotators "
                f"{', '.join(annotators)}; remove the task from params tasks or map a column onto it in fetch"
            )


def check_stratify_by(stratify_by: str | None, tasks: dict[str, TaskSpec]) -> None:
    """label_qa.stratify_by must name a classification field (or be null)."""
    fields = [t.field for t in tasks.values() if t.type == "classification"]
    if stratify_by is not None and stratify_by not in fields:
        raise ParamsError(
            f"label_qa.stratify_by={stratify_by!r} is not a classification field of params tasks; "
            f"use one of {', '.join(fields) or '(none)'} or null"
        )


# --- adjudication ------------------------------------------------------------------------------------


def majority_label(votes: list[str]) -> str | None:
    """The label more than half of the votes give, or None (tie / no strict majority)."""
    if not votes:
        return None
    label, count = Counter(votes).most_common(1)[0]
    return label if 2 * count > len(votes) else None


def majority_spans(span_lists: list[list[dict]], text: str) -> list[dict]:
    """Spans (start, end, type) more than half of the annotators marked, with their text filled in."""
    votes = Counter(key for spans in span_lists for key in {(s["start"], s["end"], s["type"]) for s in spans})
    winners = sorted((k for k, c in votes.items() if 2 * c > len(span_lists)), key=lambda k: (-votes[k], k))
    # winners can overlap only if an annotator marked overlapping spans; keep the best supported one
    chosen: list[tuple[int, int, str]] = []
    for start, end, kind in winners:
        if all(end <= s or start >= e for s, e, _ in chosen):
            chosen.append((start, end, kind))
    return [entity(s, e, kind, text[s:e]) for s, e, kind in sorted(chosen)]


def adjudicate(
    record: dict, tasks: dict[str, TaskSpec], annotators: list[str]
) -> tuple[dict | None, dict | None]:
    """(processed record, None) when every layer is decided, else (None, needs-review record)."""
    processed: dict = {"id": record["id"], "text": record["text"]}
    unresolved: dict[str, str] = {}
    labels = {a: record["annotations"][a] for a in annotators if a in record["annotations"]}
    for task in tasks.values():
        given = {a: lab[task.field] for a, lab in labels.items() if lab.get(task.field) is not None}
        values = list(given.values())
        if not values:
            unresolved[task.field] = "no annotator labelled this field"
        elif task.type == "extraction":
            processed[task.field] = majority_spans(values, record["text"])
        elif task.type == "classification":
            winner = majority_label(values)
            if winner is None:
                unresolved[task.field] = "no strict majority: " + ", ".join(
                    f"{a}={v}" for a, v in given.items()
                )
            else:
                processed[task.field] = winner
        else:  # generation: free text is not voted on label by label; the most common wording wins
            processed[task.field] = Counter(values).most_common(1)[0][0]
    if not unresolved:
        return processed, None
    review = {
        "id": record["id"],
        "text": record["text"],
        "unresolved": unresolved,
        "annotations": record["annotations"],  # every annotator's labels, excluded ones too
    }
    return None, review


# --- the stage ---------------------------------------------------------------------------------------


def label_qa(records: list[dict], params: StageParams, source: str = "input") -> QaResult:
    """Agreement gate, adjudication and split of interim records (raises AgreementGateError on a fail)."""
    cfg, tasks = params.section, params.tasks
    check_stratify_by(cfg.stratify_by, tasks)
    annotators = select_annotators(records, cfg.exclude_annotators, source)
    check_fields(records, tasks, annotators, source)

    agreement = measure_agreement(records, tasks, annotators, cfg.kappa_threshold)
    check_gate(agreement, cfg.on_fail)

    adjudicated, originals, review = [], [], []
    for record in records:
        processed, needs_review = adjudicate(record, tasks, annotators)
        if processed is None:
            review.append(needs_review)
        else:
            adjudicated.append(processed)
            originals.append(record)
    if not adjudicated:
        raise DataError(f"{source}: no record could be adjudicated ({len(review)} need review)")
    log.info("adjudicated %d records; %d need review (no strict majority)", len(adjudicated), len(review))

    given = [r.get("split") for r in originals]
    split_metrics: dict[str, float | str] = {"split_given": int(any(g is not None for g in given))}
    if split_metrics["split_given"]:
        splits, carved = split_given(adjudicated, given, cfg.val_fraction, params.seed, cfg.split_key)
        split_metrics["val_carved_from_train"] = int(carved)
        log.info("kept the dataset's own split%s", "; val carved from train" if carved else "")
    else:
        splits = split_records(adjudicated, cfg.val_fraction, cfg.test_fraction, params.seed, cfg.split_key)
    if cfg.train_per_label is not None:
        if cfg.stratify_by is None:
            raise DataError("label_qa.train_per_label needs label_qa.stratify_by: the label to cap per")
        splits["train"], capped = cap_per_label(
            splits["train"], cfg.stratify_by, cfg.train_per_label, params.seed, cfg.split_key
        )
        split_metrics["train_left_out_by_cap"] = capped
        log.info("label_qa.train_per_label=%d: %d train records left out", cfg.train_per_label, capped)
    if cfg.stratify_by is not None:
        split_metrics.update(label_deviation(splits, cfg.stratify_by))
    split_metrics.update(split_fingerprint(splits["test"]))
    metrics: dict[str, float | str] = {
        "records_in": len(records),
        "adjudicated": len(adjudicated),
        "needs_review": len(review),
        **{f"{name}_records": len(splits[name]) for name in SPLITS},
        **{f"{name}_share": round(len(splits[name]) / len(adjudicated), 4) for name in SPLITS},
        **split_metrics,
        **agreement.metrics(),
    }
    if not agreement.skipped:
        metrics.update(annotator_agreement(originals, adjudicated, tasks, annotators))
    return QaResult(agreement=agreement, splits=splits, needs_review=review, metrics=metrics)


def run_label_qa(
    in_path: str | Path,
    out_dir: str | Path,
    needs_review_path: str | Path,
    reports: str | Path,
    params: StageParams,
) -> dict[str, float]:
    """Run the stage on files: read interim records, write splits, needs_review, metrics and plots."""
    records = load_interim(in_path, params.tasks)
    log.info("read %d interim records from %s", len(records), in_path)
    reports = Path(reports)
    try:
        result = label_qa(records, params, source=str(in_path))
    except AgreementGateError as e:
        # the reports show why the gate failed; the data outputs are not written
        write_reports(
            reports, e.agreement, {"records_in": len(records), **e.agreement.metrics()}, None, params
        )
        raise
    for name in SPLITS:
        write_jsonl(Path(out_dir) / f"{name}.jsonl", result.splits[name])
    write_jsonl(needs_review_path, result.needs_review)
    write_reports(reports, result.agreement, result.metrics, result.splits, params)
    log.info(
        "wrote train/val/test = %d/%d/%d records to %s; %d to %s",
        *(len(result.splits[name]) for name in SPLITS),
        out_dir,
        len(result.needs_review),
        needs_review_path,
    )
    return result.metrics
