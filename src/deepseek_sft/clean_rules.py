"""Text rules of stage clean; each keeps, for every output character, the index of its source character.

Rules run in a fixed order: NFKC -> traditional-to-simplified -> drop Latin letters/digits -> drop invisible
characters -> whitespace. Because every rule carries the offset map along, entity spans of the raw text can
be moved onto the cleaned text exactly (`realign_span`), however the text length changed.

Whitespace decision (one default for Chinese, English and mixed text): a whitespace run next to a CJK
character or CJK / full-width punctuation is removed, since Chinese and Japanese do not separate words by
spaces ("我 的 卡" -> "我的卡", "转账 500 USD 给 John Smith" -> "转账500 USD给John Smith"); every other run
becomes one space, so Latin words, numbers and units never fuse ("Visa Platinum", "USD 100", "27.7 % and",
"S.A. has"). A space before Latin punctuation ("Gran , the company") is kept too: it is how tokenised
English corpora are written, and clean does not guess at detokenisation (quotes, "'s", "n't" and brackets
would need rules of their own); train and test are cleaned alike, so the model sees one convention. A
space next to a CJK character is dropped even in English text ("Contact 张伟 today" -> "Contact张伟today"):
the rule looks at the two neighbours only, which keeps span re-alignment exact. With
`remove_whitespace: false` runs are collapsed to one space instead. Leading and trailing whitespace always
goes. Control characters and zero-width characters (ZWSP, ZWJ, BOM, soft hyphen) are
always dropped: they are invisible, carry no content and defeat deduplication.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from datasketch import MinHash, MinHashLSH

from .config.data import CleanParams, TaskSpec
from .language import CJK_RE, script_mix, space_separates, warn_chinese_only

ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad")
SHINGLE = 3  # character n-gram size of the near-duplicate signature
NUM_PERM = 128  # MinHash permutations
LSH_MARGIN = 0.1  # LSH retrieves candidates this far below the threshold; exact Jaccard then decides


@dataclass(frozen=True)
class Mapped:
    """A text as characters plus, per character, the index of the raw-text character it came from."""

    chars: tuple[str, ...]
    src: tuple[int, ...]

    @classmethod
    def of(cls, text: str) -> Mapped:
        """The identity mapping of a raw text."""
        return cls(tuple(text), tuple(range(len(text))))

    @property
    def text(self) -> str:
        """The current text."""
        return "".join(self.chars)


def _keep(m: Mapped, keep) -> Mapped:
    pairs = [(c, s) for c, s in zip(m.chars, m.src, strict=True) if keep(c)]
    return Mapped(tuple(c for c, _ in pairs), tuple(s for _, s in pairs))


def _joins(chunk: str, ch: str) -> bool:
    """Whether `ch` must be normalised together with the chunk before it (combining marks, composition)."""
    if chunk.isascii() and ch.isascii():
        return False  # fast path: ASCII never composes
    return _pair_joins(chunk, ch) if len(chunk) == 1 else _compose_check(chunk, ch)


@lru_cache(maxsize=1 << 16)
def _pair_joins(prev: str, ch: str) -> bool:
    return _compose_check(prev, ch)  # most chunks are one character: cache by character pair


def _compose_check(chunk: str, ch: str) -> bool:
    if unicodedata.combining(unicodedata.normalize("NFKD", ch)[0]):
        return True  # a (decomposed) combining mark may compose with a starter earlier in the chunk
    nfkc = unicodedata.normalize
    return nfkc("NFKC", chunk + ch) != nfkc("NFKC", chunk) + nfkc("NFKC", ch)


def apply_nfkc(m: Mapped) -> Mapped:
    """Unicode NFKC (full-width -> half-width, ㍿ -> 株式会社, ½ -> 1⁄2), normalised chunk by chunk.

    A chunk is a character plus what composes with it (combining marks, half-width voiced marks); every
    output character of a chunk maps to the chunk's first source character.
    """
    if unicodedata.is_normalized("NFKC", m.text):
        return m
    chars: list[str] = []
    src: list[int] = []
    start = 0
    for i in range(1, len(m.chars) + 1):
        if i < len(m.chars) and _joins("".join(m.chars[start:i]), m.chars[i]):
            continue
        out = unicodedata.normalize("NFKC", "".join(m.chars[start:i]))
        chars.extend(out)
        src.extend([m.src[start]] * len(out))
        start = i
    return Mapped(tuple(chars), tuple(src))


@lru_cache(maxsize=1)
def _t2s():
    import opencc  # imported lazily: loading the dictionaries costs time nobody else should pay

    return opencc.OpenCC("t2s")


def apply_to_simplified(m: Mapped) -> Mapped:
    """Traditional -> simplified Chinese with OpenCC 't2s' (phrase-aware)."""
    converter = _t2s()
    out = converter.convert(m.text)
    if len(out) == len(m.chars):
        # OpenCC's t2s dictionaries map every phrase to one of equal length, so offsets carry over 1:1
        return Mapped(tuple(out), m.src)
    # defensive: a dictionary that changes length loses phrase context but keeps an exact map
    chars: list[str] = []
    src: list[int] = []
    for ch, s in zip(m.chars, m.src, strict=True):
        conv = converter.convert(ch)
        chars.extend(conv)
        src.extend([s] * len(conv))
    return Mapped(tuple(chars), tuple(src))


@lru_cache(maxsize=4096)
def is_latin_or_digit(ch: str) -> bool:
    """Latin letter or digit, half- or full-width (after NFKC it is ASCII alphanumeric)."""
    folded = unicodedata.normalize("NFKC", ch)
    return folded.isascii() and folded.isalnum()


def apply_remove_latin_digits(m: Mapped) -> Mapped:
    """Drop Latin letters and digits."""
    return _keep(m, lambda c: not is_latin_or_digit(c))


def _invisible(ch: str) -> bool:
    return ch in ZERO_WIDTH or (unicodedata.category(ch) == "Cc" and not ch.isspace())


def apply_drop_invisible(m: Mapped) -> Mapped:
    """Drop control characters and zero-width characters."""
    return _keep(m, lambda c: not _invisible(c))


def _keeps_space(before: str, after: str, remove: bool) -> bool:
    return not remove or space_separates(before, after)


def apply_whitespace(m: Mapped, remove: bool) -> Mapped:
    """Remove whitespace runs next to CJK (keep one space elsewhere), or collapse them if `remove` is off."""
    chars: list[str] = []
    src: list[int] = []
    run_start: int | None = None  # source index of the first character of the pending whitespace run
    for ch, s in zip(m.chars, m.src, strict=True):
        if ch.isspace():
            run_start = s if run_start is None else run_start
            continue
        if run_start is not None and chars and _keeps_space(chars[-1], ch, remove):
            chars.append(" ")
            src.append(run_start)
        run_start = None
        chars.append(ch)
        src.append(s)
    return Mapped(tuple(chars), tuple(src))


def clean_text(text: str, params: CleanParams) -> Mapped:
    """Apply every enabled rule to `text`, returning the cleaned text with its offset map."""
    m = Mapped.of(text)
    if params.nfkc:
        m = apply_nfkc(m)
    if params.to_simplified:
        m = apply_to_simplified(m)
    if params.remove_latin_digits:
        m = apply_remove_latin_digits(m)
    m = apply_drop_invisible(m)
    return apply_whitespace(m, params.remove_whitespace)


def chinese_only_settings(params: CleanParams, tasks: dict[str, TaskSpec]) -> list[str]:
    """The settings of stage clean (and the task prompts it passes on) that only suit Chinese text, with why."""
    found = []
    if params.to_simplified:
        found.append("clean.to_simplified (converts traditional to simplified Chinese)")
    if params.remove_latin_digits:
        found.append("clean.remove_latin_digits (deletes every Latin letter and digit)")
    for name, task in tasks.items():
        if CJK_RE.search(task.instruction):
            found.append(f"tasks.{name}.instruction {task.instruction!r} (a Chinese prompt)")
    return found


def language_check(texts: list[str], params: CleanParams, tasks: dict[str, TaskSpec]) -> dict[str, int]:
    """Warn (one log line) when Chinese-only settings meet mostly-Latin texts; the metrics flag (0 / 1)."""
    return warn_chinese_only("clean", script_mix(texts), chinese_only_settings(params, tasks))


def realign_span(start: int, end: int, m: Mapped) -> tuple[int, int] | None:
    """The cleaned-text span of raw span [start, end): every output character whose source lies inside.

    Edge spaces are trimmed (a kept space can land at an edge once Latin characters are removed). None when
    nothing is left. The map is non-decreasing, so the result is contiguous and disjoint spans stay disjoint.
    """
    new_start, new_end = bisect_left(m.src, start), bisect_left(m.src, end)
    while new_start < new_end and m.chars[new_start].isspace():
        new_start += 1
    while new_end > new_start and m.chars[new_end - 1].isspace():
        new_end -= 1
    return (new_start, new_end) if new_start < new_end else None


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    """Character n-grams of `text` (the text itself when shorter than n)."""
    if len(text) <= n:
        return {text}
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two shingle sets."""
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Duplicate:
    """Why a text is a duplicate: reason duplicate_exact / duplicate_near, and of which kept record."""

    reason: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Signature:
    """What deduplication compares: the cleaned text, its 3-gram set and its MinHash."""

    text: str
    grams: set[str]
    minhash: MinHash | None


