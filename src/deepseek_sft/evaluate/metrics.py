"""Task metrics: classification (scikit-learn), entity extraction (exact span+type; seqeval cross-check),
BLEU/chrF (sacrebleu) and perplexity from summed token losses.

Pure functions over plain Python values, so they are tested against hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sacrebleu
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.metrics import precision_score as seqeval_precision
from seqeval.metrics import recall_score as seqeval_recall
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from ..records import bio_to_spans, spans_to_bio

# A prediction that could not be parsed is its own class: counted wrong, visible in the confusion matrix.
UNPARSEABLE = "<unparseable>"


def label_order(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """Known labels first (params order), then any other gold/predicted label sorted, `<unparseable>` last."""
    known = list(labels) if labels else sorted(set(gold))
    extra = sorted((set(gold) | set(pred)) - set(known) - {UNPARSEABLE})
    tail = [UNPARSEABLE] if UNPARSEABLE in set(pred) else []
    return [*known, *extra, *tail]


def classification_metrics(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, macro/weighted P/R/F1, per-class report and confusion matrix.

    Averages run over the real labels that occur in gold or pred (a params label absent from both
    would only add 0/0), so `<unparseable>` lowers recall/accuracy without becoming a class itself.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    order = label_order(gold, pred, labels)
    seen = set(gold) | set(pred)
    scored = [lab for lab in order if lab != UNPARSEABLE and lab in seen]
    out: dict = {"n": len(gold), "accuracy": float(accuracy_score(gold, pred)) if gold else 0.0}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=scored, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=scored, average=None, zero_division=0)
    out["per_class"] = {
        lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, lab in enumerate(scored)
    }
    out["unparseable_rate"] = sum(1 for x in pred if x == UNPARSEABLE) / len(pred) if pred else 0.0
    out["confusion"] = {"labels": order, "matrix": confusion_matrix(gold, pred, labels=order).tolist()}
    return out


def canonical_spans(text_len: int, spans: Sequence[dict]) -> list[dict]:
    """Spans as character BIO can hold them: in order, overlaps and duplicates dropped (first wins).

    Both the exact-set metric and seqeval see these, which is what makes the two agree exactly.
    """
    clipped = [s for s in spans if 0 <= s["start"] < s["end"] <= text_len]
    return bio_to_spans(spans_to_bio(text_len, clipped))


def span_key(span: dict) -> tuple[int, int, str]:
    """The identity of an entity for exact matching: (start, end, type)."""
    return (int(span["start"]), int(span["end"]), str(span["type"]))


def entity_counts(gold: Sequence[dict], pred: Sequence[dict], extra_fp: int = 0) -> dict[str, int]:
    """True positives, false positives and false negatives of one record under exact span-and-type match."""
    g, p = {span_key(s) for s in gold}, {span_key(s) for s in pred}
    return {"tp": len(g & p), "fp": len(p - g) + extra_fp, "fn": len(g - p)}


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 from counts (0 when undefined)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_metrics(
    texts: Sequence[str],
    gold: Sequence[Sequence[dict]],
    pred: Sequence[Sequence[dict]],
    extra_fp: Sequence[int] | None = None,
) -> dict:
    """Entity-level micro P/R/F1 (exact span and type), per-type P/R/F1 and record-level exact match.

    `extra_fp[i]` adds predictions of record i that have no span (surface not found in the text, or an
    unparseable answer), so they cost precision instead of vanishing.
    """
    extra_fp = extra_fp or [0] * len(texts)
    totals = {"tp": 0, "fp": 0, "fn": 0}
    per_type: dict[str, dict[str, int]] = {}
    exact = 0
    for text, g, p, extra in zip(texts, gold, pred, extra_fp, strict=True):
        g, p = canonical_spans(len(text), g), canonical_spans(len(text), p)
        counts = entity_counts(g, p, extra)
        exact += counts["fp"] == 0 and counts["fn"] == 0
        for key in totals:
            totals[key] += counts[key]
        for kind in {s["type"] for s in g} | {s["type"] for s in p}:
            c = entity_counts([s for s in g if s["type"] == kind], [s for s in p if s["type"] == kind])
            bucket = per_type.setdefault(kind, {"tp": 0, "fp": 0, "fn": 0})
            for key in bucket:
                bucket[key] += c[key]
    out: dict = {"n": len(texts), **prf(**totals), **totals}
    out["exact_match"] = exact / len(texts) if texts else 0.0
    out["per_type"] = {k: {**prf(**v), "support": v["tp"] + v["fn"]} for k, v in sorted(per_type.items())}
    return out


def seqeval_entity_metrics(
    texts: Sequence[str], gold: Sequence[Sequence[dict]], pred: Sequence[Sequence[dict]]
):
    """The same entity P/R/F1 computed by seqeval on character-level BIO tags (cross-check)."""
    y_true = [spans_to_bio(len(t), canonical_spans(len(t), g)) for t, g in zip(texts, gold, strict=True)]
    y_pred = [spans_to_bio(len(t), canonical_spans(len(t), p)) for t, p in zip(texts, pred, strict=True)]
    return {
        "precision": float(seqeval_precision(y_true, y_pred, zero_division=0)),
        "recall": float(seqeval_recall(y_true, y_pred, zero_division=0)),
        "f1": float(seqeval_f1(y_true, y_pred, zero_division=0)),
    }


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's Chinese tokenisation (characters for CJK)."""
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="zh").score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100), character n-gram F-score (language-agnostic, fits Chinese)."""
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); inf when nothing was scored."""
    if n_tokens <= 0:
        return math.inf
    return math.exp(nll_sum / n_tokens)
