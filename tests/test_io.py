"""File helpers: atomic writes leave no half files; bad JSONL names file and line."""

from __future__ import annotations

import pytest

from deepseek_sft.io import DataError, atomic_path, read_jsonl, sha256_file, write_jsonl


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed")
    assert read_jsonl(target) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_round_trip_keeps_chinese_and_is_deterministic(tmp_path):
    rows = [{"text": "我的卡找不到了", "n": 2}, {"text": "转账", "n": 1}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_jsonl(a, rows) == 2
    write_jsonl(b, rows)
    assert read_jsonl(a) == rows
    assert "我的卡找不到了" in a.read_text(encoding="utf-8")
    assert sha256_file(a) == sha256_file(b)


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_non_object_line_is_refused(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)
