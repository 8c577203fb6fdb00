"""Evaluate stage end to end: the script on tiny models, outputs, report (md + self-contained html), notebook.

Also holds the helpers the other test_evaluate_* files import (synthetic processed records, tiny models).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from deepseek_sft.base_model import PROVENANCE_FILE
from deepseek_sft.config import load_section
from deepseek_sft.config.data import TaskSpec
from deepseek_sft.config.evaluate import EvaluateParams
from deepseek_sft.evaluate import stage
from deepseek_sft.evaluate.core import ModelResults, check_records, score_answers
from deepseek_sft.evaluate.summary import headline_table, verdict_lines
from deepseek_sft.io import DataError, read_jsonl, write_jsonl
from deepseek_sft.tasks import format_response

from conftest import REPO, build_tiny_checkpoint, edit_params, synthetic_processed_records, tiny_params

torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add sync (and stall on shared cores)

TINY = tiny_params()  # the shared test shape (tests/conftest.py)


def processed_records(n: int, seed: int) -> list[dict]:
    """Processed-split records (the data contract) from the synthetic generator's ground truth."""
    return synthetic_processed_records(n, seed, load_section("evaluate").tasks)


def build_tiny_model(out_dir: Path, train: list[dict], seed: int) -> Path:
    """A randomly initialised tiny DeepSeek-V3 (via base_model.build_tiny) saved like models/base."""
    return build_tiny_checkpoint(out_dir, train, load_section("evaluate").tasks, seed, TINY)


