"""Stats (reports/fetch/metrics.json) and the manifest (data/raw/manifest.json) of a fetch run."""

from __future__ import annotations

import os
from collections import Counter

from ..config import StageParams, TaskSpec
from ..io import sha256_file
from ..language import script_mix

VIOLATION_LABEL = "violation"


def majority(values: list) -> object:
    """Most frequent value (ties: the smallest by repr, so the result does not depend on order)."""
    counts = Counter(repr(v) for v in values)
    best = max(counts.values())
    key = min(k for k, c in counts.items() if c == best)
    return next(v for v in values if repr(v) == key)


def _voted(records: list[dict], field: str) -> list:
    """Per record, the majority label of `field` over the annotators that gave one."""
    out = []
    for record in records:
        annotations = (record.get("annotations") or {}).values()
        values = [a[field] for a in annotations if isinstance(a, dict) and a.get(field) is not None]
        if values:
            out.append(majority(values))
    return out


def summarize(records: list[dict], tasks: dict[str, TaskSpec], seconds: float) -> dict:
    """Flat metrics: size, variety, script mix (CJK / Latin letters), label balance and annotators of the records."""
    stats: dict[str, float | int] = {
        "records": len(records),
        "distinct_texts": len({r["text"] for r in records if isinstance(r.get("text"), str)}),
        "malformed_records": sum(1 for r in records if "_error" in r),
        "n_annotators": len({name for r in records for name in r.get("annotations") or {}}),
        # which writing systems the data uses: clean and augment warn when Chinese-only settings meet Latin
        **script_mix(r.get("text") for r in records).metrics(),
    }
    extraction = next((t for t in tasks.values() if t.type == "extraction"), None)
    if extraction is not None:
        annotations = [a for r in records for a in (r.get("annotations") or {}).values()]
        counts = [
            len(a[extraction.field])
            for a in annotations
            if isinstance(a, dict) and isinstance(a.get(extraction.field), list)
        ]
        if counts:
            stats["entities_per_record"] = round(sum(counts) / len(counts), 4)
    compliance = tasks.get("compliance")
    if compliance is not None and (voted := _voted(records, compliance.field)):
        stats["violation_share"] = round(sum(v == VIOLATION_LABEL for v in voted) / len(voted), 4)
    intent = tasks.get("intent")
    if intent is not None and (voted := Counter(_voted(records, intent.field))):
        stats["rarest_intent_count"] = min(voted.get(label, 0) for label in intent.labels or list(voted))
    stats["generation_seconds"] = round(seconds, 3)
    return stats


def build_manifest(
    params: StageParams, records_path: str | os.PathLike, records: list[dict], version: str
) -> dict:
    """What was fetched, from where, with which params, and the hash of the records file."""
    section = params.section
    return {
        "source": section.source,
        "records": len(records),
        "sha256": sha256_file(records_path),
        "generator_version": version,
        "seed": params.seed,
        "params": {"source": section.source, section.source: getattr(section, section.source).model_dump()},
        "source_counts": dict(sorted(Counter(str(r.get("source")) for r in records).items())),
    }
