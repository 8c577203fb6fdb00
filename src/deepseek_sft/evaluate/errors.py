"""Error taxonomy: unparseable answers, semantic confusion (label pairs), entity boundary/type/missed/spurious
errors, and long-tail behaviour (per-class F1 against the class's frequency in train)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .metrics import UNPARSEABLE, canonical_spans, span_key

ENTITY_KINDS = ("boundary", "type", "boundary_type", "missed", "spurious", "not_in_text")


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def _with_text(span: dict, text: str) -> dict:
    return {
        "start": span["start"],
        "end": span["end"],
        "type": span["type"],
        "text": text[span["start"] : span["end"]],
    }


def classify_pred_span(pred: dict, golds: Sequence[dict]) -> tuple[str, dict | None]:
    """Error kind of a predicted span that is not an exact match, and the gold span it is judged against.

    same span, other type -> type; overlapping, same type -> boundary; overlapping, other type and
    boundaries -> boundary_type; no overlap -> spurious.
    """
    overlapping = [g for g in golds if _overlaps(pred, g)]
    same_span = [g for g in overlapping if (g["start"], g["end"]) == (pred["start"], pred["end"])]
    if same_span:
        return "type", same_span[0]
    same_type = [g for g in overlapping if g["type"] == pred["type"]]
    if same_type:
        return "boundary", same_type[0]
    if overlapping:
        return "boundary_type", overlapping[0]
    return "spurious", None


def entity_errors(
    text: str, gold: Sequence[dict], pred: Sequence[dict], unlocated: Sequence = ()
) -> list[dict]:
    """Every entity error of one record: each wrong predicted span, each gold span nothing touched.

    A gold span that a wrong prediction overlaps is reported through that prediction (boundary/type),
    not again as missed. Predicted items whose surface is not in the text are `not_in_text`.
    """
    gold_c, pred_c = canonical_spans(len(text), gold), canonical_spans(len(text), pred)
    gold_keys = {span_key(s) for s in gold_c}
    exact = {span_key(s) for s in pred_c} & gold_keys
    errors, touched = [], set()
    for p in pred_c:
        if span_key(p) in exact:
            continue
        kind, g = classify_pred_span(p, gold_c)
        if g is not None:
            touched.add(span_key(g))
        errors.append({"kind": kind, "pred": _with_text(p, text), "gold": _with_text(g, text) if g else None})
    for g in gold_c:
        if span_key(g) not in exact and span_key(g) not in touched:
            errors.append({"kind": "missed", "pred": None, "gold": _with_text(g, text)})
    for item in unlocated:
        errors.append({"kind": "not_in_text", "pred": {"type": item[0], "text": item[1]}, "gold": None})
    return errors


def entity_error_examples(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Entity errors of parseable extraction rows grouped by kind, each with its record id and text."""
    out: dict[str, list[dict]] = {k: [] for k in ENTITY_KINDS}
    for r in rows:
        if not r["ok"]:
            continue  # reported in unparseable.jsonl
        for err in entity_errors(r["text"], r["gold"], r["pred"], r.get("unlocated", ())):
            out[err["kind"]].append(
                {"id": r["id"], "task": r["task"], "text": r["text"], "answer": r["answer"], **err}
            )
    return out


def confused_pairs(gold: Sequence[str], pred: Sequence[str], top: int = 10) -> list[dict]:
    """Most frequent (gold -> predicted) confusions between real labels (unparseable excluded), with
    the count in the other direction, so symmetric confusions of similar intents stand out."""
    directed = Counter((g, p) for g, p in zip(gold, pred, strict=True) if g != p and p != UNPARSEABLE)
    pairs = [
        {
            "gold": g,
            "pred": p,
            "count": c,
            "reverse_count": directed.get((p, g), 0),
            "pair_total": c + directed.get((p, g), 0),
        }
        for (g, p), c in directed.items()
    ]
    pairs.sort(key=lambda x: (-x["pair_total"], -x["count"], x["gold"], x["pred"]))
    return pairs[:top]


def classification_error_examples(rows: Sequence[dict]) -> list[dict]:
    """Wrong answers of parseable classification rows (the confusion examples)."""
    keep = ("id", "task", "text", "gold", "pred", "answer")
    return [{k: r[k] for k in keep} for r in rows if r["ok"] and not r["correct"]]


def unparseable_rows(rows: Sequence[dict]) -> list[dict]:
    """Every answer that did not parse (all tasks), with the parser's reason; none is ever dropped."""
    keep = ("id", "task", "type", "text", "answer", "error")
    return [{k: r[k] for k in keep} | {"gold": r.get("reference", r["gold"])} for r in rows if not r["ok"]]


def long_tail(per_class: dict[str, dict], train_counts: Counter) -> list[dict]:
    """Per-class F1 and support next to the class's train frequency, rarest class first."""
    rows = [
        {"label": lab, "train_count": int(train_counts.get(lab, 0)), "f1": m["f1"], "support": m["support"]}
        for lab, m in per_class.items()
    ]
    return sorted(rows, key=lambda r: (r["train_count"], r["label"]))


def frequency_buckets(table: Sequence[dict]) -> dict[str, float]:
    """Mean F1 of the rarest third (tail) and the most frequent third (head) of classes, at least one each."""
    if not table:
        return {}
    k = max(1, len(table) // 3)
    return {"f1_tail": sum(r["f1"] for r in table[:k]) / k, "f1_head": sum(r["f1"] for r in table[-k:]) / k}