def make_tiny_models(root: Path) -> dict[str, Path]:
    """Two tiny models (different init seeds, same tokenizer) standing in for base and SFT."""
    train = processed_records(200, seed=1)
    return {
        "base": build_tiny_model(root / "base", train, 0),
        "sft": build_tiny_model(root / "sft", train, 1),
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


# --- crafted predictions: every error kind on purpose -------------------------------------------------------


def perturbed_answers(records: list[dict], tasks, rng: random.Random) -> dict[str, list[str]]:
    """Gold answers with controlled damage: wrong labels, boundary/type errors, misses, garbage."""
    answers = {name: [] for name in tasks}
    labels = tasks["intent"].labels
    for r in records:
        roll = rng.random()
        answers["intent"].append(
            r["intent"] if roll < 0.6 else rng.choice(labels) if roll < 0.9 else "不知道"
        )
        answers["compliance"].append(
            r["compliance"]
            if rng.random() < 0.85
            else {"compliant": "violation", "violation": "compliant"}[r["compliance"]]
        )
        answers["entities"].append(_damaged_entities(r, tasks["entities"], rng))
    return answers


def _damaged_entities(record: dict, task, rng: random.Random) -> str:
    """The gold spans with one controlled error, rendered in the task's answer format."""
    spans = [dict(s) for s in sorted(record["entities"], key=lambda s: s["start"])]
    roll = rng.random()
    if spans and roll < 0.15:
        if spans[0]["end"] - spans[0]["start"] > 1:
            spans[0]["end"] -= 1  # boundary: the last character dropped
    elif spans and roll < 0.3:
        spans[0]["type"] = "ORG" if spans[0]["type"] != "ORG" else "PER"  # type
    elif spans and roll < 0.4:
        spans.pop()  # missed
    elif roll < 0.45:
        return "⟦乱码"  # unparseable in either format (an item without TYPE:, an unclosed mark)
    return format_response(task, {**record, "entities": spans})


def fake_results(name: str, records: list[dict], tasks, seed: int) -> ModelResults:
    """ModelResults scored from crafted answers (what evaluate_model returns, without a model)."""
    rows, flat, details = score_answers(
        records, tasks, perturbed_answers(records, tasks, random.Random(seed))
    )
    eff = {
        "prefill_ms_per_token_p50": 0.5,
        "decode_ms_per_token_p50": 5.0,
        "params_total": 1000,
        "params_active_per_token": 800,
        "total_s": 1.5,
    }
    return ModelResults(name=name, rows=rows, metrics=flat, details=details, efficiency=eff)


def write_upstream_reports(root: Path) -> tuple[Path, Path]:
    """A label_qa metrics.json and a dvclive-shaped train report directory (metrics.json + TSV curves)."""
    label_qa = root / "label_qa"
    label_qa.mkdir(parents=True)
    (label_qa / "metrics.json").write_text(json.dumps({"kappa_min": 0.86, "records_out": 120}))
    train = root / "train"
    curves = train / "plots" / "metrics" / "train"
    curves.mkdir(parents=True)
    (curves / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t3.0\n2\t10\t2.0\n3\t20\t1.2\n")
    (train / "metrics.json").write_text(json.dumps({"train": {"loss": 1.2}}))
    return label_qa, train


@pytest.fixture(scope="module")
def crafted_run(tmp_path_factory) -> dict:
    """run_evaluation over crafted predictions of two 'models' (base worse than sft), with upstream reports."""
    root = tmp_path_factory.mktemp("crafted")
    tasks = load_section("evaluate").tasks
    test, train = processed_records(80, seed=3), processed_records(300, seed=4)
    seeds = {"base": 11, "sft": 12}

    def fake_evaluate_model(model_dir, records, tasks, params, *, name, load_options, seed):
        return fake_results(name, records, tasks, seeds[name])

    label_qa, train_reports = write_upstream_reports(root / "reports")
    mp = pytest.MonkeyPatch()
    mp.setattr(stage, "evaluate_model", fake_evaluate_model)
    try:
        metrics = stage.run_evaluation(
            test,
            train,
            {"base": "unused", "sft": "unused"},
            tasks,
            EvaluateParams(error_examples=1000, workers=1),
            seed=0,
            reports_dir=root / "reports" / "evaluate",
            report_md=root / "reports" / "report.md",
            report_html=root / "reports" / "report.html",
            label_qa_dir=label_qa,
            train_reports_dir=train_reports,
        )
    finally:
        mp.undo()
    return {"root": root, "metrics": metrics, "test": test, "train": train, "tasks": tasks}


def test_crafted_run_counts_add_up(crafted_run):
    out = crafted_run["root"] / "reports" / "evaluate"
    metrics, n = crafted_run["metrics"], len(crafted_run["test"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["sft"]["intent"]["accuracy"] == metrics["sft"]["intent"]["accuracy"]
    assert set(on_disk) == {"base", "sft", "tfidf_lr", "majority", "stage"}
    # the majority floor: accuracy is the share of the train split's top label in test
    top = Counter(r["intent"] for r in crafted_run["train"]).most_common(1)[0][0]
    share = sum(r["intent"] == top for r in crafted_run["test"]) / n
    assert on_disk["majority"]["intent"]["accuracy"] == pytest.approx(share)
    unparseable = read_jsonl(out / "errors" / "unparseable.jsonl")
    for model in ("base", "sft"):
        preds = read_jsonl(out / "predictions" / f"{model}.jsonl")
        assert len(preds) == 3 * n  # every record x task, unparseable ones included
        for task in ("intent", "compliance", "entities"):
            listed = [u for u in unparseable if u["model"] == model and u["task"] == task]
            assert len(listed) == metrics[model][task]["unparseable_count"]
            assert len(listed) == sum(not p["ok"] for p in preds if p["task"] == task)
        assert metrics[model]["intent"]["unparseable_count"] > 0  # "不知道" answers
        # the confusion CSV for DVC holds one actual/predicted row per test record
        lines = (out / "confusion" / f"{model}_intent.csv").read_text().splitlines()
        assert lines[0] == "actual,predicted" and len(lines) == n + 1
        assert any(line.endswith(",<unparseable>") for line in lines)


def test_crafted_run_finds_each_entity_error_kind(crafted_run):
    out = crafted_run["root"] / "reports" / "evaluate"
    sft = crafted_run["metrics"]["sft"]["entities"]
    for kind in ("boundary", "type", "missed"):
        rows = [r for r in read_jsonl(out / "errors" / f"entity_{kind}.jsonl") if r["model"] == "sft"]
        assert len(rows) == sft[f"errors_{kind}"] > 0
    boundary = next(r for r in read_jsonl(out / "errors" / "entity_boundary.jsonl"))
    assert boundary["gold"]["text"].startswith(
        boundary["pred"]["text"]
    )  # the crafted cut drops the last char
    assert boundary["gold"]["type"] == boundary["pred"]["type"]
    typed = next(r for r in read_jsonl(out / "errors" / "entity_type.jsonl"))
    assert typed["gold"]["text"] == typed["pred"]["text"] and typed["gold"]["type"] != typed["pred"]["type"]
    assert sft["precision"] < 1.0 and sft["recall"] < 1.0


def test_crafted_run_report_is_complete_and_self_contained(crafted_run):
    reports = crafted_run["root"] / "reports"
    md = (reports / "report.md").read_text(encoding="utf-8")
    headings = (
        "## Verdict",
        "## Headline: base -> sft",
        "## Efficiency",
        "## Error analysis",
        "### intent (classification)",
        "### Unparseable answers",
        "## Data quality (label_qa)",
        "## Training",
    )
    positions = [md.index(heading) for heading in headings]
    assert positions == sorted(positions)  # the answer first, data QA and training details last
    assert "kappa_min" in md and "tfidf_lr" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (reports / link).is_file(), link
    assert "evaluate/plots/training_curves.png" in md
    html = (reports / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]+)"', html)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<table" in html and "kappa_min" in html


def test_notebook_runs_against_the_reports(crafted_run, monkeypatch):
    nb = nbformat.read(REPO / "notebooks" / "error_analysis.ipynb", as_version=4)
    params_cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params_cells) == 1 and "REPORTS_DIR" in params_cells[0].source
    monkeypatch.setenv("REPORTS_DIR", str(crafted_run["root"] / "reports" / "evaluate"))
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "inspecting: sft" in text and "entity_boundary" in text
    assert sum(o.output_type == "display_data" and "image/png" in o.data for o in outputs) >= 3


# --- the real script on tiny models -------------------------------------------------------------------------


def run_script(
    tmp_path: Path, models: dict[str, Path], test: list[dict], train: list[dict]
) -> subprocess.CompletedProcess:
    write_jsonl(tmp_path / "test.jsonl", test)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "evaluate.py"),
        "--test",
        "test.jsonl",
        "--reports",
        "reports/evaluate",
        "--report-md",
        "reports/report.md",
        "--report-html",
        "reports/report.html",
        *(f"--model={k}={v}" for k, v in models.items()),
        "--train",
        "train.jsonl",
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    env = {**os.environ, "DSFT_PARAMS": str(tmp_path / "params.yaml"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_params(params_copy):
    edit_params(
        params_copy,
        {
            "evaluate.limit": 10,
            "evaluate.batch_size": 8,
            "evaluate.num_threads": 1,
            "evaluate.max_new_tokens": {"classification": 4, "extraction": 8, "generation": 8},
            "evaluate.efficiency": {"samples": 2, "decode_tokens": 3, "warmup": 0},
        },
    )
    return params_copy


@pytest.mark.slow
def test_script_on_tiny_models(tmp_path, small_params, tiny_models):
    test, train = processed_records(30, seed=5), processed_records(200, seed=1)
    proc = run_script(tmp_path, tiny_models, test, train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "reports" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"]["test_records"] == 10  # evaluate.limit
    for model in ("base", "sft"):
        eff = metrics[model]["efficiency"]
        assert eff["params_total"] == eff["params_counted"] > eff["params_active_per_token"] > 0
        assert eff["prefill_ms_per_token_p50"] > 0 and eff["decode_ms_per_token_p95"] > 0
        assert eff["size_weights_bytes"] > 4 * eff["params_total"] * 0.9  # float32 safetensors
        assert eff["peak_rss_mb"] > 50
        for task in ("intent", "compliance", "entities"):
            m = metrics[model][task]
            assert m["perplexity"] > 1 and m["ppl_tokens"] > 0
            assert 0.0 <= m["unparseable_rate"] <= 1.0
        assert len(read_jsonl(out / "predictions" / f"{model}.jsonl")) == 30
    assert (tmp_path / "reports" / "report.html").stat().st_size > 10_000
    assert (out / "plots" / "confusion_sft_intent.png").is_file()


def load_script():
    """scripts/evaluate.py as a module (bad-input cases run its main() in-process: no 10 s interpreter start)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_rejects_record_missing_a_task_field(tmp_path, small_params, tiny_models):
    test = processed_records(5, seed=5)
    del test[2]["entities"]
    write_jsonl(tmp_path / "test.jsonl", test)
    argv = [
        "--test",
        str(tmp_path / "test.jsonl"),
        "--reports",
        str(tmp_path / "out"),
        "--model",
        "base=unused",
    ]
    with pytest.raises(DataError, match=r"test\.jsonl: record 3 \(id=.*\): missing key 'entities'"):
        load_script().main(argv)
    assert not (tmp_path / "out").exists()


def test_script_requires_name_equals_dir(tmp_path, small_params, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--test", "t.jsonl", "--reports", str(tmp_path), "--model", "models/base"])
    assert exit_info.value.code == 2 and "expected NAME=DIR" in capsys.readouterr().err


def test_check_records_names_the_missing_key():
    with pytest.raises(DataError, match=r"test\.jsonl: record 1 \(id=x\): missing key 'text'"):
        check_records([{"id": "x"}], load_section("evaluate").tasks, "test.jsonl")


def test_verdict_says_when_sft_loses_to_the_baseline_and_skips_an_untrained_base():
    tasks = {"intent": TaskSpec(type="classification", field="intent", instruction="x")}
    metrics = {
        "base": {"intent": {"macro_f1": 0.05, "accuracy": 0.1}},
        "sft": {"intent": {"macro_f1": 0.68, "accuracy": 0.7}},
        "tfidf_lr": {"intent": {"macro_f1": 0.74, "accuracy": 0.75}},
        "majority": {"intent": {"macro_f1": 0.2, "accuracy": 0.5}},
    }
    [line] = verdict_lines(metrics, tasks, ["base", "sft"], untrained={"base"})
    assert "LOSES to the TF-IDF baseline (0.740, -0.060)" in line
    assert "base is untrained" in line and "majority class 0.200" in line
    table = headline_table(metrics, tasks, ["base", "sft"], untrained={"base"})
    assert "delta" not in table.columns and "base (untrained)" in table.columns
    metrics["sft"]["intent"]["macro_f1"] = 0.80
    [line] = verdict_lines(metrics, tasks, ["base", "sft"], untrained=set())
    assert "beats the TF-IDF baseline (0.740, +0.060)" in line and "base 0.050 (+0.750)" in line
    table = headline_table(metrics, tasks, ["base", "sft"])
    assert table.loc[table.metric == "macro_f1", "delta"].item() == pytest.approx(0.75)


def test_untrained_models_reads_the_provenance_base_model_writes(tmp_path):
    for name, pretrained in (("tiny", False), ("smol", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / PROVENANCE_FILE).write_text(json.dumps({"pretrained": pretrained}))
    (tmp_path / "sft").mkdir()  # a fine-tuned model carries no provenance file: trained
    models = {n: tmp_path / n for n in ("tiny", "smol", "sft")}
    assert stage.untrained_models(models) == {"tiny"}
