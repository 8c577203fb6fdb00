"""Simulated annotators for the synthetic corpus: each one labels every record independently, with errors.

Error model (per record and per layer, each with its own draw):
- intent: with probability `error_rate` the annotator picks the confusable partner of the true intent
  (70% of errors when there is one) or else a uniformly random other label;
- compliance: flipped with probability `error_rate * COMPLIANCE_SCALE`. Why scaled: the layer is binary
  with ~20% violations, so chance agreement is high (p_e ~ 0.68) and one flip costs about three times
  more kappa than one intent error (p_e ~ 0.14 over 20 long-tailed labels). Unscaled, the default
  ann_c (10%) would put every ann_c pair near kappa 0.6; at 0.35 the defaults give ~0.85 for the ann_c
  pairs and ~0.92 for ann_a/ann_b, the same picture as the intent layer;
- entities: with probability `error_rate` (records that have entities only) one of: drop a span, shift
  one boundary by 1-2 characters, or give a span a wrong type.
Each annotator draws from its own seeded stream, so adding an annotator leaves the others' labels as
they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COMPLIANCE_SCALE = 0.35
CONFUSABLE_SHARE = 0.7
ENTITY_ERRORS = ("drop", "shift", "retype")


@dataclass(frozen=True)
class LayerSpec:
    """Field names and label sets of the three annotation layers."""

    intent_field: str
    intent_labels: tuple[str, ...]
    compliance_field: str
    compliance_labels: tuple[str, str]  # (compliant, violation)
    entities_field: str
    entity_types: tuple[str, ...]


class SimulatedAnnotator:
    """One annotator with a per-layer error rate and a private random stream."""

    def __init__(self, name: str, error_rate: float, seed: int, spec: LayerSpec, confusable: dict[str, str]):
        self.name = name
        self.error_rate = error_rate
        self.spec = spec
        self.confusable = confusable
        self.rng = random.Random(f"{seed}:annotator:{name}")

    def annotate(self, text: str, truth: dict) -> dict:
        """This annotator's labels for a record whose true labels are `truth`."""
        spec, rng = self.spec, self.rng
        # always draw the three layer rolls, so one layer's errors never shift another layer's stream
        roll_intent, roll_compliance, roll_entities = rng.random(), rng.random(), rng.random()
        intent = truth[spec.intent_field]
        if roll_intent < self.error_rate:
            intent = self._wrong_intent(intent)
        compliance = truth[spec.compliance_field]
        if roll_compliance < self.error_rate * COMPLIANCE_SCALE:
            compliant, violation = spec.compliance_labels
            compliance = violation if compliance == compliant else compliant
        spans = [dict(s) for s in truth[spec.entities_field]]
        if spans and roll_entities < self.error_rate:
            spans = self._entity_error(spans, len(text))
        return {spec.intent_field: intent, spec.compliance_field: compliance, spec.entities_field: spans}

    def _wrong_intent(self, intent: str) -> str:
        partner = self.confusable.get(intent)
        if partner is not None and self.rng.random() < CONFUSABLE_SHARE:
            return partner
        others = [label for label in self.spec.intent_labels if label != intent]
        return others[self.rng.randrange(len(others))] if others else intent

    def _entity_error(self, spans: list[dict], text_len: int) -> list[dict]:
        rng = self.rng
        kind = ENTITY_ERRORS[rng.randrange(len(ENTITY_ERRORS))]
        i = rng.randrange(len(spans))
        if kind == "drop":
            return spans[:i] + spans[i + 1 :]
        span = spans[i]
        if kind == "retype":
            others = [t for t in self.spec.entity_types if t != span["type"]]
            if others:
                span["type"] = others[rng.randrange(len(others))]
            return spans
        delta = rng.choice((-2, -1, 1, 2))
        if rng.random() < 0.5:
            span["start"] = _moved(span["start"], delta, 0, span["end"] - 1)
        else:
            span["end"] = _moved(span["end"], delta, span["start"] + 1, text_len)
        return spans


def _moved(value: int, delta: int, low: int, high: int) -> int:
    """`value + delta` kept in [low, high]; if that changes nothing, move the other way instead."""
    moved = min(max(value + delta, low), high)
    if moved == value:
        moved = min(max(value - delta, low), high)
    return moved


def confusable_map(pairs: list[tuple[str, str]], labels: tuple[str, ...]) -> dict[str, str]:
    """Both directions of each confusable pair whose two labels are in use."""
    out: dict[str, str] = {}
    for a, b in pairs:
        if a in labels and b in labels:
            out[a], out[b] = b, a
    return out
