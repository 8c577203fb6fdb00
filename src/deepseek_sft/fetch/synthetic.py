"""Source `synthetic`: a seeded generator of Chinese financial customer-service requests.

Each record is composed as opener + body (+ compliance or near-miss clause, before or after) + closer,
with an occasional filler inside the body. Bodies come from per-intent templates whose slots are filled
from composed entity pools (synthetic_pools); entity spans are tracked while the text is assembled, so
offsets are exact. Intents follow a Zipf-like long tail (exponent ZIPF_EXPONENT over FREQUENCY_RANK) with
exact quotas; about VIOLATION_SHARE of the records carry a violation clause, independent of intent.
Every record is labelled by each simulated annotator (annotators.py); the true labels are kept in
meta.truth for analysis only (label_qa never reads them).
"""

from __future__ import annotations

import random
import re

from ..config import ParamsError, StageParams, TaskSpec
from ..records import entity
from .annotators import LayerSpec, SimulatedAnnotator, confusable_map
from .synthetic_pools import SLOTS
from .synthetic_templates import (
    CLOSERS,
    CONFUSABLE_PAIRS,
    FILLERS,
    FREQUENCY_RANK,
    INTENT_TEMPLATES,
    NEAR_MISSES,
    OPENERS,
    VIOLATIONS,
)

VERSION = "synthetic-1"  # bump when the generator's output for a given seed changes
ZIPF_EXPONENT = 1.1  # rank-frequency exponent: 6000 records -> head ~1880, rarest ~70
VIOLATION_SHARE = 0.2
NEAR_MISS_SHARE = 0.1  # compliant records that carry a look-alike clause (hard negatives)
FILLER_SHARE = 0.2
MIN_PER_INTENT = 3  # so that a stratified train/val/test split can place every class
COMPLIANCE_LABELS = ("compliant", "violation")
ENTITY_TYPES = ("ORG", "PER", "MONEY", "DATE", "PRODUCT")

_CHOICE = re.compile(r"\[([^\[\]]*)\]")
_SLOT = re.compile(r"\{(\w+)\}")

Segment = tuple[str, str | None]  # (text, entity type or None)


def fetch_records(params: StageParams) -> list[dict]:
    """Generate `fetch.synthetic.num_records` annotated records from the global seed."""
    cfg = params.section.synthetic
    return generate(cfg.num_records, params.seed, cfg.annotator_error_rates, layer_spec(params.tasks))


def layer_spec(tasks: dict[str, TaskSpec]) -> LayerSpec:
    """Field names and labels of the layers, from params `tasks` (checked against what we can generate)."""
    intent, compliance, entities = tasks.get("intent"), tasks.get("compliance"), tasks.get("entities")
    labels = tuple(intent.labels) if intent and intent.labels else tuple(FREQUENCY_RANK)
    unknown = [label for label in labels if label not in INTENT_TEMPLATES]
    if unknown:
        raise ParamsError(
            f"tasks.intent.labels: the synthetic generator has no templates for {', '.join(unknown)}; "
            f"known: {', '.join(FREQUENCY_RANK)} (use fetch.source local/hf for other label sets)"
        )
    if compliance and compliance.labels and sorted(compliance.labels) != sorted(COMPLIANCE_LABELS):
        raise ParamsError(
            f"tasks.compliance.labels: the synthetic generator emits exactly {list(COMPLIANCE_LABELS)}"
        )
    types = tuple(entities.entity_types) if entities and entities.entity_types else ENTITY_TYPES
    bad_types = [t for t in types if t not in ENTITY_TYPES]
    if bad_types:
        raise ParamsError(
            f"tasks.entities.entity_types: unknown to the synthetic generator: {', '.join(bad_types)}"
        )
    return LayerSpec(
        intent_field=intent.field if intent else "intent",
        intent_labels=labels,
        compliance_field=compliance.field if compliance else "compliance",
        compliance_labels=COMPLIANCE_LABELS,
        entities_field=entities.field if entities else "entities",
        entity_types=types,
    )


def generate(num_records: int, seed: int, error_rates: dict[str, float], spec: LayerSpec) -> list[dict]:
    """The corpus: `num_records` records, identical for identical arguments."""
    rng = random.Random(f"{seed}:synthetic")
    intents = intent_sequence(spec.intent_labels, num_records, rng)
    violating = set(rng.sample(range(num_records), round(num_records * VIOLATION_SHARE)))
    confusable = confusable_map(CONFUSABLE_PAIRS, spec.intent_labels)
    annotators = [
        SimulatedAnnotator(name, rate, seed, spec, confusable) for name, rate in error_rates.items()
    ]
    width = max(6, len(str(num_records)))
    records = []
    for i, intent in enumerate(intents):
        record = make_record(rng, intent, i in violating, spec)
        record["id"] = f"syn-{i + 1:0{width}d}"
        truth = record["meta"]["truth"]
        record["annotations"] = {a.name: a.annotate(record["text"], truth) for a in annotators}
        records.append(record)
    return records


