"""Stage clean: text rules, span re-alignment, rejects with reasons and line numbers, dedup, the script."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from deepseek_sft.clean import REASONS, clean_file, clean_lines, write_outputs
from deepseek_sft.clean_rules import (
    Deduplicator,
    Mapped,
    apply_nfkc,
    clean_text,
    jaccard,
    realign_span,
    shingles,
)
from deepseek_sft.config import StageParams, load_section
from deepseek_sft.config.data import CleanParams
from deepseek_sft.io import DataError

REPO = Path(__file__).resolve().parents[1]
TASKS = load_section("clean", REPO / "params.yaml").tasks


def stage(**overrides) -> StageParams:
    """The repo's tasks with a CleanParams built from defaults plus `overrides`."""
    return StageParams(seed=42, tasks=TASKS, section=CleanParams(**overrides))


def rec(ident, text, entities=(), intent="card_loss", annotators=("ann_a", "ann_b"), **extra) -> dict:
    """A raw record whose annotators all agree."""
    ann = {"intent": intent, "compliance": "compliant", "entities": [dict(e) for e in entities]}
    return {
        "id": ident,
        "text": text,
        "source": "test",
        "annotations": {a: dict(ann) for a in annotators},
        **extra,
    }


def line(obj) -> str:
    """One JSONL line."""
    return json.dumps(obj, ensure_ascii=False)


def run(lines: list[str], **overrides):
    """Clean in-memory lines (1-based numbering, blank lines skipped like io.iter_jsonl_lines)."""
    numbered = [(i, s) for i, s in enumerate(lines, start=1) if s.strip()]
    return clean_lines(numbered, stage(**overrides))


def ent(text: str, surface: str, type_: str) -> dict:
    """The span of the first occurrence of `surface` in `text`."""
    start = text.index(surface)
    return {"start": start, "end": start + len(surface), "type": type_}


def cleaned(text: str, **overrides) -> str:
    """The cleaned text alone."""
    return clean_text(text, CleanParams(**overrides)).text


# ---------------------------------------------------------------- text rules


def test_nfkc_folds_full_width_and_expands_compatibility_characters():
    assert cleaned("ＡＢＣ１２３，招商银行") == "ABC123,招商银行"
    assert cleaned("㍿のカード") == "株式会社のカード"  # 1 char -> 4 chars
    assert cleaned("利率½厘") == "利率1⁄2厘"  # 1 char -> 3 chars
    assert cleaned("ＡＢＣ１２３", nfkc=False) == "ＡＢＣ１２３"


def test_nfkc_chunkwise_equals_whole_text_nfkc():
    # combining marks and half-width voiced marks compose across characters; chunks must keep them together
    pool = list("中文ＡＢ１ab ½㍿ﾊﾟﾞｶe\u0301\u0316가\u1100\u1161\u11a8①´")
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 10)))
        assert apply_nfkc(Mapped.of(text)).text == unicodedata.normalize("NFKC", text), repr(text)


def test_whitespace_removed_but_one_space_kept_between_latin_tokens():
    assert cleaned(" 我 的\t卡\u3000找不到了\n") == "我的卡找不到了"
    assert cleaned("Visa   Platinum 卡 iPhone 15 转 USD 100 元") == "Visa Platinum卡iPhone 15转USD 100元"
    assert cleaned("ＵＳＤ　１００") == "USD 100"  # full-width space between full-width Latin tokens
    assert cleaned("我 的  卡", remove_whitespace=False) == "我 的 卡"  # off: collapse runs only
    assert cleaned("挂\u200b失\ufeff一下\x07") == "挂失一下"  # invisible characters always go


def test_remove_latin_digits_is_off_by_default_and_drops_them_when_on():
    assert cleaned("转账5000元给ABC") == "转账5000元给ABC"
    assert cleaned("转账5000元给ABC，ＸＹ", remove_latin_digits=True) == "转账元给,"


def test_to_simplified_converts_traditional_and_keeps_offsets():
    text = "我的銀行帳戶被凍結了"
    m = clean_text(text, CleanParams(to_simplified=True))
    assert m.text == "我的银行帐户被冻结了"
    assert realign_span(2, 6, m) == (2, 6)
    assert cleaned(text) == text  # off by default


