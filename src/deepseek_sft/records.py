"""The record formats that flow between stages (the data contract).

Raw record (data/raw/records.jsonl, written by fetch; one JSON object per line)::

    {"id": "syn-000001",
     "text": "我的卡找不到了，帮我挂失一下",
     "source": "synthetic",                       # synthetic | local | hf | web | llm
     "split": "train",                            # optional: the dataset's own split (train | val | test)
     "annotations": {                             # annotator -> that annotator's labels
        "ann_a": {"intent": "card_loss", "compliance": "compliant",
                  "entities": [{"start": 0, "end": 2, "type": "PER"}]},
        "ann_b": {...}, "ann_c": {...}},
     "meta": {...}}                               # free-form provenance (url, fetch time, template id)

Label fields inside an annotation are named by `tasks.<name>.field` in params.yaml. A classification
field holds a string label; an extraction field holds a list of entity spans; a generation field holds
a string. Spans are character offsets into `text`, end exclusive; a span may also state its `text`
(Label Studio's value.text, NLU++ slot text), which clean checks against text[start:end]. Data with a single label column (a
public dataset) has exactly one annotator, conventionally named "gold".

`split` is present only when the dataset comes with its own split (a split column, or one file per split):
label_qa then keeps it as given and carves val from train when no val is given. fetch writes the canonical
name (SPLITS) for the usual spellings (SPLIT_ALIASES) and passes anything else through for clean to reject.

Interim record (data/interim/clean.jsonl, written by clean): the same shape, text normalised, spans
re-aligned to the new text.

Processed record (data/processed/{train,val,test}.jsonl, written by label_qa): adjudicated, flat::

    {"id": "syn-000001", "text": "...", "intent": "card_loss", "compliance": "compliant",
     "entities": [{"start": 0, "end": 2, "type": "PER", "text": "..."}]}
"""

from __future__ import annotations

from typing import Any

GOLD_ANNOTATOR = "gold"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


def canonical_split(value: Any) -> Any:
    """The SPLITS name of a split cell ('Validation' -> 'val'); '' -> None; anything else unchanged."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return SPLIT_ALIASES.get(value.strip().lower(), value)
    return value


def entity(start: int, end: int, type_: str, text: str | None = None) -> dict[str, Any]:
    """An entity span dict; `text` is included when known (processed records always carry it)."""
    span: dict[str, Any] = {"start": start, "end": end, "type": type_}
    if text is not None:
        span["text"] = text
    return span


def spans_to_bio(text_len: int, spans: list[dict]) -> list[str]:
    """Character-level BIO tags for `spans` (later spans never overwrite earlier ones)."""
    tags = ["O"] * text_len
    for span in sorted(spans, key=lambda s: (s["start"], s["end"])):
        start, end = span["start"], span["end"]
        if start >= end or any(t != "O" for t in tags[start:end]):
            continue
        tags[start] = f"B-{span['type']}"
        for i in range(start + 1, end):
            tags[i] = f"I-{span['type']}"
    return tags


def bio_to_spans(tags: list[str]) -> list[dict]:
    """Spans from character-level BIO tags (an I- without a B- starts a new span)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        boundary = tag == "O" or tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind)
        if boundary and start is not None:
            spans.append(entity(start, i, kind))
            start, kind = None, None
        if tag != "O" and start is None:
            start, kind = i, tag[2:]
    return spans
