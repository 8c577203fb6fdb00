"""Agreement statistics for label_qa: Cohen's kappa per annotator pair, Fleiss' kappa, the kappa gate.

A *layer* is one label field of params `tasks` that agreement is measured on: each classification field
(one label per record) and the extraction field (character-level BIO tags over all records' characters,
concatenated). Generation fields are free text and are not agreement-checked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from sklearn.metrics import cohen_kappa_score

from .config.data import TaskSpec
from .records import spans_to_bio

log = logging.getLogger(__name__)

AGREEMENT_TYPES = ("classification", "extraction")


class AgreementGateError(RuntimeError):
    """Cohen's kappa of some annotator pair is below label_qa.kappa_threshold (on_fail: error)."""

    def __init__(self, message: str, agreement: Agreement):
        super().__init__(message)
        self.agreement = agreement


@dataclass
class Agreement:
    """Agreement between annotators: Cohen's kappa per layer and pair, Fleiss' kappa per layer."""

    annotators: list[str]
    threshold: float
    kappas: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    fleiss: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    def failures(self) -> list[tuple[str, str, str, float]]:
        """(layer, annotator a, annotator b, kappa) for each pair below the threshold, worst first."""
        weak = [
            (layer, a, b, k)
            for layer, pairs in self.kappas.items()
            for (a, b), k in pairs.items()
            if k < self.threshold
        ]
        return sorted(weak, key=lambda f: f[3])

    def metrics(self) -> dict[str, float]:
        """Flat metrics: kappa_<layer>_<a>_<b>, fleiss_<layer>, min_kappa, kappa_skipped, gate_passed."""
        out: dict[str, float] = {"annotators": len(self.annotators), "kappa_skipped": int(self.skipped)}
        for layer, pairs in self.kappas.items():
            for (a, b), k in pairs.items():
                out[f"kappa_{layer}_{a}_{b}"] = round(k, 4)
        for layer, k in self.fleiss.items():
            out[f"fleiss_{layer}"] = round(k, 4)
        all_kappas = [k for pairs in self.kappas.values() for k in pairs.values()]
        if all_kappas:
            out["min_kappa"] = round(min(all_kappas), 4)
        out["gate_passed"] = int(not self.failures())
        return out


def agreement_layers(tasks: dict[str, TaskSpec]) -> list[TaskSpec]:
    """The tasks whose field is agreement-checked (classification and extraction), one per field."""
    layers: dict[str, TaskSpec] = {}
    for task in tasks.values():
        if task.type in AGREEMENT_TYPES:
            layers.setdefault(task.field, task)
    return list(layers.values())


def layer_sequences(records: Iterable[dict], task: TaskSpec, annotators: list[str]) -> dict[str, list]:
    """Per annotator, its labels of one layer item by item (records, or characters for extraction).

    None marks an item the annotator did not label, so the sequences of all annotators stay aligned.
    """
    seqs: dict[str, list] = {a: [] for a in annotators}
    for record in records:
        n_chars = len(record["text"])
        for a in annotators:
            value = record["annotations"].get(a, {}).get(task.field)
            if task.type == "classification":
                seqs[a].append(value)
            elif value is None:
                seqs[a].extend([None] * n_chars)
            else:
                seqs[a].extend(spans_to_bio(n_chars, value))
    return seqs


def cohen_kappa(y1: list, y2: list) -> float:
    """Cohen's kappa of two aligned label lists (sklearn), 1.0 when both use one and the same label."""
    if not y1:
        raise ValueError("cohen_kappa needs at least one item labelled by both annotators")
    # sklearn returns nan here (chance agreement is 1, so kappa is 0/0); two raters who gave every item
    # the same single label agree perfectly, and a nan would silently pass or fail the gate.
    if len(set(y1) | set(y2)) == 1:
        return 1.0
    return float(cohen_kappa_score(y1, y2))


def both_labelled(x: list, y: list) -> tuple[list, list]:
    """The items of two aligned sequences that both annotators labelled."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def pairwise_kappas(seqs: dict[str, list], layer: str) -> dict[tuple[str, str], float]:
    """Cohen's kappa for every annotator pair, over the items both labelled."""
    out = {}
    for a, b in combinations(sorted(seqs), 2):
        x, y = both_labelled(seqs[a], seqs[b])
        if not x:
            log.warning(
                "layer %s: annotators %s and %s share no labelled item; kappa not computed", layer, a, b
            )
            continue
        out[(a, b)] = cohen_kappa(x, y)
    return out


def fleiss_kappa(table) -> float:
    """Fleiss' kappa of an items x categories table of rating counts (every row sums to the same n >= 2).

    kappa = (P - Pe) / (1 - Pe), where P is the mean over items of the share of agreeing rater pairs,
    P_i = (sum_j n_ij^2 - n) / (n (n - 1)), and Pe = sum_j p_j^2 with p_j the share of all ratings in j.
    """
    counts = np.asarray(table, dtype=float)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("fleiss_kappa needs a non-empty items x categories table")
    per_item = counts.sum(axis=1)
    n = per_item[0]
    if n < 2 or not np.all(per_item == n):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every item")
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = float(p_i.mean()), float((p_j**2).sum())
    if math.isclose(p_e, 1.0):
        return 1.0  # one category used throughout: complete (if uninformative) agreement
    return (p_bar - p_e) / (1.0 - p_e)


