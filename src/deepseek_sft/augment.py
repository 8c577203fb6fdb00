"""Stage augment: label-preserving variants of the *train* split (val and test are never read).

Methods, applied in the order of `augment.methods`:
- synonym: dictionary terms (resources/financial_synonyms.tsv) outside entities replaced by a synonym;
- structure: the clauses of one sentence (split at ，,；;) or the terminated sentences reordered;
- mention: entities replaced by other train mentions of the same type (the answer must be copied);
- backtranslation: a round trip through a pivot language with entities masked (off by default).

Entity spans stay aligned: no edit touches a character inside an entity, offsets are recomputed after
each edit, reordered clauses carry their spans, and every span of a variant is checked to cover exactly
its source entity text. Labels are copied; the per-annotator `annotations` (offsets into the old text)
are dropped from variants. `ratio` * len(train) variants are shared equally by the methods; each method
walks the records in a seeded order and skips texts that already exist. With `balance_by` (a label field),
the order is weighted by 1 / label frequency, so rare labels (the long tail that macro-F1 weighs as much as
the head) get about as many variants as frequent ones.

Language: each method knows which scripts it serves (`Method.cannot_serve`): synonym the script of its
dictionary's terms, backtranslation that of `source_lang`, mention any text with entity spans, structure
clauses of CJK text and whole sentences of Latin text. A method that cannot serve the train texts adds
nothing, says why in one log line and sets `unsupported_<method>` in the metrics; a method that falls short
of its quota logs its skip reasons in one line. Its quota is not handed to the others, so the counts of one
method do not depend on the data's fit for another.

Output: the train lines verbatim, then the variants (id ``<id>-aug-<method>-<pass>``, an ``augment``
key naming method and source). With `enabled: false` the output is a byte copy of train.jsonl.
metrics.json holds counts only (DVC tracks it, so it must not change between identical runs); the
wall-clock time goes to timing.json beside it, which DVC does not track.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .augment_backtranslate import Translator, backtranslate, make_translator
from .augment_edits import (
    Edited,
    MentionPool,
    SpansByField,
    SynonymDictionary,
    mention_edit,
    structure_edit,
    synonym_edit,
)
from .config import StageParams
from .config.augment import AugmentParams
from .config.data import TaskSpec
from .io import DataError, atomic_path, iter_jsonl_lines, write_json, write_metrics, write_text
from .language import CHINESE_ONLY_FLAG, ScriptMix, language_script, script_mix

__all__ = ["AugmentResult", "augment_records", "load_train", "run_augment"]

log = logging.getLogger(__name__)

CHUNK = 256  # records proposed per step (a translator batch for back-translation)


@dataclass
class AugmentResult:
    """Variants per method and flat metrics."""

    added: dict[str, list[dict]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # wall-clock time; kept out of `metrics` so identical runs write identical metrics

    @property
    def variants(self) -> list[dict]:
        """All variants, in method order."""
        return [r for records in self.added.values() for r in records]


# --- input -------------------------------------------------------------------------------------------


def entity_fields(tasks: dict[str, TaskSpec]) -> list[str]:
    """Record fields that hold entity spans (the extraction tasks)."""
    return [t.field for t in tasks.values() if t.type == "extraction"]


def check_record(record: dict, fields: list[str], where: str) -> None:
    """A processed record must have an id, a text and spans that cover their own text."""
    for key in ("id", "text"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise DataError(f"{where}: key {key!r}: expected a non-empty string, got {record.get(key)!r}")
    text = record["text"]
    for name in fields:
        spans = record.get(name, [])
        if not isinstance(spans, list):
            raise DataError(f"{where}: key {name!r}: expected a list of spans, got {type(spans).__name__}")
        for span in spans:
            ok = isinstance(span, dict) and all(isinstance(span.get(k), int) for k in ("start", "end"))
            if (
                not ok
                or not 0 <= span["start"] < span["end"] <= len(text)
                or not isinstance(span.get("type"), str)
            ):
                raise DataError(
                    f"{where}: key {name!r}: bad span {span!r}; expected 0 <= start < end <= {len(text)}"
                )
            if "text" in span and span["text"] != text[span["start"] : span["end"]]:
                raise DataError(
                    f"{where}: key {name!r}: span text {span['text']!r} != text[{span['start']}:{span['end']}] "
                    f"{text[span['start'] : span['end']]!r}"
                )


def load_train(path: str | Path, tasks: dict[str, TaskSpec]) -> tuple[list[dict], list[str]]:
    """The train records and their raw lines; a bad line raises DataError naming file, line and key."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; expected the train split written by label_qa")
    fields = entity_fields(tasks)
    records, lines, seen = [], [], {}
    for lineno, line in iter_jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}); expected one JSON object per line") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        check_record(record, fields, where)
        if record["id"] in seen:
            raise DataError(f"{where}: duplicate id {record['id']!r} (also on line {seen[record['id']]})")
        seen[record["id"]] = lineno
        records.append(record)
        lines.append(line)
    if not records:
        raise DataError(f"{path}: no records; expected the train split written by label_qa")
    return records, lines


