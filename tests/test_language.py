"""Script detection shared by fetch, clean and augment: letter shares, the space rule, language codes."""

from __future__ import annotations

import logging

import pytest

from deepseek_sft.config.data import TaskSpec
from deepseek_sft.fetch.summary import summarize
from deepseek_sft.language import (
    CHINESE_ONLY_FLAG,
    ScriptMix,
    language_script,
    script_mix,
    space_separates,
    tidy_spaces,
    warn_chinese_only,
)

TASKS = {"intent": TaskSpec(type="classification", field="intent", instruction="Sentiment:")}


def test_script_mix_counts_letters_only():
    mix = script_mix(["转账500 USD给John", "Ünal 払い", None, "12,345 !"])  # None: a malformed record
    # letters: 转账给 (3 CJK) + USD John (7 Latin) + Ünal (4 Latin) + 払い (2 CJK); digits and marks are not
    assert mix == ScriptMix(letters=16, cjk=5, latin=11)
    assert (mix.cjk_share, mix.latin_share, mix.dominant) == (5 / 16, 11 / 16, "latin")
    assert script_mix(["Привет мир"]).dominant == "other"  # Cyrillic: neither CJK nor Latin
    assert script_mix(["카드 분실"]).dominant == "other"  # Hangul is not CJK here: Korean uses spaces
    assert script_mix(["12,000"]).dominant == "none"


def test_space_rule_and_tidy_spaces():
    assert (
        not space_separates("卡", "A") and not space_separates("A", "，") and not space_separates("」", "x")
    )
    assert space_separates("n", ",") and space_separates("7", "%") and space_separates(".", "h")
    assert tidy_spaces("  转账 500  USD 给 John   Smith , ok ") == "转账500 USD给John Smith , ok"


@pytest.mark.parametrize(
    ("code", "script"),
    [
        ("zh", "cjk"),
        ("zh-CN", "cjk"),
        ("zh_Hant", "cjk"),
        ("ja", "cjk"),
        ("en-US", "latin"),
        ("de", "latin"),
        ("ko", None),
        ("xx", None),
    ],
)
def test_language_script(code, script):
    assert language_script(code) == script


def test_warning_only_when_chinese_settings_meet_mostly_latin_text(caplog):
    caplog.set_level(logging.WARNING, logger="deepseek_sft.language")
    latin, chinese = script_mix(["Sales rose"]), script_mix(["销售额上升"])
    assert warn_chinese_only("clean", latin, []) == {CHINESE_ONLY_FLAG: 0}
    assert warn_chinese_only("clean", chinese, ["clean.to_simplified (x)"]) == {CHINESE_ONLY_FLAG: 0}
    assert caplog.records == []
    assert warn_chinese_only("clean", latin, ["clean.to_simplified (x)"]) == {CHINESE_ONLY_FLAG: 1}
    assert [r.getMessage() for r in caplog.records] == [
        "clean: the records are mostly Latin script (100% Latin, 0% CJK of 9 letters) but these settings only "
        "suit Chinese text: clean.to_simplified (x)"
    ]


def test_fetch_metrics_record_the_script_mix():
    records = [
        {"id": 1, "text": "Nokia shares rose", "annotations": {"a": {"intent": "positive"}}},
        {"id": 2, "text": "诺基亚股价上涨", "annotations": {"a": {"intent": "positive"}}},
        {"id": 3, "_error": "invalid JSON", "_raw_line": "{oops"},  # no text: counted as no letters
    ]
    stats = summarize(records, TASKS, seconds=0.0)
    # 15 Latin letters, 7 CJK: shares of the 22 letters, rounded to 4 places
    assert (stats["script_cjk_share"], stats["script_latin_share"]) == (0.3182, 0.6818)
    chinese = summarize(records[1:2], TASKS, seconds=0.0)
    assert (chinese["script_cjk_share"], chinese["script_latin_share"]) == (1.0, 0.0)
