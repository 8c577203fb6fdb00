"""Stage clean on English, Chinese and mixed text: the right spaces stay, spans stay on their entities, and
Chinese-only settings meeting mostly-Latin records give one warning line and a metrics flag."""

from __future__ import annotations

import json
import logging

import pytest

from deepseek_sft.clean import clean_lines
from deepseek_sft.clean_rules import chinese_only_settings, clean_text, realign_span
from deepseek_sft.config import StageParams
from deepseek_sft.config.data import CleanParams, TaskSpec
from deepseek_sft.language import CHINESE_ONLY_FLAG

ENGLISH_TASKS = {
    "intent": TaskSpec(type="classification", field="intent", instruction="Sentiment:"),
    "entities": TaskSpec(type="extraction", field="entities", instruction="Entities:"),
}
CHINESE_TASKS = {
    "intent": TaskSpec(type="classification", field="intent", instruction="业务意图："),
    "entities": TaskSpec(type="extraction", field="entities", instruction="抽取实体："),
}


def cleaned(text: str, **overrides) -> str:
    """The cleaned text under the default clean params (plus `overrides`)."""
    return clean_text(text, CleanParams(**overrides)).text


def record(ident: str, text: str, surfaces: list[tuple[str, str]]) -> str:
    """A raw JSONL line with two agreeing annotators; each (surface, type) spans its first occurrence."""
    spans = []
    for surface, kind in surfaces:
        start = text.index(surface)
        spans.append({"start": start, "end": start + len(surface), "type": kind})
    annotation = {"intent": "neutral", "entities": spans}
    return json.dumps(
        {"id": ident, "text": text, "annotations": {"a": dict(annotation), "b": dict(annotation)}},
        ensure_ascii=False,
    )


def run(lines: list[str], tasks=ENGLISH_TASKS, **overrides):
    """clean_lines over in-memory lines, numbered from 1."""
    stage = StageParams(seed=42, tasks=tasks, section=CleanParams(**overrides))
    return clean_lines(list(enumerate(lines, start=1)), stage)


# --- whitespace ------------------------------------------------------------------------------------------


def test_english_keeps_every_space_that_separates_words():
    # the three texts the issue saw mangled ("Gran,the company", "27.7%and", "S.A.has")
    assert cleaned("Gran , the company") == "Gran , the company"
    assert cleaned("rose 27.7 % and") == "rose 27.7 % and"
    assert cleaned("Kone S.A. has") == "Kone S.A. has"
    # runs collapse to one space; ends are stripped; tabs and newlines are whitespace like any other
    assert cleaned("  Net sales\t\tincreased  to EUR 1.2 mn .\n") == "Net sales increased to EUR 1.2 mn ."
    # the space before a comma is kept on purpose (module docstring): clean does not detokenise English
    assert cleaned("Gran ,the company") == "Gran ,the company"


def test_chinese_loses_every_space_next_to_a_cjk_character_or_mark():
    assert cleaned(" 我 的\t卡\u3000找不到了 ， 请 帮我 挂失 。") == "我的卡找不到了,请帮我挂失。"
    assert cleaned("「 余额 」 多少 ？") == "「余额」多少?"  # 「」 are CJK punctuation; ？ folds to ?
    assert cleaned("カード を 紛失") == "カードを紛失"  # kana: no spaces between words either
    assert cleaned("카드 를 분실") == "카드 를 분실"  # Hangul separates words by spaces: they stay


def test_mixed_text_keeps_latin_spaces_and_drops_those_next_to_chinese():
    assert cleaned("转账500 USD给John Smith") == "转账500 USD给John Smith"  # already clean: unchanged
    assert cleaned("转账 500  USD 给 John   Smith") == "转账500 USD给John Smith"
    assert cleaned("请 给 Visa Platinum 卡 还款 1,000 元 , 谢谢") == "请给Visa Platinum卡还款1,000元,谢谢"


