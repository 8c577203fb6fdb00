"""A dataset's own split through fetch -> clean -> label_qa (issue 16, issue 18 item 2).

Small train/test files written by the tests stand for a public dataset such as BANKING77 (text,category).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepseek_sft.clean import clean_lines
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.fetch import fetch
from deepseek_sft.io import DataError
from deepseek_sft.label_qa import label_qa

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["card_arrival", "lost_card", "top_up_failed", "exchange_rate"]
ONE_TASK = {"intent": {"type": "classification", "field": "intent", "instruction": "Intent:"}}


def english_rows(n: int, prefix: str) -> list[tuple[str, str]]:
    """`n` distinct English queries, categories in turn."""
    return [
        (f"{prefix} question number {i} about my {CATEGORIES[i % 4].replace('_', ' ')}", CATEGORIES[i % 4])
        for i in range(n)
    ]


def write_csv(path: Path, rows: list[tuple], header: str = "text,category") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_params(tmp_path: Path, local: dict, **sections) -> Path:
    """The repository params.yaml with one English intent task, `fetch.local` and other section overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["tasks"] = ONE_TASK
    raw["fetch"] = {"source": "local", "local": {"label_columns": {"intent": "category"}, **local}}
    raw["clean"].update(remove_whitespace=False, near_dup_threshold=None)
    raw["label_qa"].update(sections.get("label_qa", {}))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def pipeline(params: Path) -> tuple[list[dict], object, dict]:
    """fetch -> clean -> label_qa in process: (raw records, clean result, label_qa result)."""
    raw, _ = fetch(load_section("fetch", params))
    lines = [(i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(raw, start=1)]
    cleaned = clean_lines(lines, load_section("clean", params))
    return raw, cleaned, label_qa(cleaned.kept, load_section("label_qa", params))


def test_split_map_keeps_the_given_test_and_carves_val_from_train(tmp_path):
    train = write_csv(tmp_path / "train.csv", english_rows(400, "train"))
    test = write_csv(tmp_path / "test.csv", english_rows(60, "test"))
    raw, cleaned, result = pipeline(
        write_params(tmp_path, {"path": {"train": str(train), "test": str(test)}})
    )
    assert [r["split"] for r in raw].count("test") == 60 and raw[0]["id"] == "train-1"
    assert cleaned.metrics["kept"] == 460
    splits, m = result.splits, result.metrics
    assert [r["id"] for r in splits["test"]] == [f"test-{i}" for i in range(1, 61)]  # as given, in order
    assert {r["id"].split("-")[0] for r in splits["train"] + splits["val"]} == {"train"}
    assert len(splits["train"]) + len(splits["val"]) == 400
    assert 0.10 < len(splits["val"]) / 400 < 0.20  # about val_fraction (0.15) of train
    assert m["split_given"] == 1 and m["val_carved_from_train"] == 1 and m["test_records"] == 60
    assert m["kappa_skipped"] == 1 and m["gate_passed"] == 1  # one annotator: no kappa, no failure
    assert m["classes_missing_from_train"] == 0 and m["stratify_deviation_val"] < 0.1


def test_split_column_keeps_a_given_val_and_carves_nothing(tmp_path):
    rows = [
        (t, c, s)
        for (t, c), s in zip(english_rows(90, "q"), ["train", "Validation", "TEST"] * 30, strict=True)
    ]
    data = write_csv(tmp_path / "all.csv", rows, header="text,category,part")
    _, _, result = pipeline(write_params(tmp_path, {"path": str(data), "split_column": "part"}))
    assert {name: len(v) for name, v in result.splits.items()} == {"train": 30, "val": 30, "test": 30}
    assert result.metrics["val_carved_from_train"] == 0


def test_unknown_or_empty_split_value_is_rejected_by_clean_naming_it(tmp_path):
    rows = [("a first question here", "lost_card", "train"), ("a second question here", "lost_card", "holdout"),
            ("a third question here", "lost_card", ""), ("a fourth question here", "lost_card", "test")]  # fmt: skip
    data = write_csv(tmp_path / "all.csv", rows, header="text,category,part")
    raw, _ = fetch(load_section("fetch", write_params(tmp_path, {"path": str(data), "split_column": "part"})))
    assert [r["split"] for r in raw] == ["train", "holdout", None, "test"]
    lines = [(i, json.dumps(r)) for i, r in enumerate(raw, start=1)]
    result = clean_lines(lines, load_section("clean", tmp_path / "params.yaml"))
    assert [(r["line"], r["reason"]) for r in result.rejects] == [(2, "unknown_split"), (3, "unknown_split")]
    assert "split='holdout'" in result.rejects[0]["detail"]
    assert result.metrics["rejected_unknown_split"] == 2 and result.metrics["kept"] == 2


def test_a_train_copy_of_a_test_text_is_the_one_deduplicated_and_the_test_set_stays_whole(tmp_path):
    same = ("the very same text", "lost_card")
    train = write_csv(tmp_path / "train.csv", [*english_rows(40, "train"), same])
    test = write_csv(tmp_path / "test.csv", [same, *english_rows(10, "test"), same])
    _, cleaned, result = pipeline(write_params(tmp_path, {"path": {"train": str(train), "test": str(test)}}))
    (dup,) = cleaned.rejects
    assert dup["reason"] == "duplicate_exact" and dup["id"] == "train-41"
    assert cleaned.metrics["given_test_duplicates_kept"] == 1
    assert len(result.splits["test"]) == 12  # the given test set is intact, its own repeat included
    assert [r["id"] for r in cleaned.kept][:2] == ["train-1", "train-2"]  # output stays in input order


def test_records_with_and_without_a_given_split_do_not_mix(tmp_path):
    data = write_csv(tmp_path / "all.csv", english_rows(40, "q"))
    raw, _ = fetch(load_section("fetch", write_params(tmp_path, {"path": str(data)})))
    for r in raw[:20]:
        r["split"] = "train"
    records = clean_lines(
        [(i, json.dumps(r)) for i, r in enumerate(raw, 1)], load_section("clean", tmp_path / "params.yaml")
    ).kept
    with pytest.raises(DataError, match=r"record 'all-21' has no given split while others have one"):
        label_qa(records, load_section("label_qa", tmp_path / "params.yaml"))


@pytest.mark.parametrize(
    ("path", "extra", "message"),
    [
        ({"dev": "a.csv"}, {}, r"needs a 'train' key and only keys of train, val, test"),
        ({"train": "a.csv"}, {"split_column": "part"}, "give the split one way only"),
        ([], {}, "an empty list"),
    ],
)
def test_bad_split_params_name_the_key(tmp_path, path, extra, message):
    with pytest.raises(ParamsError, match=message):
        load_section("fetch", write_params(tmp_path, {"path": path, **extra}))


def test_missing_split_column_names_the_key_and_the_columns(tmp_path):
    data = write_csv(tmp_path / "all.csv", english_rows(4, "q"))
    with pytest.raises(
        DataError,
        match=r"column 'part' \(fetch.local.split_column\) not found; columns present: text, category",
    ):
        fetch(load_section("fetch", write_params(tmp_path, {"path": str(data), "split_column": "part"})))


def test_scripts_run_a_given_split_end_to_end(tmp_path):
    (tmp_path / "ext").mkdir()
    write_csv(tmp_path / "ext" / "train.csv", english_rows(120, "train"))
    write_csv(tmp_path / "ext" / "test.csv", english_rows(30, "test"))
    params = write_params(tmp_path, {"path": {"train": "ext/train.csv", "test": "ext/test.csv"}})
    env = {"DSFT_PARAMS": str(params), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    commands = [
        ["fetch.py", "--out", "raw.jsonl", "--manifest", "manifest.json", "--side-dir", "side", "--reports", "r/fetch"],
        ["clean.py", "--in", "raw.jsonl", "--out", "clean.jsonl", "--rejects", "rejected.jsonl", "--reports", "r/clean"],
        ["label_qa.py", "--in", "clean.jsonl", "--out-dir", "processed", "--needs-review", "review.jsonl",
         "--reports", "r/label_qa"],
    ]  # fmt: skip
    for script, *args in commands:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / script), *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "r/label_qa/metrics.json").read_text(encoding="utf-8"))
    assert metrics["test_records"] == 30 and metrics["train_records"] + metrics["val_records"] == 120
    test = (tmp_path / "processed/test.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(test[0])["id"] == "test-1" and "split" not in json.loads(test[0])


def split_of_each(result) -> dict[str, str]:
    return {r["id"]: name for name, split in result.splits.items() for r in split}


def test_changing_clean_min_chars_moves_only_the_records_it_removes(tmp_path):
    rows = [(f"query {i} " + "about my card " * (i % 6), CATEGORIES[i % 4]) for i in range(600)]
    data = write_csv(tmp_path / "q.csv", rows)
    _, _, loose = pipeline(write_params(tmp_path, {"path": str(data)}))
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    raw["clean"]["min_chars"] = 24  # removes the rows with no "about my card" repeat or one repeat
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    _, strict_clean, strict = pipeline(tmp_path / "params.yaml")
    removed = set(split_of_each(loose)) - set(split_of_each(strict))
    assert strict_clean.metrics["rejected_too_short"] == len(removed) == 200
    before, after = split_of_each(loose), split_of_each(strict)
    assert after == {k: v for k, v in before.items() if k not in removed}  # nobody else moved
    # the test set lost exactly its removed records, and its fingerprint says so
    lost = {k for k in removed if before[k] == "test"}
    assert lost and loose.metrics["test_fingerprint_count"] - strict.metrics["test_fingerprint_count"] == len(
        lost
    )
    assert loose.metrics["test_fingerprint"] != strict.metrics["test_fingerprint"]


def test_train_per_label_caps_train_only_with_nested_subsets(tmp_path):
    train = write_csv(tmp_path / "train.csv", english_rows(400, "train"))
    test = write_csv(tmp_path / "test.csv", english_rows(60, "test"))
    local = {"path": {"train": str(train), "test": str(test)}}
    results = {}
    for cap in (None, 10, 30):
        root = tmp_path / str(cap)
        root.mkdir()
        _, _, results[cap] = pipeline(write_params(root, local, label_qa={"train_per_label": cap}))
    full = results[None]
    for cap in (10, 30):
        splits, m = results[cap].splits, results[cap].metrics
        counts = {c: sum(r["intent"] == c for r in splits["train"]) for c in CATEGORIES}
        assert counts == dict.fromkeys(CATEGORIES, cap)
        assert m["train_left_out_by_cap"] == len(full.splits["train"]) - 4 * cap  # counted, not lost silently
        for name in ("val", "test"):  # only train shrinks
            assert [r["id"] for r in splits[name]] == [r["id"] for r in full.splits[name]]
        assert m["test_fingerprint"] == full.metrics["test_fingerprint"]
    ids = {cap: {r["id"] for r in results[cap].splits["train"]} for cap in (10, 30)}
    assert ids[10] < ids[30]  # nested: a learning curve over data size adds records, never swaps them
