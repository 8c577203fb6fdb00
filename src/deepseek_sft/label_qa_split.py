"""Where each adjudicated record goes: train, val or test, decided by the record alone.

A record's split is a function of the record (a seeded hash of its split key) and of the params, never of
which other records survived cleaning: changing one clean rule moves only the records it removes, and two
experiments that differ only in cleaning are scored on the same test records (minus the removed ones).
Per-class shares are therefore only approximately stratified; label_deviation() reports by how much.

A dataset's own split (records.py: `split`) is kept as given; when it has no val, val is carved from its
train records by the same hash, so the carve is stable too.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import Counter
from collections.abc import Iterable

from .io import DataError
from .records import SPLITS

log = logging.getLogger(__name__)


def normalised_text(text: str) -> str:
    """NFKC, case-folded, without whitespace: texts that differ only there hash alike (and stay together)."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def split_key(record: dict, by: str = "text") -> str:
    """What a record's split is drawn from: its normalised text (default) or its id."""
    return normalised_text(record["text"]) if by == "text" else str(record["id"])


def unit_hash(seed: int, key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by (seed, salt, key), uniform over keys."""
    digest = hashlib.sha256(f"{seed}\x1f{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _ensure_one(records: list[dict], splits: dict[str, list[dict]], name: str, seed: int, by: str) -> None:
    """A split that came out empty on tiny data takes the train record with the smallest hash."""
    if splits[name] or len(splits["train"]) < 2:
        return
    pick = min(splits["train"], key=lambda r: unit_hash(seed, split_key(r, by), name))
    log.warning("no record fell into %s (too little data): moved %s there from train", name, pick["id"])
    splits["train"].remove(pick)
    splits[name].append(pick)
    position = {r["id"]: i for i, r in enumerate(records)}
    splits[name].sort(key=lambda r: position[r["id"]])


def split_records(
    records: list[dict], val_fraction: float, test_fraction: float, seed: int, by: str = "text"
) -> dict[str, list[dict]]:
    """Train/val/test by a seeded hash u of each record's key: test if u < test_fraction, val if below
    test_fraction + val_fraction, else train (records in input order).

    Shares are about the fractions asked (binomial noise: +-1 point at 5,000 records); a record never
    changes split because another one appeared or vanished. Identical (normalised) texts share a key and
    so a split. On tiny data an empty val or test takes the train record with the smallest hash.
    """
    if len(records) < 3:
        raise DataError(
            f"only {len(records)} adjudicated records: too few for a train, a val and a test record"
        )
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in records:
        u = unit_hash(seed, split_key(record, by))
        name = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        splits[name].append(record)
    for name in ("test", "val"):
        _ensure_one(records, splits, name, seed, by)
    return splits


def split_given(
    records: list[dict], given: list[str], val_fraction: float, seed: int, by: str = "text"
) -> tuple[dict[str, list[dict]], bool]:
    """Keep the dataset's own split; carve val (about `val_fraction` of train) from train if none is given.

    Returns the splits (records in input order) and whether val was carved.
    """
    if len(given) != len(records) or any(g not in SPLITS for g in given):
        missing = next(r["id"] for r, g in zip(records, given, strict=False) if g not in SPLITS)
        raise DataError(
            f"record {missing!r} has no given split while others have one; give every record a split "
            "(the split column or one file per split) or none"
        )
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    carve = "val" not in given
    for record, name in zip(records, given, strict=True):
        if carve and name == "train" and unit_hash(seed, split_key(record, by), "val") < val_fraction:
            name = "val"
        splits[name].append(record)
    if carve:
        _ensure_one(records, splits, "val", seed, by)
    if not splits["train"]:
        raise DataError("the dataset's own split gives no train record")
    return splits, carve


def label_deviation(splits: dict[str, list[dict]], field: str) -> dict[str, float]:
    """How far each split's label distribution is from the whole data's: total variation distance in [0, 1].

    0 = the same class shares as the whole data (perfect stratification); also counts the classes present
    in val/test but missing from train (the model never sees an example of them).
    """
    every = [r[field] for name in SPLITS for r in splits[name]]
    overall = Counter(every)
    out: dict[str, float] = {}
    for name in SPLITS:
        counts = Counter(r[field] for r in splits[name])
        n = sum(counts.values())
        if n:
            tvd = 0.5 * sum(abs(counts[c] / n - overall[c] / len(every)) for c in overall)
            out[f"stratify_deviation_{name}"] = round(tvd, 4)
    in_train = {r[field] for r in splits["train"]}
    missing = sorted({r[field] for name in ("val", "test") for r in splits[name]} - in_train)
    if missing:
        log.warning("classes with no training example: %s", ", ".join(missing))
    out["classes_missing_from_train"] = len(missing)
    return out


def split_fingerprint(test: Iterable[dict]) -> dict[str, int | str]:
    """Count and short hash of the test split's record ids (order-free): equal iff the test sets are equal.

    Two experiments whose metrics carry different fingerprints were scored on different test records.
    """
    ids = sorted(str(r["id"]) for r in test)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return {"test_fingerprint_count": len(ids), "test_fingerprint": digest}


def cap_per_label(
    train: list[dict], field: str, limit: int, seed: int, by: str = "text"
) -> tuple[list[dict], int]:
    """At most `limit` train records per value of `field`: those with the lowest seeded hash, so a smaller cap
    keeps a subset of a larger one (nested learning-curve points). Returns (kept, left out)."""
    ranked = sorted(train, key=lambda r: unit_hash(seed, split_key(r, by), "cap"))
    seen: dict[str, int] = {}
    kept = []
    for record in ranked:
        label = str(record.get(field))
        if seen.get(label, 0) < limit:
            seen[label] = seen.get(label, 0) + 1
            kept.append(record)
    order = {id(r): i for i, r in enumerate(train)}
    return sorted(kept, key=lambda r: order[id(r)]), len(train) - len(kept)