# --- methods -----------------------------------------------------------------------------------------


def spans_of(record: dict, fields: list[str]) -> SpansByField:
    """The record's entity spans per extraction field (a missing field counts as no entities)."""
    return {name: list(record.get(name) or []) for name in fields if name in record}


class Method:
    """One augmentation method: proposes an Edited per record of a chunk."""

    def __init__(
        self,
        name: str,
        params: AugmentParams,
        translator: Translator | None = None,
        mentions: MentionPool | None = None,
    ):
        self.name, self.params, self.translator, self.mentions = name, params, translator, mentions
        self.synonyms = SynonymDictionary.from_tsv(params.synonym.dictionary) if name == "synonym" else None
        if name == "backtranslation" and self.translator is None:
            self.translator = make_translator(params.backtranslation)

    def cannot_serve(self, mix: ScriptMix, records: list[dict], fields: list[str]) -> str:
        """Why this method can add nothing to these train records ("" when it can)."""
        data = mix.dominant
        if self.name == "synonym" and {self.synonyms.mix.dominant, data} == {"cjk", "latin"}:
            return (
                f"the dictionary {self.params.synonym.dictionary} holds {self.synonyms.mix.dominant.upper()} terms "
                f"({self.synonyms.mix.describe()}) but the train texts are {mix.describe()}; set "
                "augment.synonym.dictionary to a dictionary in the records' language"
            )
        if self.name == "backtranslation":
            lang = self.params.backtranslation.source_lang
            script = language_script(lang)
            if script is not None and data in ("cjk", "latin") and script != data:
                return (
                    f"backtranslation.source_lang={lang!r} is written in {script.upper()} script but the train "
                    f"texts are {mix.describe()}; set source_lang (and the models) to the records' language"
                )
        if self.name == "mention" and not any(spans_of(r, fields).get(f) for r in records for f in fields):
            return "no train record has an entity span (no extraction task in `tasks`, or no entity labelled)"
        return ""

    def chinese_only(self) -> bool:
        """Whether this method's setting only suits Chinese text (a CJK dictionary, a Chinese source)."""
        if self.name == "synonym":
            return self.synonyms.mix.dominant == "cjk"
        if self.name == "backtranslation":
            return language_script(self.params.backtranslation.source_lang) == "cjk"
        return False

    @property
    def chunk(self) -> int:
        """Records proposed at once."""
        return self.params.backtranslation.batch_size if self.name == "backtranslation" else CHUNK

    def propose(self, items: list[tuple[str, SpansByField]], rng: random.Random) -> list[Edited]:
        """One variant (or a reason) per (text, spans)."""
        if self.name == "synonym":
            limit = self.params.synonym.max_replacements
            return [synonym_edit(text, spans, self.synonyms, limit, rng) for text, spans in items]
        if self.name == "structure":
            reorder = self.params.structure.sentence_reorder
            return [structure_edit(text, spans, reorder, rng) for text, spans in items]
        if self.name == "mention":
            limit = self.params.mention.max_replacements
            return [mention_edit(text, spans, self.mentions, limit, rng) for text, spans in items]
        return backtranslate(items, self.translator, self.params.backtranslation)


def quotas(total: int, methods: list[str]) -> dict[str, int]:
    """`total` variants shared equally by the methods (the first ones take the remainder)."""
    base, extra = divmod(total, len(methods)) if methods else (0, 0)
    return {m: base + (i < extra) for i, m in enumerate(methods)}