def test_remove_whitespace_off_only_collapses_runs_in_every_language():
    assert cleaned("我 的  卡 , Gran ,  the", remove_whitespace=False) == "我 的 卡 , Gran , the"


# --- spans -----------------------------------------------------------------------------------------------


def test_entity_spans_stay_on_their_text_in_english_chinese_and_mixed_records():
    lines = [
        record(
            "en",
            "Gran , the  company said Kone S.A.  has  sold 27.7 % .",
            [("Gran", "ORG"), ("Kone S.A.  has", "ORG")],
        ),
        record("zh", "我 在 招商银行 存了 5000 元", [("招商银行", "ORG"), ("5000 元", "MONEY")]),
        record("mix", "转账 500  USD 给 John   Smith", [("500  USD", "MONEY"), ("John   Smith", "PER")]),
    ]
    result = run(lines)
    texts = {r["id"]: r["text"] for r in result.kept}
    assert texts == {
        "en": "Gran , the company said Kone S.A. has sold 27.7 % .",
        "zh": "我在招商银行存了5000元",
        "mix": "转账500 USD给John Smith",
    }
    surfaces = {
        r["id"]: [r["text"][s["start"] : s["end"]] for s in r["annotations"]["a"]["entities"]]
        for r in result.kept
    }
    # clean re-aligns through the offset map each rule carries (clean_rules.Mapped): a span keeps exactly
    # the cleaned characters of its raw characters, so an inner space run shrinks with the text
    assert surfaces == {
        "en": ["Gran", "Kone S.A. has"],
        "zh": ["招商银行", "5000元"],
        "mix": ["500 USD", "John Smith"],
    }
    assert result.metrics["spans_total"] == 12 and result.metrics["spans_dropped"] == 0


def test_realigned_span_equals_the_cleaned_span_text_on_latin_and_mixed_text():
    text = "Operating  profit ,  Nokia  Oyj  and 中信 证券  rose"
    m = clean_text(text, CleanParams())
    for surface in ("Nokia  Oyj", "profit ,", "中信 证券", "Oyj  and 中信"):
        start = text.index(surface)
        new = realign_span(start, start + len(surface), m)
        assert m.text[new[0] : new[1]] == cleaned(surface), surface


# --- Chinese-only settings on Latin text -----------------------------------------------------------------


ENGLISH_LINES = [
    record("e1", "Nokia shares rose 5.5 percent in Helsinki .", [("Nokia", "ORG")]),
    record("e2", "Biohit said it will lay off 10 of its own personnel .", [("Biohit", "ORG")]),
]


def test_chinese_only_settings_on_english_records_give_one_warning_and_the_flag(caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.language")
    result = run(ENGLISH_LINES, tasks=CHINESE_TASKS, to_simplified=True)
    assert result.metrics[CHINESE_ONLY_FLAG] == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("clean: the records are mostly Latin script (100% Latin, 0% CJK of 71 letters)")
    for setting in (
        "clean.to_simplified",
        "tasks.intent.instruction '业务意图：'",
        "tasks.entities.instruction",
    ):
        assert setting in warning


def test_no_warning_for_english_settings_or_chinese_records(caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.language")
    assert run(ENGLISH_LINES, tasks=ENGLISH_TASKS).metrics[CHINESE_ONLY_FLAG] == 0
    chinese = [record("z1", "我的卡丢了，帮我挂失", []), record("z2", "給張偉轉賬五千元", [])]
    assert run(chinese, tasks=CHINESE_TASKS, to_simplified=True).metrics[CHINESE_ONLY_FLAG] == 0
    assert caplog.records == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, []),
        ({"to_simplified": True}, ["clean.to_simplified"]),
        ({"remove_latin_digits": True}, ["clean.remove_latin_digits"]),
    ],
)
def test_chinese_only_settings_lists_what_is_on(overrides, expected):
    found = chinese_only_settings(CleanParams(**overrides), ENGLISH_TASKS)
    assert [f.split(" ")[0] for f in found] == expected
