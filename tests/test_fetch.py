"""Stage fetch: synthetic corpus (determinism, variety, long tail, annotator noise), local files, hf, script."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn.metrics import cohen_kappa_score

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.fetch import fetch, manifest, source_module
from deepseek_sft.fetch.synthetic import generate, intent_counts, layer_spec
from deepseek_sft.fetch.synthetic_pools import chinese_number, pool_sizes
from deepseek_sft.fetch.synthetic_templates import FREQUENCY_RANK, INTENT_TEMPLATES
from deepseek_sft.io import DataError, sha256_file, write_jsonl
from deepseek_sft.records import GOLD_ANNOTATOR, spans_to_bio

ROOT = Path(__file__).resolve().parents[1]
ANNOTATORS = ("ann_a", "ann_b", "ann_c")


def params_file(tmp_path: Path, fetch_section: dict) -> Path:
    """A copy of the repository params.yaml with its fetch section replaced."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["fetch"] = fetch_section
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def stage_params(tmp_path: Path, fetch_section: dict):
    return load_section("fetch", params_file(tmp_path, fetch_section))


def local_records(tmp_path: Path, path: Path, **mapping) -> list[dict]:
    params = stage_params(tmp_path, {"source": "local", "local": {"path": str(path), **mapping}})
    records, _ = fetch(params)
    return records


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    """The default corpus (6000 records, default annotators), generated once for the module."""
    params = load_section("fetch", ROOT / "params.yaml")
    return fetch(params)[0]


# --- synthetic ------------------------------------------------------------------------------------------


def test_synthetic_is_byte_identical_for_the_same_seed(tmp_path):
    spec = layer_spec(load_section("fetch", ROOT / "params.yaml").tasks)
    rates = {"ann_a": 0.03, "ann_b": 0.04, "ann_c": 0.1}
    write_jsonl(tmp_path / "a.jsonl", generate(500, 7, rates, spec))
    write_jsonl(tmp_path / "b.jsonl", generate(500, 7, rates, spec))
    write_jsonl(tmp_path / "c.jsonl", generate(500, 8, rates, spec))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert sha256_file(tmp_path / "a.jsonl") != sha256_file(tmp_path / "c.jsonl")


def test_synthetic_records_follow_the_raw_contract(corpus):
    params = load_section("fetch", ROOT / "params.yaml")
    intents, types = set(params.tasks["intent"].labels), set(params.tasks["entities"].entity_types)
    assert len(corpus) == 6000
    assert len({r["id"] for r in corpus}) == 6000 and corpus[0]["id"] == "syn-000001"
    for r in corpus:
        assert set(r) == {"id", "text", "source", "annotations", "meta"} and r["source"] == "synthetic"
        assert tuple(r["annotations"]) == ANNOTATORS
        truth = r["meta"]["truth"]
        assert truth["intent"] in intents and truth["compliance"] in ("compliant", "violation")
        for labels in [truth, *r["annotations"].values()]:
            assert set(labels) == {"intent", "compliance", "entities"}
            for s in labels["entities"]:
                assert 0 <= s["start"] < s["end"] <= len(r["text"]) and s["type"] in types
        for s in truth["entities"]:  # true spans cover whole words, never punctuation
            assert not re.search(r"[，。？！]", r["text"][s["start"] : s["end"]])


def test_synthetic_is_varied(corpus):
    assert len({r["text"] for r in corpus}) >= 0.99 * len(corpus)
    skeletons: dict[str, set] = {}
    for r in corpus:
        skeletons.setdefault(r["meta"]["truth"]["intent"], set()).add(r["meta"]["template"])
    assert len(skeletons) == 20 and min(len(s) for s in skeletons.values()) >= 8
    assert min(len(t) for t in INTENT_TEMPLATES.values()) >= 8
    sizes = pool_sizes()
    assert sizes["PER"] > 100_000 and sizes["ORG"] > 1000 and sizes["PRODUCT"] > 5000
    surfaces: dict[str, set] = {}
    for r in corpus:
        for s in r["meta"]["truth"]["entities"]:
            surfaces.setdefault(s["type"], set()).add(r["text"][s["start"] : s["end"]])
    assert len(surfaces["PER"]) > 500 and len(surfaces["PRODUCT"]) > 300 and len(surfaces["ORG"]) > 100
    money = " ".join(surfaces["MONEY"])
    for mark in ("元", "万", "￥", "块", "美元", "千"):
        assert mark in money, mark
    dates = " ".join(surfaces["DATE"])
    for pattern in (r"\d+月\d+日", r"\d{4}年", r"[上下这]周[一二三四五六日]", r"\d{4}-\d\d-\d\d"):
        assert re.search(pattern, dates), pattern