def make_variant(record: dict, edited: Edited, method: str, n_pass: int) -> dict:
    """A copy of `record` with the edited text and spans; labels carry over."""
    variant = {k: v for k, v in record.items() if k != "annotations"}
    variant.update(edited.spans or {})
    variant["text"] = edited.text
    variant["id"] = f"{record['id']}-aug-{method}-{n_pass}"
    variant["augment"] = {"method": method, "source_id": record["id"]}
    return variant


def balance_weights(records: list[dict], field: str | None) -> list[float] | None:
    """1 / frequency of each record's `field` label (None without a field); a record lacking it is an error."""
    if field is None:
        return None
    missing = next((r["id"] for r in records if r.get(field) is None), None)
    if missing is not None:
        raise ValueError(f"augment.balance_by: record {missing!r} has no {field!r} label to balance by")
    counts = Counter(r[field] for r in records)
    return [1.0 / counts[r[field]] for r in records]


def rarest_label_share(records: list[dict], variants: list[dict], field: str) -> dict[str, float]:
    """The rarest `field` label of the train records, and its share before and after augmentation."""
    before = Counter(r.get(field) for r in records)
    rarest = min(before, key=lambda label: (before[label], str(label)))
    after = before[rarest] + sum(v.get(field) == rarest for v in variants)
    return {
        "balance_rarest_share_before": before[rarest] / len(records),
        "balance_rarest_share_after": after / (len(records) + len(variants)),
    }


def walk_order(n: int, weights: list[float] | None, rng: random.Random) -> list[int]:
    """A seeded random order of range(n); with weights, a weighted one (Efraimidis-Spirakis: sort by u^(1/w))."""
    if weights is None:
        return rng.sample(range(n), n)
    keys = [rng.random() ** (1.0 / w) for w in weights]
    return sorted(range(n), key=keys.__getitem__, reverse=True)


def run_method(
    method: Method,
    records: list[dict],
    fields: list[str],
    quota: int,
    rng: random.Random,
    seen: set[str],
    weights: list[float] | None = None,
) -> tuple[list[dict], Counter]:
    """Variants of one method until `quota` is met or every record was tried in every pass."""
    added, counts = [], Counter()
    # one pass more than the quota needs: duplicates and records without a variant leave gaps to fill
    for n_pass in range(math.ceil(quota / len(records)) + 1 if quota else 0):
        order = walk_order(len(records), weights, rng)
        for at in range(0, len(order), method.chunk):
            if len(added) >= quota:
                return added, counts
            batch = [records[i] for i in order[at : at + method.chunk]]
            proposals = method.propose([(r["text"], spans_of(r, fields)) for r in batch], rng)
            for record, edited in zip(batch, proposals, strict=True):
                if len(added) >= quota:
                    break
                counts["tried"] += 1
                reason = edited.reason or ("duplicate" if edited.text in seen else "")
                if reason:
                    counts[f"skipped_{reason}"] += 1
                else:
                    seen.add(edited.text)
                    added.append(make_variant(record, edited, method.name, n_pass))
        log.info("augment %s: pass %d, %d/%d added", method.name, n_pass, len(added), quota)
        if len(added) >= quota:
            break
    return added, counts


# what a skip reason means, for the one log line of a method that fell short of its quota
REASONS = {
    "duplicate": "the variant already exists",
    "no_dictionary_term": "no dictionary term outside the entities",
    "single_clause": "one clause only (CJK text is split at ，,；;)",
    "single_sentence": "fewer than two sentences (Latin-script text is reordered by whole sentences only)",
    "sentence_reorder_off": "Latin-script text needs structure.sentence_reorder",
    "no_entity": "no entity span to replace",
    "no_alternative_mention": "no other train mention of the same entity type",
    "unchanged": "the edit gave the same text",
    "entity_lost": "the translation lost an entity placeholder",
    "overlapping_entities": "overlapping entity spans cannot be masked",
    "empty_translation": "the translation came back empty",
    "span_broken": "an entity span no longer covered its text (a bug guard)",
}


