"""The data half of the pipeline through `dvc repro` itself, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepseek_sft.io import read_jsonl

from conftest import copy_repo, edit_params

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the copy with the project's venv first on PATH and the copy's sources importable."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(cwd / "src"),
    }
    env.pop("DSFT_PARAMS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_project(tmp_path: Path, updates: dict) -> Path:
    """A git + DVC project copied from the repo, with params edited and committed."""
    root = copy_repo(tmp_path / "project")
    edit_params(root / "params.yaml", updates)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(scope="module")
def synthetic_project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("synthetic"), {"fetch.synthetic.num_records": 600})
    run(["dvc", "repro", "label_qa"], root)
    return root


def test_repro_builds_the_splits_and_kappa_metrics(synthetic_project):
    root = synthetic_project
    sizes = {s: len(read_jsonl(root / f"data/processed/{s}.jsonl")) for s in ("train", "val", "test")}
    total = sum(sizes.values())
    assert total > 500
    assert sizes["val"] / total >= 0.14
    metrics = json.loads((root / "reports/label_qa/metrics.json").read_text())
    kappas = {k: v for k, v in metrics.items() if k.startswith("kappa_") and k != "kappa_skipped"}
    assert metrics["kappa_skipped"] == 0
    assert len(kappas) == 9  # 3 layers x 3 annotator pairs
    assert all(0.8 <= v <= 1.0 for v in kappas.values())
    assert (root / "reports/label_qa/kappa_heatmap.png").stat().st_size > 10_000
    clean = json.loads((root / "reports/clean/metrics.json").read_text())
    assert (
        clean["records_in"]
        == clean["kept"] + clean["rejected"] + clean["duplicates_exact"] + clean["duplicates_near"]
    )


def test_second_repro_runs_nothing(synthetic_project):
    out = run(["dvc", "repro", "label_qa"], synthetic_project).stdout
    assert "Running stage" not in out
    status = run(["dvc", "status", "label_qa"], synthetic_project).stdout
    assert "up to date" in status


def test_strict_gate_experiment_fails_naming_the_weak_pair(synthetic_project):
    proc = run(["dvc", "exp", "run", "-S", "label_qa.kappa_threshold=0.99"], synthetic_project, check=False)
    assert proc.returncode != 0
    assert "ann_c" in proc.stdout + proc.stderr


def test_exp_show_lists_params_and_label_qa_metrics(synthetic_project):
    shown = json.loads(run(["dvc", "exp", "show", "--json"], synthetic_project).stdout)
    text = json.dumps(shown)
    assert "kappa_threshold" in text and "min_kappa" in text


def test_csv_with_text_and_label_flows_through(tmp_path):
    labels = ["开户", "销户", "挂失"]
    rows = ["text,label"] + [
        f"我想办理第{i}号业务，关于{labels[i % 3]}的事情{i * 7},{labels[i % 3]}" for i in range(120)
    ]
    root = make_project(
        tmp_path,
        {
            "fetch.source": "local",
            "fetch.local.path": "data/external/requests.csv",
            "fetch.local.label_columns": {"intent": "label"},
            "tasks": {"intent": {"type": "classification", "field": "intent", "instruction": "意图？"}},
            "label_qa.stratify_by": "intent",
        },
    )
    (root / "data/external/requests.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    run(["dvc", "repro", "label_qa"], root)
    splits = [r for s in ("train", "val", "test") for r in read_jsonl(root / f"data/processed/{s}.jsonl")]
    assert len(splits) == 120
    assert {r["intent"] for r in splits} == set(labels)
    metrics = json.loads((root / "reports/label_qa/metrics.json").read_text())
    assert metrics["kappa_skipped"] == 1
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    assert params["fetch"]["source"] == "local"
