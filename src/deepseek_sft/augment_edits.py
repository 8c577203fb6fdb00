"""Span-safe text edits for the augment stage: synonyms, clause / sentence reordering, mention replacement.

Every edit is expressed as a list of *pieces* (slices of the old text, or new strings) that are
concatenated into the new text. Characters carried over keep a map from old to new position, so each
entity span moves with its characters; an edit never touches a character inside an entity.

Language: synonym terms match whole words in Latin script ("card" never inside "discard") and anywhere in
CJK text (no spaces between words there). Structure reorders the clauses of a CJK sentence, but only whole
sentences of space-separated (Latin) text: English clauses carry their conjunction, capital and full stop
with them, so moving one garbles it ("and lay off 10 of its own personnel.,Biohit said that ...").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .io import DataError
from .language import is_cjk, mix_of, script_mix

Piece = tuple[int, int] | str
SpansByField = dict[str, list[dict]]

CLAUSE_SEPARATORS = frozenset("，,；;")
SENTENCE_ENDS = frozenset("。！？!?")
LATIN_SENTENCE_ENDS = frozenset(".!?")
CLOSING = frozenset("\"')]}”’»")  # may follow a sentence's terminator and belong to the sentence
# a "." after these (any case) closes an abbreviation, not a sentence; so does one after an initial ("J.")
# or inside a dotted token ("S.A.", "U.S.", "e.g.")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st inc ltd co corp plc llc bros no nos vs etc approx est dept fig vol pp "  # noqa: SIM905
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun".split()
)


@dataclass(frozen=True)
class Edited:
    """A variant text with its entity spans re-aligned (or `reason` when no variant could be made)."""

    text: str = ""
    spans: SpansByField | None = None
    reason: str = ""


def assemble(text: str, pieces: list[Piece]) -> tuple[str, list[int]]:
    """Concatenate `pieces`; return the new text and old index -> new index (-1 for dropped characters)."""
    out, index_map, pos = [], [-1] * len(text), 0
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            pos += len(piece)
            continue
        start, end = piece
        for i in range(start, end):
            index_map[i] = pos + i - start
        out.append(text[start:end])
        pos += end - start
    return "".join(out), index_map


def carry_spans(spans: SpansByField, index_map: list[int], old: str, new: str) -> SpansByField | None:
    """Move every span through `index_map`; None if one no longer covers its original text."""
    moved: SpansByField = {}
    for name, field_spans in spans.items():
        moved[name] = []
        for span in field_spans:
            start, end = span["start"], span["end"]
            new_start = index_map[start]
            surface = old[start:end]
            if new_start < 0 or new[new_start : new_start + len(surface)] != surface:
                return None
            moved[name].append({**span, "start": new_start, "end": new_start + len(surface), "text": surface})
        moved[name].sort(key=lambda s: (s["start"], s["end"]))
    return moved


def protected_mask(text: str, spans: SpansByField) -> list[bool]:
    """True at every character inside some entity span (edits must leave those alone)."""
    mask = [False] * len(text)
    for field_spans in spans.values():
        for span in field_spans:
            for i in range(span["start"], span["end"]):
                mask[i] = True
    return mask


def apply_pieces(text: str, spans: SpansByField, pieces: list[Piece]) -> Edited:
    """Build the variant from `pieces`, with spans carried along."""
    new_text, index_map = assemble(text, pieces)
    if new_text == text:
        return Edited(reason="unchanged")
    moved = carry_spans(spans, index_map, text, new_text)
    if moved is None:
        return Edited(reason="span_broken")  # a bug guard: edits avoid entities, so this should not happen
    return Edited(text=new_text, spans=moved)


# --- synonyms ------------------------------------------------------------------------------------------


class SynonymDictionary:
    """Synonym groups read from a TSV file; a term's alternatives are all terms sharing a group with it."""

    def __init__(self, groups: list[list[str]]):
        alternatives: dict[str, set[str]] = {}
        for group in groups:
            for term in group:
                alternatives.setdefault(term, set()).update(t for t in group if t != term)
        self.alternatives = {term: sorted(alts) for term, alts in alternatives.items()}
        self.max_len = max((len(t) for t in self.alternatives), default=0)
        self.mix = script_mix(self.alternatives)  # which script the terms are written in

    @classmethod
    def from_tsv(cls, path: str | Path) -> SynonymDictionary:
        """Read the dictionary; a bad line raises DataError naming the file and line."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: synonym dictionary not found (augment.synonym.dictionary)")
        groups = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            terms = [t.strip() for t in line.split("\t") if t.strip()]
            if len(terms) < 2:
                raise DataError(f"{path}:{lineno}: expected at least two TAB-separated terms, got {line!r}")
            if len(set(terms)) != len(terms):
                raise DataError(f"{path}:{lineno}: a term is listed twice in one group: {line!r}")
            groups.append(terms)
        if not groups:
            raise DataError(f"{path}: no synonym groups (one group of TAB-separated terms per line)")
        return cls(groups)

    def find(self, text: str, blocked: list[bool]) -> list[tuple[int, int]]:
        """Dictionary terms in `text` by forward maximum matching, skipping any that touch a blocked character.

        A term edge that is a Latin letter or digit must sit at a word boundary.
        """
        found, i = [], 0
        while i < len(text):
            for length in range(min(self.max_len, len(text) - i), 0, -1):
                term = text[i : i + length]
                if (
                    term in self.alternatives
                    and not any(blocked[i : i + length])
                    and _whole_word(text, i, i + length)
                ):
                    found.append((i, i + length))
                    i += length
                    break
            else:
                i += 1
        return found


def _word_char(ch: str) -> bool:
    """A letter or digit of a space-separated script (CJK characters form no words delimited by spaces)."""
    return ch.isalnum() and not is_cjk(ch)


def _whole_word(text: str, start: int, end: int) -> bool:
    """text[start:end] does not cut into a word at a Latin-letter / digit edge."""
    cuts_left = start > 0 and _word_char(text[start]) and _word_char(text[start - 1])
    cuts_right = end < len(text) and _word_char(text[end - 1]) and _word_char(text[end])
    return not (cuts_left or cuts_right)


def synonym_edit(
    text: str, spans: SpansByField, synonyms: SynonymDictionary, max_replacements: int, rng: random.Random
) -> Edited:
    """Replace up to `max_replacements` dictionary terms (never inside an entity) by a random synonym."""
    matches = synonyms.find(text, protected_mask(text, spans))
    if not matches:
        return Edited(reason="no_dictionary_term")
    chosen = sorted(rng.sample(matches, min(max_replacements, len(matches))))
    pieces: list[Piece] = []
    cursor = 0
    for start, end in chosen:
        pieces += [(cursor, start), rng.choice(synonyms.alternatives[text[start:end]])]
        cursor = end
    pieces.append((cursor, len(text)))
    return apply_pieces(text, spans, pieces)


# --- structure -----------------------------------------------------------------------------------------


def _is_separator(text: str, i: int, blocked: list[bool]) -> bool:
    if text[i] not in CLAUSE_SEPARATORS or blocked[i]:
        return False
    # "12,000" is a number, not two clauses
    return not (0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit())


def sentences(text: str, blocked: list[bool]) -> list[tuple[int, int, int]]:
    """(start, body end, end) of each sentence; body end excludes the run of terminators that closes it."""
    out, start, i = [], 0, 0
    while i < len(text):
        if text[i] in SENTENCE_ENDS and not blocked[i]:
            body_end = i
            while i < len(text) and text[i] in SENTENCE_ENDS:
                i += 1
            out.append((start, body_end, i))
            start = i
        else:
            i += 1
    if start < len(text):
        out.append((start, len(text), len(text)))
    return [s for s in out if s[1] > s[0]]


def clauses(text: str, start: int, end: int, blocked: list[bool]) -> list[tuple[int, int]]:
    """Clause slices of text[start:end] split at unprotected separators; [] if a clause would be empty."""
    out, cursor = [], start
    for i in range(start, end):
        if _is_separator(text, i, blocked):
            out.append((cursor, i))
            cursor = i + 1
    out.append((cursor, end))
    return out if all(b > a for a, b in out) else []


def _shuffled(items: list, rng: random.Random) -> list:
    order = list(range(len(items)))
    while order == sorted(order):
        rng.shuffle(order)
    return [items[i] for i in order]


def _reorder(text: str, slots: list[tuple[int, int]], new_order: list[tuple[int, int]]) -> list[Piece]:
    """Pieces that put `new_order[k]` where `slots[k]` was, keeping the text between slots in place."""
    pieces: list[Piece] = []
    cursor = 0
    for slot, content in zip(slots, new_order, strict=True):
        pieces += [(cursor, slot[0]), content]
        cursor = slot[1]
    pieces.append((cursor, len(text)))
    return pieces


def _abbreviation(text: str, start: int, dot: int) -> bool:
    """Whether the "." at `dot` closes an abbreviation or initial rather than the sentence begun at `start`."""
    words = text[start:dot].split()
    if not words or text[dot - 1].isspace():
        return False  # a detached " ." (tokenised text) closes a sentence
    token = words[-1].lstrip("\"'(“‘«")
    return "." in token or (len(token) == 1 and token.isalpha()) or token.lower() in ABBREVIATIONS


def latin_sentences(text: str, blocked: list[bool]) -> list[tuple[int, int, bool]]:
    """(start, end, terminated) of each sentence of space-separated text, the spaces between them excluded.

    A sentence ends at . ! ? (with any closing quotes or brackets) followed by whitespace and a capital
    letter or digit, or by the end of the text; an abbreviation's "." ends none.
    """
    out, start, i, n = [], 0, 0, len(text)
    while i < n:
        if text[i] not in LATIN_SENTENCE_ENDS or blocked[i]:
            i += 1
            continue
        end = i
        while end < n and (text[end] in LATIN_SENTENCE_ENDS or text[end] in CLOSING):
            end += 1
        following = end
        while following < n and text[following].isspace():
            following += 1
        at_end = following == n
        starts_next = (
            following > end and following < n and (text[following].isupper() or text[following].isdigit())
        )
        if (at_end or starts_next) and not (text[i] == "." and _abbreviation(text, start, i)):
            out.append((start, end, True))
            start = following
        i = end
    if text[start:].strip():
        out.append((start, len(text.rstrip()), False))
    return out


def _latin_structure(text: str, spans: SpansByField, sentence_reorder: bool, rng: random.Random) -> Edited:
    """Reorder whole sentences of space-separated text; each keeps its capital and its terminator."""
    found = latin_sentences(text, protected_mask(text, spans))
    # a sentence that starts in lower case may be the tail of a missed abbreviation: never move it
    terminated = [(s, e) for s, e, done in found if done and (text[s].isupper() or text[s].isdigit())]
    if len(terminated) < 2 or len(terminated) < sum(done for _, _, done in found):
        return Edited(reason="single_sentence")
    if not sentence_reorder:
        return Edited(reason="sentence_reorder_off")
    return apply_pieces(text, spans, _reorder(text, terminated, _shuffled(terminated, rng)))


def structure_edit(text: str, spans: SpansByField, sentence_reorder: bool, rng: random.Random) -> Edited:
    """Reorder the clauses of one sentence (or, when allowed, the terminated sentences); spans move along.

    Text whose letters are mostly not CJK is reordered by whole sentences only (`_latin_structure`).
    """
    if mix_of(text).dominant not in ("cjk", "none"):
        return _latin_structure(text, spans, sentence_reorder, rng)
    blocked = protected_mask(text, spans)
    found = sentences(text, blocked)
    options: list[list[tuple[int, int]]] = []
    for start, body_end, _ in found:
        parts = clauses(text, start, body_end, blocked)
        if len(parts) >= 2:
            options.append(parts)
    terminated = [(s, e) for s, b, e in found if e > b]
    if sentence_reorder and len(terminated) >= 2:
        options.append(terminated)  # an unterminated tail stays last so no sentence loses its full stop
    if not options:
        return Edited(reason="single_clause")
    slots = options[rng.randrange(len(options))]
    return apply_pieces(text, spans, _reorder(text, slots, _shuffled(slots, rng)))


# --- mentions ------------------------------------------------------------------------------------------


class MentionPool:
    """Entity surfaces of the train split per entity type: what mention replacement draws from."""

    def __init__(self, spans_per_record: list[SpansByField], texts: list[str]):
        by_type: dict[str, set[str]] = {}
        for text, spans in zip(texts, spans_per_record, strict=True):
            for field_spans in spans.values():
                for span in field_spans:
                    by_type.setdefault(span["type"], set()).add(text[span["start"] : span["end"]])
        self.by_type = {kind: sorted(surfaces) for kind, surfaces in by_type.items()}

    def draw(self, kind: str, current: str, rng: random.Random) -> str | None:
        """Another surface of type `kind` (None when the pool holds no other)."""
        surfaces = self.by_type.get(kind, [])
        if not surfaces or surfaces == [current]:
            return None
        while (choice := rng.choice(surfaces)) == current:
            pass
        return choice


def _overlaps_another(span: dict, spans: SpansByField) -> bool:
    return any(
        other is not span and other["start"] < span["end"] and span["start"] < other["end"]
        for field_spans in spans.values()
        for other in field_spans
    )


def mention_edit(
    text: str, spans: SpansByField, pool: MentionPool, max_replacements: int, rng: random.Random
) -> Edited:
    """Replace up to `max_replacements` entities by other train mentions of the same type.

    The answer then names strings the context does not predict, so the model must copy them from the text
    rather than recall likely names: on the tiny default the SFT model answered plausible names that were
    not in the text ("PER:董华" for 史永). Overlapping spans (several extraction fields) are left alone.
    """
    candidates = [
        (name, index, span)
        for name, field_spans in spans.items()
        for index, span in enumerate(field_spans)
        if not _overlaps_another(span, spans)
    ]
    if not candidates:
        return Edited(reason="no_entity")
    chosen = sorted(
        rng.sample(candidates, min(max_replacements, len(candidates))), key=lambda c: c[2]["start"]
    )
    pieces: list[Piece] = []
    replaced: dict[tuple[str, int], tuple[int, str]] = {}  # (field, index) -> (new start, surface)
    cursor = position = 0
    for name, index, span in chosen:
        surface = pool.draw(span["type"], text[span["start"] : span["end"]], rng)
        if surface is None:
            continue
        pieces.append((cursor, span["start"]))
        position += span["start"] - cursor
        replaced[(name, index)] = (position, surface)
        pieces.append(surface)
        position += len(surface)
        cursor = span["end"]
    if not replaced:
        return Edited(reason="no_alternative_mention")
    pieces.append((cursor, len(text)))
    new_text, index_map = assemble(text, pieces)
    moved: SpansByField = {}
    for name, field_spans in spans.items():
        moved[name] = []
        for index, span in enumerate(field_spans):
            if (name, index) in replaced:
                start, surface = replaced[(name, index)]
            else:
                start, surface = index_map[span["start"]], text[span["start"] : span["end"]]
            if new_text[start : start + len(surface)] != surface:
                return Edited(reason="span_broken")  # a bug guard, as in apply_pieces
            moved[name].append({**span, "start": start, "end": start + len(surface), "text": surface})
        moved[name].sort(key=lambda s: (s["start"], s["end"]))
    return Edited(text=new_text, spans=moved)