def shortfall_line(name: str, added: int, quota: int, counts: Counter) -> str:
    """One line saying why a method added fewer variants than its quota (its skip reasons, most common first)."""
    skipped = sorted(
        ((k.removeprefix("skipped_"), v) for k, v in counts.items() if k != "tried"),
        key=lambda kv: (-kv[1], kv[0]),
    )
    why = ", ".join(f"{reason} x{n} ({REASONS.get(reason, reason)})" for reason, n in skipped)
    return (
        f"augment {name}: added {added} of {quota} after {counts['tried']} tries; skipped: {why or 'nothing'}"
    )


def augment_records(
    records: list[dict], stage: StageParams, translator: Translator | None = None
) -> AugmentResult:
    """Variants of `records` per `stage.section` (AugmentParams), seeded by `stage.seed`."""
    params: AugmentParams = stage.section
    fields = entity_fields(stage.tasks)
    started = time.perf_counter()
    result = AugmentResult()
    metrics: dict[str, float] = {"train_records": len(records)}
    methods = params.methods if params.enabled else []
    seen = {r["text"] for r in records}
    mix = script_mix(r["text"] for r in records)
    mentions = MentionPool([spans_of(r, fields) for r in records], [r["text"] for r in records])
    weights = balance_weights(records, params.balance_by if methods else None)
    chinese_only_on_latin = False
    for name, quota in quotas(round(params.ratio * len(records)), methods).items():
        method = Method(name, params, translator, mentions)
        why = method.cannot_serve(mix, records, fields)
        added, counts = [], Counter()
        if why:
            log.warning("augment %s: adds nothing: %s", name, why)
            chinese_only_on_latin |= mix.mostly_latin and method.chinese_only()
        else:
            # one stream per method: adding or removing a method does not change the others' variants
            rng = random.Random(f"{stage.seed}:augment:{name}")
            added, counts = run_method(method, records, fields, quota, rng, seen, weights)
            if len(added) < quota:
                log.warning(shortfall_line(name, len(added), quota, counts))
        result.added[name] = added
        metrics[f"quota_{name}"] = quota
        metrics[f"added_{name}"] = len(added)
        metrics[f"unsupported_{name}"] = int(bool(why))
        metrics.update({f"{key}_{name}": value for key, value in sorted(counts.items())})
    metrics["added_total"] = len(result.variants)
    metrics["out_records"] = len(records) + len(result.variants)
    metrics[CHINESE_ONLY_FLAG] = int(chinese_only_on_latin)
    if params.balance_by:  # how the rarest label's share of the records moved
        metrics |= rarest_label_share(records, result.variants, params.balance_by)
    result.metrics = metrics
    result.seconds = time.perf_counter() - started
    return result


# --- stage -------------------------------------------------------------------------------------------


def write_reports(result: AugmentResult, reports: str | Path) -> None:
    """metrics.json, added_per_method.csv (a DVC bar plot) and timing.json (not DVC-tracked) under `reports`."""
    reports = Path(reports)
    write_metrics(reports / "metrics.json", result.metrics)
    write_json(reports / "timing.json", {"augment_seconds": round(result.seconds, 3)})
    rows = [f"{m},{len(v)}" for m, v in result.added.items()]
    write_text(reports / "added_per_method.csv", "\n".join(["method,added", *rows]) + "\n")


def write_augmented(lines: list[str], result: AugmentResult, out: str | Path) -> None:
    """train_augmented.jsonl: the train lines verbatim, then the variants."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
        for record in result.variants:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def run_augment(
    train: str | Path,
    out: str | Path,
    reports: str | Path,
    stage: StageParams,
    translator: Translator | None = None,
) -> dict:
    """The whole stage: read train, add variants, write the outputs; returns the metrics."""
    records, lines = load_train(train, stage.tasks)
    if stage.section.enabled:
        result = augment_records(records, stage, translator)
        write_augmented(lines, result, out)
    else:
        # a byte copy, so the train stage reads the same data whether or not augment is on
        with atomic_path(out) as tmp:
            shutil.copyfile(train, tmp)
        n = len(records)
        result = AugmentResult(metrics={"train_records": n, "added_total": 0, "out_records": n})
    write_reports(result, reports)
    log.info("augment: %d train records + %d variants", len(records), result.metrics["added_total"])
    return result.metrics
