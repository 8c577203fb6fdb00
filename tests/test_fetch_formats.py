"""The local source on users' real files: span shapes, multi-label fields, JSON arrays and globs (NLU++),
byte-order marks, ragged CSV rows, Label Studio spans in UTF-16 offsets, and the path to the user's line."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
import yaml

from deepseek_sft.clean import clean_lines
from deepseek_sft.config import TaskSpec, load_section
from deepseek_sft.fetch import fetch
from deepseek_sft.fetch.spans import canonical_spans, utf16_to_chars
from deepseek_sft.fetch.tables import label_value
from deepseek_sft.io import DataError
from deepseek_sft.label_qa import label_qa
from deepseek_sft.records import GOLD_ANNOTATOR

REPO = Path(__file__).resolve().parents[1]
SLOT_TASKS = {
    "intent": {"type": "classification", "field": "intent", "instruction": "Intents:"},
    "entities": {
        "type": "extraction",
        "field": "entities",
        "instruction": "Slots:",
        "answer_format": "items",
    },
}


SLOT_TASKS_SPEC = {name: TaskSpec(**spec) for name, spec in SLOT_TASKS.items()}


def write_params(tmp_path: Path, local: dict, tasks: dict | None = None) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    if tasks is not None:
        raw["tasks"] = tasks
    raw["fetch"] = {"source": "local", "local": local}
    raw["clean"].update(near_dup_threshold=None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def fetched(tmp_path: Path, local: dict, tasks: dict | None = None) -> list[dict]:
    return fetch(load_section("fetch", write_params(tmp_path, local, tasks)))[0]


def cleaned(tmp_path: Path, records: list[dict]):
    lines = [(i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(records, start=1)]
    return clean_lines(lines, load_section("clean", tmp_path / "params.yaml"))


# --- span shapes and multi-label fields --------------------------------------------------------------


def test_every_accepted_span_shape_becomes_the_record_shape():
    ours = [{"start": 0, "end": 2, "type": "ORG"}]
    assert canonical_spans(ours) == ours
    assert canonical_spans([{"start": 0, "end": 2, "label": "ORG"}]) == ours
    assert canonical_spans([[0, 2, "ORG"]]) == ours
    nlupp = {"date": {"text": "next week", "span": [4, 13], "value": {"day": 1}}, "amount": {"span": [0, 2]}}
    assert canonical_spans(nlupp) == [
        {"start": 4, "end": 13, "type": "date", "text": "next week"},
        {"start": 0, "end": 2, "type": "amount"},
    ]
    assert canonical_spans({"time": [{"span": [0, 1]}, {"span": [3, 4]}]}) == [
        {"start": 0, "end": 1, "type": "time"},
        {"start": 3, "end": 4, "type": "time"},
    ]
    assert canonical_spans("not spans") == "not spans"  # clean rejects it with its reason


NLUPP = [
    {"text": "How long does it take to get a new pin?", "intents": ["how_long", "pin", "new"]},
    {
        "text": "ok, I can make it between 9 05 in the morning and 25 to 7 p.m. any day next week",
        "intents": ["make_open_apply_setup_get_activate", "acknowledge"],
        "slots": {
            "date_period": {"text": "next week", "span": [71, 80], "values": {"type": "absolute"}},
            "time_from": {"text": "9 05 in the morning", "span": [26, 45], "value": {"hour": 9}},
        },
    },
    {"text": "I want to send 500 euros to Anna Smith", "intents": ["transfer"],
     "slots": {"amount_of_money": {"text": "500 euros", "span": [15, 24]},
               "person_name": {"text": "Anna Smit", "span": [28, 38]}}},  # a wrong stated text
]  # fmt: skip


def write_folds(folder: Path, n: int = 3) -> None:
    folder.mkdir()
    for i in range(n):  # NLU++ keeps its folds as JSON arrays, one file each
        items = [{**item, "text": f"{item['text']}"} for item in NLUPP]
        (folder / f"fold{i}.json").write_text(json.dumps(items), encoding="utf-8")
    (folder / "ontology.json").write_text('{"intents": {}}', encoding="utf-8")


def test_nlupp_folds_by_glob_keep_multi_label_intents_and_slot_spans(tmp_path):
    write_folds(tmp_path / "nlupp")
    local = {
        "path": str(tmp_path / "nlupp" / "fold*.json"),
        "label_columns": {"intent": "intents", "entities": "slots"},
        "multi_label_join": "+",
    }
    records = fetched(tmp_path, local, SLOT_TASKS)
    assert [r["id"] for r in records[:4]] == ["fold0-1", "fold0-2", "fold0-3", "fold1-1"]
    assert len(records) == 9 and records[1]["meta"] == {"file": str(tmp_path / "nlupp/fold0.json"), "item": 2}
    gold = records[1]["annotations"][GOLD_ANNOTATOR]
    assert gold["intent"] == "acknowledge+make_open_apply_setup_get_activate"  # sorted, joined
    assert gold["entities"] == [
        {"start": 71, "end": 80, "type": "date_period", "text": "next week"},
        {"start": 26, "end": 45, "type": "time_from", "text": "9 05 in the morning"},
    ]
    assert records[0]["annotations"][GOLD_ANNOTATOR]["entities"] == []  # no slots: labelled, no entities
    assert label_value("intent", [], SLOT_TASKS_SPEC, "+") is None  # an empty list: no label, not ""
    assert label_value("intent", ["b", "a", "b"], SLOT_TASKS_SPEC, "+") == "a+b"
    result = cleaned(tmp_path, records[:3])
    # the stated text of person_name disagrees with its offsets: the record's only annotation is dropped
    assert [(r["reason"], r["id"]) for r in result.rejects] == [("span_text_mismatch", "fold0-3")]
    assert "text[28:38]='Anna Smith' but the span says 'Anna Smit'" in result.rejects[0]["detail"]
    kept = result.kept[1]["annotations"][GOLD_ANNOTATOR]["entities"]
    text = result.kept[1]["text"]
    assert [text[s["start"] : s["end"]] for s in kept] == ["next week", "9 05 in the morning"]


def test_list_labels_without_multi_label_join_are_a_clear_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(NLUPP[:1]), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"rows\.json: item 1: column 'intents' \(label_columns.intent\) holds a list"
    ):
        fetched(tmp_path, {"path": str(path), "label_columns": {"intent": "intents"}}, SLOT_TASKS)


def test_path_as_a_list_of_files_and_globs_in_the_order_given(tmp_path):
    (tmp_path / "b.csv").write_text("text\nbee\n", encoding="utf-8")
    (tmp_path / "a1.csv").write_text("text\nant\n", encoding="utf-8")
    (tmp_path / "a2.csv").write_text("text\nape\n", encoding="utf-8")
    records = fetched(tmp_path, {"path": [str(tmp_path / "b.csv"), str(tmp_path / "a*.csv")]})
    assert [r["text"] for r in records] == ["bee", "ant", "ape"]
    with pytest.raises(DataError, match=r"nope\*\.csv: the pattern \(fetch.local.path\) matches no file"):
        fetched(tmp_path, {"path": str(tmp_path / "nope*.csv")})


# --- encodings, header-only and ragged CSV files (issue 15, item 8) -------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_byte_order_marked_files_are_decoded(tmp_path, encoding):
    def encoded(text: str) -> bytes:  # Python writes no BOM for utf-16-be: add it
        return (codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b"") + text.encode(encoding)

    (tmp_path / "x.csv").write_bytes(encoded("text,label\n我的卡丢了,card_loss\n"))
    (record,) = fetched(tmp_path, {"path": str(tmp_path / "x.csv"), "label_columns": {"intent": "label"}})
    assert record["text"] == "我的卡丢了" and record["annotations"][GOLD_ANNOTATOR] == {"intent": "card_loss"}
    (tmp_path / "x.jsonl").write_bytes(encoded('{"text": "查余额"}\n'))
    (jsonl,) = fetched(tmp_path, {"path": str(tmp_path / "x.jsonl")})
    assert jsonl["text"] == "查余额" and "_error" not in jsonl


def test_utf16_without_a_byte_order_mark_says_how_to_fix_it(tmp_path):
    (tmp_path / "x.csv").write_bytes("text\nhello\n".encode("utf-16-le"))
    with pytest.raises(
        DataError, match=r"x\.csv: looks like UTF-16 without a byte-order mark; re-save it as UTF-8"
    ):
        fetched(tmp_path, {"path": str(tmp_path / "x.csv")})


def test_a_header_only_file_is_named_and_the_others_still_read(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("text\n", encoding="utf-8")
    (tmp_path / "in" / "b.csv").write_text("text\n甲乙丙丁\n", encoding="utf-8")
    records = fetched(tmp_path, {"path": str(tmp_path / "in")})
    assert [r["text"] for r in records] == ["甲乙丙丁"]
    assert f"{tmp_path / 'in' / 'a.csv'} holds no records" in caplog.text


def test_a_ragged_csv_row_is_a_rejected_record_naming_the_users_line(tmp_path):
    rows = 'text,label\n卡丢了怎么办,card_loss\n"多行的\n文本",balance_inquiry\n额外,一列,card_loss\n只有文本\n查询余额,balance_inquiry\n'
    (tmp_path / "x.csv").write_text(rows, encoding="utf-8")
    records = fetched(tmp_path, {"path": str(tmp_path / "x.csv"), "label_columns": {"intent": "label"}})
    assert [r["meta"].get("line") for r in records] == [2, 3, 5, 6, 7]  # the quoted cell spans lines 3-4
    assert records[1]["text"] == "多行的\n文本"
    ragged = records[2]
    assert (
        ragged["_error"] == "ragged row: 3 cells where the header has 2"
        and ragged["_raw_line"] == "额外,一列,card_loss"
    )
    result = cleaned(tmp_path, records)
    by_reason = {r["reason"]: r for r in result.rejects}
    assert set(by_reason) == {"fetch_error"} and len(result.rejects) == 2
    first = result.rejects[0]
    assert first["detail"].startswith(f"{tmp_path / 'x.csv'}:5 (row 3): ragged row")
    assert first["origin"] == {"file": str(tmp_path / "x.csv"), "line": 5, "row": 3}
    assert result.metrics["records_in"] == 5 and result.metrics["kept"] == 3


def test_every_reject_names_the_line_of_the_users_file(tmp_path):
    (tmp_path / "x.csv").write_text(
        "text,label\n卡丢了怎么办,card_loss\n查询余额,no_such_intent\n", encoding="utf-8"
    )
    records = fetched(tmp_path, {"path": str(tmp_path / "x.csv"), "label_columns": {"intent": "label"}})
    (reject,) = cleaned(tmp_path, records).rejects
    assert reject["reason"] == "unknown_label" and reject["line"] == 2  # line of data/raw/records.jsonl
    assert reject["origin"] == {
        "file": str(tmp_path / "x.csv"),
        "row": 2,
        "line": 3,
    }  # line of the user's file


# --- Label Studio spans checked against value.text (issue 15, item 6) ----------------------------------


def ls_task(text: str, spans_by_annotator: dict[int, list[tuple[int, int, str, str]]]) -> dict:
    def result(start, end, label, stated):
        value = {"start": start, "end": end, "text": stated, "labels": [label]}
        return {"type": "labels", "value": value, "from_name": "label", "to_name": "text"}

    annotations = [
        {"completed_by": who, "result": [{"type": "choices", "value": {"choices": ["transfer"]}, "from_name": "intent"}]
         + [result(*span) for span in spans]}
        for who, spans in spans_by_annotator.items()
    ]  # fmt: skip
    return {"id": 1, "data": {"text": text}, "annotations": annotations}


def test_utf16_offsets_after_an_emoji_are_converted_and_a_mismatch_drops_only_that_annotation(tmp_path):
    text = "😀转3000块到张三"
    # Label Studio counting UTF-16 units: the emoji is two, so 3000块 is at [3, 8) instead of [2, 7); read as
    # characters, [3, 8) is "000块到" (the shift the issue reproduced)
    task = ls_task(
        text, {7: [(3, 8, "MONEY", "3000块")], 8: [(2, 7, "MONEY", "3000块")], 9: [(1, 3, "MONEY", "3000")]}
    )
    (tmp_path / "export.json").write_text(json.dumps([task], ensure_ascii=False), encoding="utf-8")
    (record,) = fetched(tmp_path, {"path": str(tmp_path / "export.json")})
    assert (
        text[3:8] == "000块到" and utf16_to_chars(text, 3) == 2 and utf16_to_chars(text, 1) is None
    )  # 1 splits the emoji's pair
    spans = {a: v["entities"] for a, v in record["annotations"].items()}
    assert spans["7"] == spans["8"] == [{"start": 2, "end": 7, "type": "MONEY", "text": "3000块"}]
    assert record["meta"]["utf16_spans_converted"] == 1
    result = cleaned(tmp_path, [record])
    (kept,) = result.kept
    assert sorted(kept["annotations"]) == ["7", "8"]  # annotator 9's bad span cost only its own labels
    (row,) = result.rejects
    assert row["reason"] == "span_text_mismatch" and row["annotator"] == "9" and row["record_kept"] is True
    assert row["annotation"]["entities"] == [{"start": 1, "end": 3, "type": "MONEY", "text": "3000"}]
    m = result.metrics
    assert (m["records_in"], m["kept"], m["rejected"], m["annotations_dropped"]) == (1, 1, 0, 1)
    assert m["spans_utf16_converted"] == 1
    assert kept["text"][2:7] == "3000块"


def test_one_annotators_bad_span_keeps_the_record_for_label_qa(tmp_path):
    text = "给张三转5000元"
    good = [(4, 9, "MONEY", "5000元")]
    tasks = [
        ls_task(f"{text}{i}", {1: good, 2: good, 3: [(4, 99, "MONEY", "5000元")]}) | {"id": i}
        for i in range(30)
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    records = fetched(tmp_path, {"path": str(tmp_path / "export.json")})
    result = cleaned(tmp_path, records)
    assert result.metrics["kept"] == 30 and result.metrics["annotations_dropped"] == 30
    assert {r["reason"] for r in result.rejects} == {"span_out_of_range"}
    assert all(sorted(r["annotations"]) == ["1", "2"] for r in result.kept)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    raw["tasks"] = {k: v for k, v in raw["tasks"].items() if k != "compliance"}
    raw["tasks"]["intent"]["labels"] = None
    raw["label_qa"]["stratify_by"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    qa = label_qa(result.kept, load_section("label_qa", tmp_path / "params.yaml"))
    assert qa.metrics["annotators"] == 2 and qa.metrics["adjudicated"] == 30
    money = [e for split in qa.splits.values() for r in split for e in r["entities"]]
    assert len(money) == 30 and {e["text"] for e in money} == {"5000元"}