def fleiss_from_sequences(seqs: dict[str, list]) -> float | None:
    """Fleiss' kappa over the items every annotator labelled; None if there are none (or < 2 annotators)."""
    if len(seqs) < 2:
        return None
    rows = [items for items in zip(*seqs.values(), strict=True) if None not in items]
    if not rows:
        return None
    index = {c: i for i, c in enumerate(sorted({x for row in rows for x in row}))}
    table = np.zeros((len(rows), len(index)))
    for i, row in enumerate(rows):
        for label in row:
            table[i, index[label]] += 1
    return fleiss_kappa(table)


def measure_agreement(
    records: list[dict], tasks: dict[str, TaskSpec], annotators: list[str], threshold: float
) -> Agreement:
    """Cohen's kappa for every pair and Fleiss' kappa on every layer; skipped with a single annotator."""
    agreement = Agreement(annotators=annotators, threshold=threshold)
    if len(annotators) < 2:
        log.info("single annotator (%s): kappa needs two or more; agreement skipped", ", ".join(annotators))
        agreement.skipped = True
        return agreement
    for task in agreement_layers(tasks):
        seqs = layer_sequences(records, task, annotators)
        agreement.kappas[task.field] = pairwise_kappas(seqs, task.field)
        fleiss = fleiss_from_sequences(seqs)
        if fleiss is not None:
            agreement.fleiss[task.field] = fleiss
        pairs = ", ".join(f"{a}/{b}={k:.3f}" for (a, b), k in agreement.kappas[task.field].items())
        log.info("layer %s: Cohen's kappa %s; Fleiss' kappa %s", task.field, pairs, _fmt(fleiss))
    return agreement


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def weakest_annotator(agreement: Agreement) -> str:
    """The annotator with the lowest mean kappa over all its pairs and layers (the likely culprit)."""
    kappas: dict[str, list[float]] = {a: [] for a in agreement.annotators}
    for pairs in agreement.kappas.values():
        for (a, b), k in pairs.items():
            kappas[a].append(k)
            kappas[b].append(k)
    return min((a for a in agreement.annotators if kappas[a]), key=lambda a: sum(kappas[a]) / len(kappas[a]))


def gate_message(agreement: Agreement, on_fail: str = "error") -> str:
    """What failed (layers, pairs, kappas) and how to proceed."""
    failures = agreement.failures()
    listed = "; ".join(f"layer {layer}: {a}/{b} kappa={k:.3f}" for layer, a, b, k in failures)
    suspect = weakest_annotator(agreement)
    warn = "; or set label_qa.on_fail: warn to continue with the data as it is" if on_fail == "error" else ""
    return (
        f"label_qa gate failed: Cohen's kappa below label_qa.kappa_threshold={agreement.threshold} for "
        f"{len(failures)} annotator pair(s): {listed}. Remedy: fix or re-annotate those labels; or leave the "
        f"weak annotator out with label_qa.exclude_annotators: [{suspect}] "
        f"(e.g. dvc exp run -S 'label_qa.exclude_annotators=[{suspect}]'){warn}."
    )


def check_gate(agreement: Agreement, on_fail: str) -> None:
    """Raise AgreementGateError if a pair is below the threshold (on_fail=error); log a warning if warn."""
    if not agreement.failures():
        return
    message = gate_message(agreement, on_fail)
    if on_fail == "error":
        raise AgreementGateError(message, agreement)
    log.warning("%s (on_fail=warn: continuing; gate_passed=0 in metrics)", message)


def annotator_agreement(
    records: list[dict], adjudicated: list[dict], tasks: dict[str, TaskSpec], annotators: list[str]
) -> dict[str, float]:
    """Each annotator's accuracy and Cohen's kappa against the adjudicated labels, per layer.

    `records` are the interim records behind `adjudicated` (same order).
    """
    out: dict[str, float] = {}
    as_annotated = [{"text": p["text"], "annotations": {"adjudicated": p}} for p in adjudicated]
    for task in agreement_layers(tasks):
        gold = layer_sequences(as_annotated, task, ["adjudicated"])["adjudicated"]
        seqs = layer_sequences(records, task, annotators)
        for a in annotators:
            x, y = both_labelled(seqs[a], gold)
            if not x:
                continue
            out[f"agreement_{a}_{task.field}_accuracy"] = round(
                sum(p == q for p, q in zip(x, y, strict=True)) / len(x), 4
            )
            out[f"agreement_{a}_{task.field}_kappa"] = round(cohen_kappa(x, y), 4)
    return out