def intent_counts(labels: tuple[str, ...], n: int) -> dict[str, int]:
    """Exact per-intent quotas: a Zipf-like tail over FREQUENCY_RANK, largest-remainder rounding."""
    ranked = [label for label in FREQUENCY_RANK if label in labels]
    floor = min(MIN_PER_INTENT, n // len(ranked))
    rest = n - floor * len(ranked)
    weights = [1.0 / (rank**ZIPF_EXPONENT) for rank in range(1, len(ranked) + 1)]
    raw = [rest * w / sum(weights) for w in weights]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(ranked)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: rest - sum(counts)]:
        counts[i] += 1
    return {label: floor + c for label, c in zip(ranked, counts, strict=True)}


def intent_sequence(labels: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """The intents of the n records in a seeded random order."""
    sequence = [label for label, count in intent_counts(labels, n).items() for _ in range(count)]
    rng.shuffle(sequence)
    return sequence


def make_record(rng: random.Random, intent: str, violation: bool, spec: LayerSpec) -> dict:
    """One record (without id and annotations): text, true labels and how it was built."""
    templates = INTENT_TEMPLATES[intent]
    template_id = rng.randrange(len(templates))
    body = render(with_filler(resolve_choices(templates[template_id], rng), rng), rng)
    clause, clause_id = pick_clause(rng, violation)
    if clause and rng.random() < 0.3:
        segments = [*clause, ("。" if rng.random() < 0.5 else "，", None), *body]
    elif clause:
        segments = [*body, (rng.choice(["，", "。", "。另外，", "，还有，"]), None), *clause]
    else:
        segments = body
    segments = [(rng.choice(OPENERS), None), *segments, (rng.choice(CLOSERS), None)]
    text, spans = assemble(segments, spec.entity_types)
    truth = {
        spec.intent_field: intent,
        spec.compliance_field: spec.compliance_labels[1] if violation else spec.compliance_labels[0],
        spec.entities_field: spans,
    }
    meta = {"template": f"{intent}/{template_id:02d}", "clause": clause_id, "truth": truth}
    return {"id": "", "text": text, "source": "synthetic", "annotations": {}, "meta": meta}


def pick_clause(rng: random.Random, violation: bool) -> tuple[list[Segment], str | None]:
    """A violation clause (if `violation`), sometimes a near-miss clause, else nothing."""
    if violation:
        kinds = list(VIOLATIONS)
        kind = kinds[rng.randrange(len(kinds))]
        k = rng.randrange(len(VIOLATIONS[kind]))
        return render(VIOLATIONS[kind][k], rng), f"violation:{kind}/{k}"
    if rng.random() < NEAR_MISS_SHARE:
        k = rng.randrange(len(NEAR_MISSES))
        return render(NEAR_MISSES[k], rng), f"near_miss/{k}"
    return [], None


def resolve_choices(template: str, rng: random.Random) -> str:
    """Replace each [a|b|c] group by one of its alternatives."""
    return _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def with_filler(template: str, rng: random.Random) -> str:
    """Sometimes insert a filler word after one of the body's commas."""
    commas = [i for i, ch in enumerate(template) if ch == "，"]
    if not commas or rng.random() >= FILLER_SHARE:
        return template
    at = commas[rng.randrange(len(commas))] + 1
    return template[:at] + rng.choice(FILLERS) + template[at:]


def render(template: str, rng: random.Random) -> list[Segment]:
    """Fill {SLOT}s from the entity pools; return text segments tagged with their entity type."""
    template = resolve_choices(template, rng)
    parts = _SLOT.split(template)
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                segments.append((part, None))
            continue
        kind, make = SLOTS[part]
        segments.append((make(rng), kind))
    return segments


def assemble(segments: list[Segment], entity_types: tuple[str, ...]) -> tuple[str, list[dict]]:
    """Concatenate segments into the text and the spans of its (allowed) entities."""
    text, spans, offset = [], [], 0
    for piece, kind in segments:
        if kind is not None and kind in entity_types:
            spans.append(entity(offset, offset + len(piece), kind))
        text.append(piece)
        offset += len(piece)
    return "".join(text), spans