def test_length_bounds_apply_to_the_cleaned_text():
    result = run(
        [line(rec(1, "我  的  卡")), line(rec(2, "挂失" * 10)), line(rec(3, "我的卡找不到了"))], max_chars=15
    )
    reasons = {r["line"]: r["reason"] for r in result.rejects}
    assert reasons == {1: "too_short", 2: "too_long"}  # line 1 has 7 raw chars but 3 after cleaning
    assert [r["id"] for r in result.kept] == [3]


# ---------------------------------------------------------------- span re-alignment


def test_spans_follow_whitespace_removal_in_every_annotator():
    text = "我 在 招商银行 存了 5000 元，Ｖｉｓａ卡"
    spans = [ent(text, "招商银行", "ORG"), ent(text, "5000 元", "MONEY"), ent(text, "Ｖｉｓａ卡", "PRODUCT")]
    spans[0]["text"] = "招商银行"
    result = run([line(rec("r1", text, spans, annotators=("ann_a", "ann_b", "ann_c")))])
    out = result.kept[0]
    assert out["text"] == "我在招商银行存了5000元,Visa卡"
    for ann in out["annotations"].values():
        surfaces = [out["text"][s["start"] : s["end"]] for s in ann["entities"]]
        assert surfaces == ["招商银行", "5000元", "Visa卡"]  # same characters, after normalisation
        assert ann["entities"][0]["text"] == "招商银行"
    assert result.metrics["spans_total"] == 9
    assert result.metrics["spans_realigned"] == 9
    assert result.metrics["spans_dropped"] == 0


def test_span_whose_characters_all_vanish_is_dropped_and_counted():
    text = "请给ABC转账5000元"
    spans = [ent(text, "ABC", "ORG"), ent(text, "5000元", "MONEY")]
    result = run([line(rec("r1", text, spans))], remove_latin_digits=True)
    out = result.kept[0]
    assert out["text"] == "请给转账元"
    assert out["annotations"]["ann_a"]["entities"] == [{"start": 4, "end": 5, "type": "MONEY"}]
    assert result.metrics["spans_dropped"] == 2  # the ORG span of both annotators
    assert [d["annotator"] for d in out["meta"]["clean_dropped_spans"]] == ["ann_a", "ann_b"]


def test_span_over_expanding_character_covers_its_whole_expansion():
    text = "购买㍿产品"
    m = clean_text(text, CleanParams())
    new = realign_span(2, 3, m)
    assert m.text[new[0] : new[1]] == "株式会社"
    assert m.text[realign_span(3, 5, m)[0] : realign_span(3, 5, m)[1]] == "产品"


CONTENT = (
    list("银行卡转账我的存款贷利率招商平安，。！（）")
    + list("ＡＢＣａｂ１２３abcXY019½㍿①")
    + list("銀帳戶轉們貸認證號碼億萬")
)
GAPS = [" ", "  ", "\t", "\u3000", "\n", "\u00a0", "\u200b", " \u200b "]


