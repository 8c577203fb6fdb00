"""Which writing systems a text uses (CJK or Latin), so one set of defaults serves Chinese, English and both.

The stages that must treat Chinese and English differently share these definitions:
- clean drops whitespace only next to CJK characters or CJK punctuation (`space_separates`): Chinese and
  Japanese do not separate words by spaces, Latin-script languages do;
- augment's methods say which scripts they serve and report data they cannot serve (`ScriptMix.dominant`);
- fetch records the script mix of what it fetched (`ScriptMix.metrics`);
- clean and augment warn once when a setting that only suits Chinese meets mostly-Latin text
  (`warn_chinese_only`), reading the mix from the records they process rather than from fetch's report,
  so the check holds for whatever input reaches them.

Hangul is not CJK here on purpose: Korean separates words by spaces.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Han ideographs (+ extensions, compatibility), kana (full- and half-width), bopomofo, 々 and 〇
_CJK_LETTERS = (
    "\u3005-\u3007\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
)
# CJK symbols and punctuation, full-width punctuation (letters/digits excluded), vertical and small forms
_CJK_PUNCT = (
    "\u3000-\u3004\u3008-\u303f\ufe10-\ufe1f\ufe30-\ufe6f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40"
    "\uff5b-\uff65\uffe0-\uffef"
)
_LATIN_LETTERS = (
    "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a"
)
CJK_RE = re.compile(f"[{_CJK_LETTERS}]")
SPACELESS_RE = re.compile(f"[{_CJK_LETTERS}{_CJK_PUNCT}]")
LATIN_RE = re.compile(f"[{_LATIN_LETTERS}]")
LETTER_RE = re.compile(r"[^\W\d_]")  # any letter of any script
MOSTLY = 0.5  # a script "dominates" a text when it holds more than this share of its letters

CHINESE_ONLY_FLAG = "chinese_only_settings_on_latin"  # the metrics key of warn_chinese_only (0 / 1)

# language code (ISO 639-1, the part before "-" or "_") -> the script its text is written in
LANGUAGE_SCRIPTS = {
    **dict.fromkeys(("zh", "ja", "yue", "wuu", "lzh"), "cjk"),
    **dict.fromkeys(
        "en de fr es it pt nl sv da no nb nn fi pl cs sk sl hr ro hu tr id ms vi et lv lt ca eu gl af sw".split(),  # noqa: SIM905
        "latin",
    ),
}


def is_cjk(ch: str) -> bool:
    """A Han ideograph, kana or bopomofo character: a script written without spaces between words."""
    return CJK_RE.fullmatch(ch) is not None


def is_spaceless(ch: str) -> bool:
    """A CJK letter or CJK / full-width punctuation mark: no space is needed on either side of it."""
    return SPACELESS_RE.fullmatch(ch) is not None


def space_separates(before: str, after: str) -> bool:
    """Whether a whitespace run between two characters separates words (and must stay, as one space).

    It does unless one side is CJK: "Gran , the", "27.7 % and", "S.A. has", "500 USD", "John Smith" keep
    their spaces; "我 的卡", "卡 ，", "转账 500", "USD 给" lose them.
    """
    return not (is_spaceless(before) or is_spaceless(after))


def tidy_spaces(text: str) -> str:
    """`text` with whitespace next to CJK removed, other runs collapsed to one space, and the ends stripped."""
    out: list[str] = []
    pending = False
    for ch in text:
        if ch.isspace():
            pending = True
            continue
        if pending and out and space_separates(out[-1], ch):
            out.append(" ")
        pending = False
        out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class ScriptMix:
    """Letter counts of some texts: all letters, CJK letters and Latin letters (digits and marks excluded)."""

    letters: int = 0
    cjk: int = 0
    latin: int = 0

    def __add__(self, other: ScriptMix) -> ScriptMix:
        return ScriptMix(self.letters + other.letters, self.cjk + other.cjk, self.latin + other.latin)

    @property
    def cjk_share(self) -> float:
        """Share of the letters that are CJK (0.0 without letters)."""
        return self.cjk / self.letters if self.letters else 0.0

    @property
    def latin_share(self) -> float:
        """Share of the letters that are Latin (0.0 without letters)."""
        return self.latin / self.letters if self.letters else 0.0

    @property
    def dominant(self) -> str:
        """Script "cjk" or "latin" when that script holds most letters; "other" (e.g. Cyrillic) or "none"."""
        if not self.letters:
            return "none"
        if self.cjk_share > MOSTLY:
            return "cjk"
        return "latin" if self.latin_share > MOSTLY else "other"

    @property
    def mostly_latin(self) -> bool:
        """More than half of the letters are Latin."""
        return self.dominant == "latin"

    def describe(self) -> str:
        """E.g. "97% Latin, 0% CJK of 12034 letters"."""
        return f"{self.latin_share:.0%} Latin, {self.cjk_share:.0%} CJK of {self.letters} letters"

    def metrics(self) -> dict[str, float]:
        """Flat metrics: the CJK and Latin shares of the letters."""
        return {
            "script_cjk_share": round(self.cjk_share, 4),
            "script_latin_share": round(self.latin_share, 4),
        }


def mix_of(text: str) -> ScriptMix:
    """The script mix of one text."""
    return ScriptMix(len(LETTER_RE.findall(text)), len(CJK_RE.findall(text)), len(LATIN_RE.findall(text)))


def script_mix(texts: Iterable[str]) -> ScriptMix:
    """The script mix of many texts together (non-strings are skipped: fetch passes malformed records on)."""
    total = ScriptMix()
    for text in texts:
        if isinstance(text, str):
            total += mix_of(text)
    return total


def language_script(code: str) -> str | None:
    """The script a language code ("zh", "en-US", "zh_Hans") is written in; None when not known here."""
    return LANGUAGE_SCRIPTS.get(re.split(r"[-_]", code.strip().lower())[0])


def warn_chinese_only(stage: str, mix: ScriptMix, settings: list[str]) -> dict[str, int]:
    """One warning line when settings that only suit Chinese meet mostly-Latin text; the metrics flag.

    `settings` name the Chinese-only settings that are on (e.g. "clean.to_simplified"), each with why.
    """
    flagged = bool(settings) and mix.mostly_latin
    if flagged:
        log.warning(
            "%s: the records are mostly Latin script (%s) but these settings only suit Chinese text: %s",
            stage, mix.describe(), "; ".join(settings),
        )  # fmt: skip
    return {CHINESE_ONLY_FLAG: int(flagged)}