def test_synthetic_intents_are_long_tailed_and_violations_independent(corpus):
    counts = Counter(r["meta"]["truth"]["intent"] for r in corpus)
    ranked = [counts[label] for label in FREQUENCY_RANK]
    assert ranked == sorted(ranked, reverse=True)
    assert ranked[-1] >= 40 and ranked[0] / ranked[-1] >= 15
    violations = [r for r in corpus if r["meta"]["truth"]["compliance"] == "violation"]
    assert 0.15 <= len(violations) / len(corpus) <= 0.25
    assert all(r["meta"]["clause"].startswith("violation:") for r in violations)
    head = [r for r in corpus if r["meta"]["truth"]["intent"] == FREQUENCY_RANK[0]]
    head_share = sum(r["meta"]["truth"]["compliance"] == "violation" for r in head) / len(head)
    assert abs(head_share - len(violations) / len(corpus)) < 0.04  # independent of intent


def test_intent_quotas_add_up_and_keep_every_class():
    labels = tuple(FREQUENCY_RANK)
    for n in (50, 60, 333, 6000):
        counts = intent_counts(labels, n)
        assert sum(counts.values()) == n
    assert min(intent_counts(labels, 60).values()) == 3


def kappas(corpus: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for a, b in itertools.combinations(ANNOTATORS, 2):
        layer = {}
        for field in ("intent", "compliance"):
            xs = [r["annotations"][a][field] for r in corpus]
            ys = [r["annotations"][b][field] for r in corpus]
            layer[field] = cohen_kappa_score(xs, ys)
        xs = [t for r in corpus for t in spans_to_bio(len(r["text"]), r["annotations"][a]["entities"])]
        ys = [t for r in corpus for t in spans_to_bio(len(r["text"]), r["annotations"][b]["entities"])]
        layer["bio"] = cohen_kappa_score(xs, ys)
        out[(a, b)] = layer
    return out


def test_annotator_noise_passes_the_gate_but_shows_the_weak_annotator(corpus):
    k = kappas(corpus)
    for layer in ("intent", "compliance", "bio"):
        assert all(k[pair][layer] >= 0.8 for pair in k), (layer, k)
        weak = [k[("ann_a", "ann_c")][layer], k[("ann_b", "ann_c")][layer]]
        # ann_c pairs disagree (1 - kappa) at least 1.4x as much as the good pair
        assert 1 - max(weak) > 1.4 * (1 - k[("ann_a", "ann_b")][layer]), (layer, k)
        assert max(weak) < 0.99  # a 0.99 gate fails the ann_c pairs
    # the intent error rate of each annotator is close to its configured rate
    for name, rate in (("ann_a", 0.03), ("ann_c", 0.10)):
        wrong = sum(r["annotations"][name]["intent"] != r["meta"]["truth"]["intent"] for r in corpus)
        assert abs(wrong / len(corpus) - rate) < 0.015


def test_synthetic_refuses_labels_it_has_no_templates_for(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["tasks"]["intent"]["labels"] = ["card_loss", "stock_trading"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ParamsError, match="stock_trading"):
        fetch(load_section("fetch", path))


def test_chinese_numbers_read_the_way_people_say_them():
    cases = {2000: "两千", 35000: "三万五千", 1050: "一千零五十", 15: "十五", 20000: "两万", 100000: "十万"}
    assert {n: chinese_number(n) for n in cases} == cases


def test_unknown_source_module_is_a_params_error():
    with pytest.raises(ParamsError, match=r"no module deepseek_sft\.fetch\.carrier_pigeon"):
        source_module("carrier_pigeon")


# --- local ----------------------------------------------------------------------------------------------


def test_local_csv_with_text_and_label_gets_the_gold_annotator(tmp_path):
    path = tmp_path / "requests.csv"
    path.write_text("text,label\n我的卡找不到了,card_loss\n,balance_inquiry\n查余额,\n", encoding="utf-8")
    records = local_records(tmp_path, path, label_columns={"intent": "label"})
    assert [r["id"] for r in records] == ["requests-1", "requests-2", "requests-3"]
    assert records[0]["annotations"] == {GOLD_ANNOTATOR: {"intent": "card_loss"}}
    assert records[0]["meta"] == {"file": str(path), "row": 1, "line": 2} and records[0]["source"] == "local"
    assert records[1]["text"] == ""  # row-level problems pass through for clean to reject
    assert records[2]["annotations"] == {GOLD_ANNOTATOR: {"intent": None}}


def test_local_tsv_one_row_per_annotator_is_grouped(tmp_path):
    path = tmp_path / "votes.tsv"
    rows = ["id\ttext\tintent\twho", "007\t卡丢了\tcard_loss\tann_a", "007\t卡丢了\tfraud_report\tann_b",
            "008\t查余额\tbalance_inquiry\tann_a", "008\t查余额\tbalance_inquiry\tann_a"]  # fmt: skip
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    records = local_records(
        tmp_path, path, id_column="id", annotator_column="who", label_columns={"intent": "intent"}
    )
    assert [r["id"] for r in records] == ["007", "008", "008@row4"]
    assert records[0]["annotations"] == {
        "ann_a": {"intent": "card_loss"},
        "ann_b": {"intent": "fraud_report"},
    }
    assert records[0]["meta"]["rows"] == [1, 2]
    assert "second annotation by 'ann_a'" in records[2]["_error"]


def test_local_jsonl_marks_a_malformed_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "in.jsonl"
    good = {"text": "给张三转5000元", "label": "transfer", "spans": [{"start": 4, "end": 9, "type": "MONEY"}]}
    lines = json.dumps(good, ensure_ascii=False) + '\n{not json\n\n[1, 2]\n{"text": "'
    path.write_bytes(lines.encode("utf-8") + b'\xff"}\n')
    records = local_records(tmp_path, path, label_columns={"intent": "label", "entities": "spans"})
    assert len(records) == 4
    assert records[0]["annotations"][GOLD_ANNOTATOR]["entities"] == good["spans"]
    bad = records[1]
    assert bad["_raw_line"] == "{not json" and bad["_error"].startswith("invalid JSON")
    assert bad["meta"] == {"file": str(path), "line": 2} and bad["id"] == "in-2" and bad["text"] == ""
    assert "expected a JSON object, got list" in records[2]["_error"] and records[2]["meta"]["line"] == 4
    assert (
        records[3]["_error"].startswith("not valid UTF-8") and records[3]["_raw_line"] == '{"text": "\ufffd"}'
    )
    write_jsonl(tmp_path / "out.jsonl", records)  # what fetch writes must be valid UTF-8


def test_local_jsonl_in_raw_record_shape_is_kept(tmp_path):
    path = tmp_path / "raw.jsonl"
    original = {"id": "x1", "text": "卡丢了", "source": "web", "annotations": {"a": {"intent": "card_loss"}}}
    path.write_text(json.dumps(original, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = local_records(tmp_path, path)
    assert record["annotations"] == original["annotations"] and record["id"] == "x1"
    assert record["meta"] == {"original_source": "web", "file": str(path), "line": 1}


def test_local_parquet_lists_become_plain_json(tmp_path):
    path = tmp_path / "data.parquet"
    spans = [[{"start": 0, "end": 4, "type": "ORG"}], []]
    pd.DataFrame(
        {"content": ["招商银行的卡", "查余额"], "intent": ["card_loss", None], "ents": spans}
    ).to_parquet(path)
    records = local_records(
        tmp_path, path, text_column="content", label_columns={"intent": "intent", "entities": "ents"}
    )
    assert records[0]["annotations"][GOLD_ANNOTATOR] == {"intent": "card_loss", "entities": spans[0]}
    assert records[1]["annotations"][GOLD_ANNOTATOR] == {"intent": None, "entities": []}
    write_jsonl(tmp_path / "out.jsonl", records)  # numpy values would not serialise


def test_local_label_studio_export(tmp_path):
    def result(kind, value, from_name):
        return {"type": kind, "value": value, "from_name": from_name, "to_name": "text"}

    task = {
        "id": 17,
        "data": {"text": "招商银行的卡丢了"},
        "annotations": [
            {"completed_by": 3, "result": [result("choices", {"choices": ["card_loss"]}, "intent"),
                                           result("labels", {"start": 0, "end": 4, "labels": ["ORG"]}, "label")]},
            {"completed_by": {"id": 4, "email": "li@example.com"},
             "result": [result("choices", {"choices": ["fraud_report"]}, "intent")]},
            {"completed_by": 5, "was_cancelled": True, "result": []},
        ],
    }  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(
        json.dumps([task, {"id": 18, "data": {"text": "查余额"}, "annotations": []}]), encoding="utf-8"
    )
    records = local_records(tmp_path, path)
    assert records[0]["id"] == "17" and records[0]["text"] == "招商银行的卡丢了"
    assert records[0]["annotations"] == {
        "3": {"intent": "card_loss", "entities": [{"start": 0, "end": 4, "type": "ORG"}]},
        "li@example.com": {"intent": "fraud_report", "entities": []},
    }
    assert records[0]["meta"]["skipped_annotations"] == 1
    assert records[1]["annotations"] == {}


def test_local_header_only_file_is_a_data_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no records in .*empty\.csv \(fetch.local.path\): a header only"):
        local_records(tmp_path, path)


def test_local_directory_reads_every_known_file_in_order(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text("text\n甲\n", encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "乙"}\n', encoding="utf-8")
    (folder / "notes.txt").write_text("ignored", encoding="utf-8")
    records = local_records(tmp_path, folder)
    assert [(r["id"], r["text"]) for r in records] == [("a-1", "甲"), ("b-1", "乙")]


def test_local_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: not found"):
        local_records(tmp_path, tmp_path / "nope.csv")


def test_local_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("content,label\n卡丢了,card_loss\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"t\.csv: column 'text' \(fetch\.local\.text_column\).*present: content, label"
    ):
        local_records(tmp_path, path)
    with pytest.raises(DataError, match=r"column 'intent' \(fetch\.local\.label_columns\.intent\)"):
        local_records(tmp_path, path, text_column="content", label_columns={"intent": "intent"})


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"),
    [
        ("data.xlsx", b"PK\x03\x04", "auto", r"data\.xlsx: cannot tell the format"),
        ("data.parquet", b"not a parquet file", "auto", r"data\.parquet: cannot read as parquet"),
        (
            "data.csv",
            "text\n卡丢了\n".encode("gbk"),
            "auto",
            r"data\.csv:2: not UTF-8 text .*re-save it as UTF-8",
        ),
        (
            "data.csv",
            b'text,label\n"a,b\n',
            "auto",
            r"data\.csv:2: a quoted cell opened on this line is never",
        ),
        ("data.jsonl", b"{bad\n{worse\n", "auto", r"data\.jsonl:1: invalid JSON"),
        (
            "export.json",
            b'{"text": "x"}',
            "auto",
            r"export\.json: expected a JSON array of row objects or a Label",
        ),
        ("export.json", b'{"text": "x"}', "label_studio", r"export\.json: not a Label Studio export"),
        ("export.json", b"[{", "label_studio", r"export\.json:1: invalid JSON"),
    ],
)
def test_local_unreadable_format_is_a_data_error(tmp_path, name, content, fmt, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        local_records(tmp_path, path, format=fmt)


# --- hf -------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def hf_records(tmp_path, **hf):
    return fetch(stage_params(tmp_path, {"source": "hf", "hf": hf}))[0]


def test_hf_loads_a_local_folder_of_csv_files(tmp_path, offline_datasets):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n卡丢了,card_loss\n", encoding="utf-8")
    (folder / "test.csv").write_text(
        "text,label\n转账失败,transfer_failed\n查余额,balance_inquiry\n", encoding="utf-8"
    )
    records = hf_records(tmp_path, path=str(folder), split="test", label_columns={"intent": "label"})
    assert [(r["id"], r["text"], r["source"]) for r in records] == [
        ("ds-test-1", "转账失败", "hf"),
        ("ds-test-2", "查余额", "hf"),
    ]
    assert records[1]["annotations"] == {GOLD_ANNOTATOR: {"intent": "balance_inquiry"}}
    with pytest.raises(DataError, match=r"Unknown split"):
        hf_records(tmp_path, path=str(folder), split="validation")
    # a list of splits keeps each record's own split, for label_qa to keep
    both = hf_records(tmp_path, path=str(folder), split=["train", "test"], label_columns={"intent": "label"})
    assert [(r["id"], r["split"]) for r in both] == [
        ("ds-train-1", "train"),
        ("ds-test-1", "test"),
        ("ds-test-2", "test"),
    ]


def test_hf_loads_a_save_to_disk_folder(tmp_path, offline_datasets):
    spans = [{"start": 0, "end": 4, "type": "ORG"}]
    rows = [{"text": "招商银行", "ents": spans, "who": "x"}, {"text": "招商银行", "ents": [], "who": "y"}]
    offline_datasets.DatasetDict({"train": offline_datasets.Dataset.from_list(rows)}).save_to_disk(
        tmp_path / "sd"
    )
    records = hf_records(
        tmp_path, path=str(tmp_path / "sd"), annotator_column="who", label_columns={"entities": "ents"}
    )
    assert len(records) == 1 and records[0]["annotations"] == {
        "x": {"entities": spans},
        "y": {"entities": []},
    }
    with pytest.raises(DataError, match=r"no split 'test'.*present: train"):
        hf_records(tmp_path, path=str(tmp_path / "sd"), split="test")


def test_hf_hub_id_without_revision_is_refused(tmp_path, offline_datasets):
    with pytest.raises(ParamsError, match=r"hub dataset id: set fetch\.hf\.revision"):
        hf_records(tmp_path, path="someone/financial-intents")
    with pytest.raises(DataError, match=r"not found"):
        hf_records(tmp_path, path=str(tmp_path / "missing"))


# --- script ---------------------------------------------------------------------------------------------


def run_script(tmp_path: Path, fetch_section: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSFT_PARAMS": str(params_file(tmp_path, fetch_section))}
    cmd = [sys.executable, str(ROOT / "scripts/fetch.py"), "--out", "data/raw/records.jsonl",
           "--manifest", "data/raw/manifest.json", "--side-dir", "data/raw/side",
           "--reports", "reports/fetch"]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_script_end_to_end_is_reproducible(tmp_path):
    section = {"source": "synthetic", "synthetic": {"num_records": 300}}
    assert run_script(tmp_path, section).returncode == 0
    out = tmp_path / "data/raw/records.jsonl"
    first = out.read_bytes()
    man = json.loads((tmp_path / "data/raw/manifest.json").read_text(encoding="utf-8"))
    metrics = json.loads((tmp_path / "reports/fetch/metrics.json").read_text(encoding="utf-8"))
    assert (
        man["records"] == 300
        and man["sha256"] == sha256_file(out)
        and man["source_counts"] == {"synthetic": 300}
    )
    assert man["params"]["synthetic"]["num_records"] == 300 and man["generator_version"] == "synthetic-1"
    assert metrics["records"] == 300 and metrics["n_annotators"] == 3 and metrics["rarest_intent_count"] >= 3
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert len(first.splitlines()) == 300
    side = json.loads((tmp_path / "data/raw/side/index.json").read_text(encoding="utf-8"))
    assert side == {"source": "synthetic", "files": []}
    metrics_bytes = (tmp_path / "reports/fetch/metrics.json").read_bytes()
    assert run_script(tmp_path, section).returncode == 0
    assert out.read_bytes() == first
    # DVC-tracked metrics hold no wall-clock time (it would change dvc.lock on every identical run)
    assert (tmp_path / "reports/fetch/metrics.json").read_bytes() == metrics_bytes
    assert not [k for k in metrics if "seconds" in k]
    timing = json.loads((tmp_path / "reports/fetch/timing.json").read_text(encoding="utf-8"))
    assert set(timing) == {"fetch_seconds"} and timing["fetch_seconds"] >= 0


def test_script_reports_bad_input_without_a_traceback(tmp_path):
    result = run_script(tmp_path, {"source": "local", "local": {"path": "missing.csv"}})
    assert result.returncode == 2
    assert "missing.csv: not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data/raw/records.jsonl").exists()


def test_manifest_hashes_the_written_file(tmp_path):
    params = stage_params(tmp_path, {"source": "synthetic", "synthetic": {"num_records": 60}})
    records, stats = fetch(params)
    write_jsonl(tmp_path / "r.jsonl", records)
    man = manifest(params, tmp_path / "r.jsonl", records)
    assert man["sha256"] == sha256_file(tmp_path / "r.jsonl") and stats["records"] == man["records"] == 60