def _random_case(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """A text of content characters with random whitespace between them, plus disjoint content-edged spans."""
    parts, content_pos = [], []
    pos = 0
    for _ in range(rng.randint(1, 25)):
        if rng.random() < 0.35:
            gap = rng.choice(GAPS)
            parts.append(gap)
            pos += len(gap)
        parts.append(rng.choice(CONTENT))
        content_pos.append(pos)
        pos += 1
    if rng.random() < 0.5:
        parts.append(rng.choice(GAPS))
    picks = sorted(rng.sample(content_pos, k=min(len(content_pos), 2 * rng.randint(1, 3))))
    spans = [(picks[i], picks[i + 1] + 1) for i in range(0, len(picks) - 1, 2)]
    return "".join(parts), spans


def test_span_realignment_property_over_random_cases():
    # property: the cleaned span holds exactly the cleaned characters of the raw span (or it is dropped
    # when they all vanish), and disjoint spans stay disjoint and in order
    rng = random.Random(42)
    for case in range(1500):
        text, spans = _random_case(rng)
        params = CleanParams(
            nfkc=rng.random() < 0.8,
            remove_whitespace=rng.random() < 0.8,
            to_simplified=rng.random() < 0.3,
            remove_latin_digits=rng.random() < 0.2,
        )
        m = clean_text(text, params)
        previous_end = 0
        for start, end in spans:
            expected = clean_text(text[start:end], params).text
            new = realign_span(start, end, m)
            if not expected:
                assert new is None, (case, text, start, end)
                continue
            assert new is not None and m.text[new[0] : new[1]] == expected, (case, text, start, end, params)
            assert new[0] >= previous_end
            previous_end = new[1]


# ---------------------------------------------------------------- rejects


GOOD = line(rec("ok", "我的卡找不到了，帮我挂失一下"))
TEXT = "招商银行转账5000元"
BAD_LINES = {
    "malformed_json": '{"id": "x", "text": "我的卡找不到了"',
    "not_object": '["我的卡找不到了"]',
    "missing_id": line({k: v for k, v in rec("x", TEXT).items() if k != "id"}),
    "missing_text": line({k: v for k, v in rec("x", TEXT).items() if k != "text"}),
    "text_not_string": line({**rec("x", TEXT), "text": 12345}),
    "empty_text": line(rec("x", " \u3000 ")),
    "no_annotations": line({**rec("x", TEXT), "annotations": {}}),
    "bad_annotations": line({**rec("x", TEXT), "annotations": {"ann_a": "card_loss"}}),
    "unknown_label": line(rec("x", TEXT, intent="buy_pizza")),
    "invalid_label": line(rec("x", TEXT, intent=7)),
    "unknown_entity_type": line(rec("x", TEXT, [{"start": 0, "end": 4, "type": "CITY"}])),
    "span_not_int": line(rec("x", TEXT, [{"start": "0", "end": 4, "type": "ORG"}])),
    "span_start_ge_end": line(rec("x", TEXT, [{"start": 4, "end": 4, "type": "ORG"}])),
    "span_out_of_range": line(rec("x", TEXT, [{"start": 6, "end": 40, "type": "MONEY"}])),
    "span_invalid": line(rec("x", TEXT, [{"start": 0, "end": 4}])),
    "too_short": line(rec("x", "挂 失")),
    "too_long": line(rec("x", "挂失" * 300)),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_input_class_is_rejected_with_reason_and_line(reason):
    bad = BAD_LINES[reason]
    result = run([GOOD, "", bad, line(rec("ok2", "我想查询一下信用卡账单的还款日期"))])
    assert [r["id"] for r in result.kept] == ["ok", "ok2"]
    [reject] = result.rejects
    assert (reject["reason"], reject["line"], reject["source_line"]) == (reason, 3, bad)
    assert reject["detail"]
    assert result.metrics[f"rejected_{reason}"] == 1 and result.metrics["rejected"] == 1


def test_fetch_passthrough_of_unreadable_input_is_rejected_with_its_origin():
    def marked(n, error, raw=None):
        obj = {"id": f"x-{n}", "text": "", "source": "local", "annotations": {}, "_error": error}
        obj["meta"] = {"file": "data/x.jsonl", "line": n}
        return line({**obj, "_raw_line": raw} if raw is not None else obj)

    lines = [
        GOOD,
        marked(7, "invalid JSON: Expecting ',' delimiter (column 17)", '{"text": "我的卡'),
        marked(8, "not valid UTF-8 (character 5)", "我的\ufffd卡"),
        marked(9, "expected a JSON object, got list", "[1]"),
        marked(10, "second annotation by 'ann_a' for id '3' (first at row 2)"),
    ]
    result = run(lines)
    rows = [(r["reason"], r["line"], r["id"], r["source_line"]) for r in result.rejects]
    assert rows == [
        ("malformed_json", 2, "x-7", '{"text": "我的卡'),
        ("undecodable", 3, "x-8", "我的\ufffd卡"),
        ("not_object", 4, "x-9", "[1]"),
        ("fetch_error", 5, "x-10", lines[4]),
    ]
    assert result.rejects[0]["detail"] == "data/x.jsonl:7: invalid JSON: Expecting ',' delimiter (column 17)"
    assert result.rejects[0]["origin"] == {"file": "data/x.jsonl", "line": 7}


def test_undecodable_bytes_are_rejected_not_crashing(tmp_path):
    path = tmp_path / "raw.jsonl"
    bad = b'{"id": "x", "text": "\xe6\x88\x91\xff\xfe\xe7\x9a\x84\xe5\x8d\xa1"}'
    lone = json.dumps(rec("z", "挂失一下")).replace("\\u6302", "\\ud800")  # a lone-surrogate escape
    path.write_bytes(b"\n".join([GOOD.encode(), bad, lone.encode(), b""]))
    result = clean_file(path, stage())
    undecodable = [r for r in result.rejects if r["reason"] == "undecodable"]
    assert [r["line"] for r in undecodable] == [2, 3]
    assert "\\xff\\xfe" in undecodable[0]["source_line"]
    out = tmp_path / "out"
    write_outputs(result, out / "clean.jsonl", out / "rejected.jsonl", out / "reports")
    (out / "rejected.jsonl").read_text(encoding="utf-8")  # valid UTF-8, i.e. no surrogate leaked out


def test_duplicate_id_with_different_text_is_rejected():
    result = run([GOOD, line(rec("ok", "我要转账五千元给张三"))])
    assert [(r["reason"], r["line"]) for r in result.rejects] == [("duplicate_id", 2)]


# ---------------------------------------------------------------- dedup and counts


LONG = "您好，我上个月在招商银行办理的信用卡账单金额有误，请帮我核实一下并尽快处理这笔费用争议，谢谢您的帮助"


def test_exact_duplicates_after_cleaning_keep_the_first_occurrence():
    result = run(
        [
            line(rec("a", "我的卡找不到了")),
            line(rec("b", "我的卡 找不到了")),
            line(rec("c", "我的卡找不到了")),
        ]
    )
    assert [r["id"] for r in result.kept] == ["a"]
    assert [(r["reason"], r["duplicate_of"], r["line"]) for r in result.rejects] == [
        ("duplicate_exact", "a", 2),
        ("duplicate_exact", "a", 3),
    ]
    assert result.metrics["duplicates_exact"] == 2 and result.metrics["rejected"] == 0
    both_off = run(
        [line(rec("a", "我的卡找不到了")), line(rec("b", "我的卡找不到了"))],
        dedup_exact=False,
        near_dup_threshold=None,
    )
    assert both_off.metrics["kept"] == 2


def test_near_duplicate_one_char_variant_is_caught_and_a_different_sentence_is_not():
    # 3-gram Jaccard: a substitution inside the text changes 3 shingles, J = (n-3)/(n+3), which reaches 0.9
    # from ~60 characters on; a change at either end touches only 1 shingle
    longer = LONG + "，麻烦尽快回电话给我"
    inside = longer.replace("上个月", "上个周")
    at_end = LONG[:-1] + "吧"
    other = "请问贵行的大额存单现在年利率是多少，起存金额多少，能不能提前支取，提前支取的话利息怎么计算呢"
    assert jaccard(shingles(longer), shingles(inside)) >= 0.9 > jaccard(shingles(LONG), shingles(other))
    lines = [line(rec("a", longer)), line(rec("b", inside)), line(rec("c", LONG)), line(rec("d", at_end))]
    result = run([*lines, line(rec("e", other))], near_dup_threshold=0.9)
    assert [r["id"] for r in result.kept] == ["a", "c", "e"]
    dups = [(r["reason"], r["id"], r["duplicate_of"], r["line"]) for r in result.rejects]
    assert dups == [("duplicate_near", "b", "a", 2), ("duplicate_near", "d", "c", 4)]
    assert all(r["jaccard"] >= 0.9 for r in result.rejects)
    off = run([line(rec("a", LONG)), line(rec("b", at_end))], near_dup_threshold=None)
    assert off.metrics["kept"] == 2


def test_near_dedup_threshold_is_the_exact_jaccard():
    mid = LONG.replace("上个月", "上个周")  # one substitution in a 50-char text: J = 45/51 = 0.88
    assert round(jaccard(shingles(LONG), shingles(mid)), 3) == 0.882
    for threshold, expected in ((0.9, None), (0.85, "a")):
        dedup = Deduplicator(CleanParams(near_dup_threshold=threshold), seed=42)
        dedup.add("a", dedup.signature(LONG))
        found = dedup.find(dedup.signature(mid))
        assert (found and found.extra["duplicate_of"]) == expected


def test_counts_add_up_on_a_mixed_file():
    lines = [
        GOOD,
        line(rec("d1", "我的卡找不到了，帮我挂失一下")),
        line(rec("n1", LONG)),
        line(rec("n2", LONG + "吧")),
    ]
    lines += list(BAD_LINES.values())
    result = run(lines)
    m = result.metrics
    assert m["records_in"] == len(lines) == 4 + len(BAD_LINES)
    assert (m["kept"], m["rejected"], m["duplicates_exact"], m["duplicates_near"]) == (
        2,
        len(BAD_LINES),
        1,
        1,
    )
    assert m["records_in"] == m["kept"] + m["rejected"] + m["duplicates_exact"] + m["duplicates_near"]
    assert sum(m[f"rejected_{r}"] for r in REASONS) == m["rejected"]
    assert len(result.rejects) == m["rejected"] + m["duplicates_exact"] + m["duplicates_near"]
    assert 0.0 < m["chars_removed_share"] < 1.0


def test_all_rejected_input_raises_naming_file_and_top_reasons(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text("\n".join(["not json", "{]", line(rec("x", "挂")), "[1]"]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        clean_file(path, stage())
    message = str(err.value)
    assert str(path) in message and "no usable record among 4 lines" in message
    assert "malformed_json x2 (first at line 1" in message and "too_short x1" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        clean_file(empty, stage())
    with pytest.raises(DataError, match="not found"):
        clean_file(tmp_path / "missing.jsonl", stage())


# ---------------------------------------------------------------- the script


def _run_script(tmp_path: Path, raw: Path, params: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "clean.py"),
        "--in",
        str(raw),
        "--out",
        "data/interim/clean.jsonl",
    ]
    cmd += ["--rejects", "data/interim/rejected.jsonl", "--reports", "reports/clean"]
    env = {"DSFT_PARAMS": str(params), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_script_end_to_end(tmp_path, params_copy):
    raw = tmp_path / "raw.jsonl"
    text = "我在 招商银行 存了 5000 元"
    lines = [line(rec(f"r{i}", f"{text}，第{i}笔", [ent(text, "招商银行", "ORG")])) for i in range(5)]
    lines += [line(rec("dup", f"{text}，第0笔")), "oops", line(rec("bad", TEXT, intent="buy_pizza"))]
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = _run_script(tmp_path, raw, params_copy)
    assert proc.returncode == 0, proc.stderr
    kept = [
        json.loads(s)
        for s in (tmp_path / "data/interim/clean.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["id"] for r in kept] == [f"r{i}" for i in range(5)]
    assert all(r["text"][slice(2, 6)] == "招商银行" for r in kept)
    assert kept[0]["annotations"]["ann_a"]["entities"] == [{"start": 2, "end": 6, "type": "ORG"}]
    rejects = (tmp_path / "data/interim/rejected.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s)["reason"] for s in rejects] == [
        "duplicate_exact",
        "malformed_json",
        "unknown_label",
    ]
    metrics = json.loads((tmp_path / "reports/clean/metrics.json").read_text())
    assert (metrics["records_in"], metrics["kept"], metrics["rejected"], metrics["duplicates_exact"]) == (
        8,
        5,
        2,
        1,
    )
    assert (tmp_path / "reports/clean/reject_reasons.csv").read_text().splitlines()[0] == "reason,count"
    first = (tmp_path / "data/interim/clean.jsonl").read_bytes()
    assert _run_script(tmp_path, raw, params_copy).returncode == 0
    assert (tmp_path / "data/interim/clean.jsonl").read_bytes() == first  # deterministic

    raw.write_text("oops\n[1]\n", encoding="utf-8")
    proc = _run_script(tmp_path, raw, params_copy)
    assert proc.returncode == 1
    assert f"{raw}: no usable record among 2 lines" in proc.stderr and "malformed_json x1" in proc.stderr