class Deduplicator:
    """Exact and near-duplicate detection (MinHash LSH on character 3-grams); the first occurrence wins.

    LSH only proposes candidates (from a threshold LSH_MARGIN lower, for recall); the exact 3-gram Jaccard
    decides, so `near_dup_threshold` means what it says and the result does not depend on hash luck.
    """

    def __init__(self, params: CleanParams, seed: int):
        self.exact = params.dedup_exact
        self.threshold = params.near_dup_threshold
        self.seed = seed
        self.texts: dict[str, Any] = {}  # cleaned text -> id of the kept record
        self.signatures: list[tuple[Any, set[str]]] = []  # kept id, shingles; LSH keys index this list
        self.lsh = None
        # one template: building the seeded permutations per MinHash would dominate the run time
        self.template = MinHash(num_perm=NUM_PERM, seed=seed)
        if self.threshold is not None:
            self.lsh = MinHashLSH(threshold=max(0.5, self.threshold - LSH_MARGIN), num_perm=NUM_PERM)

    def signature(self, text: str) -> Signature:
        """The text's shingles and (when near-dup detection is on) its seeded MinHash."""
        grams = shingles(text)
        minhash = None
        if self.lsh is not None:
            minhash = MinHash(
                num_perm=NUM_PERM,
                seed=self.seed,
                permutations=self.template.permutations,
                scheme=self.template.scheme,
            )
            minhash.update_batch([g.encode("utf-8") for g in sorted(grams)])
        return Signature(text, grams, minhash)

    def find(self, sig: Signature) -> Duplicate | None:
        """The kept record `sig` duplicates (exact first, then near), or None."""
        if self.exact and sig.text in self.texts:
            first = self.texts[sig.text]
            return Duplicate("duplicate_exact", f"same cleaned text as id {first!r}", {"duplicate_of": first})
        return self._near(sig.grams, sig.minhash) if self.lsh is not None else None

    def add(self, ident: Any, sig: Signature) -> None:
        """Remember `sig` as the kept record `ident`."""
        self.texts.setdefault(sig.text, ident)
        if self.lsh is not None:
            self.lsh.insert(len(self.signatures), sig.minhash)
            self.signatures.append((ident, sig.grams))

    def _near(self, grams: set[str], minhash: MinHash) -> Duplicate | None:
        best: tuple[float, Any] | None = None
        for key in sorted(self.lsh.query(minhash)):  # sorted: the earliest kept record wins a tie
            similarity = jaccard(grams, self.signatures[key][1])
            if similarity >= self.threshold and (best is None or similarity > best[0]):
                best = (similarity, self.signatures[key][0])
        if best is None:
            return None
        detail = f"3-gram Jaccard {best[0]:.3f} >= {self.threshold} with id {best[1]!r}"
        return Duplicate("duplicate_near", detail, {"duplicate_of": best[1], "jaccard": round(best[0], 4)})
