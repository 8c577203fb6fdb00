"""The Makefile as a newcomer meets it: help, setup messages, check-params, exp, test-fast and show.

Targets run for real in a scratch directory holding a copy of the Makefile and params.yaml and a stand-in
`.venv/bin` (python forwards to the project's venv; dvc and pip only record their arguments), so nothing here
builds an environment or runs the pipeline, and the project's own .venv is never touched.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_repo

# a stand-in tool that appends its name and arguments (one JSON list per call) to a log
RECORDER = (
    f"#!{sys.executable}\n"
    "import json, os, sys\n"
    "with open({log!r}, 'a') as f:\n"
    "    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
)


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Makefile + params.yaml + a stand-in venv whose stamp is up to date."""
    for name in ("Makefile", "params.yaml", "pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    _write_exe(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for tool in ("dvc", "pytest"):
        _write_exe(bin_dir / tool, RECORDER.format(log=str(tmp_path / "calls.log")))
    earlier = time.time() - 60  # the stamp is newer than the lock and pyproject.toml: setup has nothing to do
    for name in ("pyproject.toml", "requirements.lock"):
        os.utime(tmp_path / name, (earlier, earlier))
    (tmp_path / ".venv" / ".installed").touch()
    return tmp_path


def make(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DSFT_PARAMS", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(workdir), *args],
        capture_output=True,
        text=True,
        env=environ | (env or {}),
        timeout=60,
    )


def calls(workdir: Path) -> list[list[str]]:
    """Each recorded call as [tool, *arguments]."""
    log = workdir / "calls.log"
    return [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


# -- help -------------------------------------------------------------------------------------------------------
def test_help_in_a_pipe_is_plain_text_listing_every_target_and_variable(workdir):
    out = make(workdir, "help")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    targets = re.findall(r"^  (\S+) ", out.stdout.split("Variables:")[0], flags=re.M)
    declared = re.findall(
        r"^([a-z0-9_-]+):.*## ", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M
    )
    assert targets == declared and {"smollm2", "test-fast", "check-params"} <= set(targets)
    variables = re.findall(r"^  ([A-Z_]+) ", out.stdout.split("Variables:")[1], flags=re.M)
    assert variables == ["S", "T", "PYTEST_ARGS", "KEEP"]


def test_help_on_a_terminal_is_coloured(workdir):
    leader, follower = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "MAKEFLAGS", "MAKELEVEL")}
    proc = subprocess.run(
        ["make", "-C", str(workdir), "--no-print-directory", "help"],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=environ,
        timeout=60,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.returncode == 0
    assert "\x1b[36mtest-fast" in b"".join(chunks).decode()


# -- setup ------------------------------------------------------------------------------------------------------
def test_setup_says_what_it_is_doing_before_and_after(workdir):
    _write_exe(workdir / ".venv" / "bin" / "python", RECORDER.format(log=str(workdir / "calls.log")))
    (workdir / ".venv" / ".installed").unlink()
    out = make(workdir, "setup", f"PYTHON={sys.executable}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("setup: installing requirements.lock and this package into .venv/")
    assert re.fullmatch(r"setup: \.venv/ ready in \d+ s", lines[-1])
    assert len(lines) == 2  # the pip commands themselves are not echoed
    assert [c[:4] for c in calls(workdir)] == [["python", "-m", "pip", "install"]] * 3
    assert (workdir / ".venv" / ".installed").exists()
    assert "setup:" not in make(workdir, "setup").stdout  # up to date: nothing to say


# -- check-params and the pipeline targets ----------------------------------------------------------------------
def _typo_in_train(workdir: Path) -> int:
    params = workdir / "params.yaml"
    text = params.read_text(encoding="utf-8")
    params.write_text(text.replace("\n  learning_rate: ", "\n  learning_rat: ", 1), encoding="utf-8")
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("  learning_rate: "))


def test_check_params_prints_the_problem_alone(workdir):
    assert make(workdir, "check-params").stdout.strip() == "params.yaml: ok"
    line = _typo_in_train(workdir)
    out = make(workdir, "check-params")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    mine = [x for x in out.stderr.splitlines() if not x.startswith("make: ***")]
    assert mine == [
        "params.yaml: invalid parameters:",
        f"  line {line}: train.learning_rat: unknown key (typo?); remove it or check the spelling against params.yaml",
    ]


@pytest.mark.parametrize("target", ["data", "repro", "exp"])
def test_a_train_typo_stops_make_data_before_dvc_runs(workdir, target):
    _typo_in_train(workdir)
    out = make(workdir, target)
    assert out.returncode != 0
    assert "train.learning_rat: unknown key" in out.stderr
    assert calls(workdir) == []  # dvc never started


def test_exp_can_stop_at_a_stage_and_quotes_each_value(workdir):
    assert (
        make(
            workdir, "exp", "S=train.learning_rate=1.0e-4 augment.methods=[synonym]", "T=evaluate"
        ).returncode
        == 0
    )
    assert make(workdir, "exp", "S=seed=1").returncode == 0
    assert calls(workdir) == [
        [
            "dvc",
            "exp",
            "run",
            "evaluate",
            "-S",
            "train.learning_rate=1.0e-4",
            "-S",
            "augment.methods=[synonym]",
        ],
        ["dvc", "exp", "run", "-S", "seed=1"],
    ]
    (workdir / "s").touch()  # a one-letter file: an unquoted [synonym] would glob to it
    make(workdir, "exp", "S=augment.methods=[synonym]")
    assert calls(workdir)[-1] == ["dvc", "exp", "run", "-S", "augment.methods=[synonym]"]


def test_test_fast_deselects_the_slow_marker(workdir):
    assert make(workdir, "test-fast", "PYTEST_ARGS=-x -k clean").returncode == 0
    assert calls(workdir) == [["pytest", "-m", "not slow", "-x", "-k", "clean"]]
    markers = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"slow: ' in markers  # the marker test-fast relies on is declared (--strict-markers)


# -- show -------------------------------------------------------------------------------------------------------
SAMPLE_COLUMNS = [
    # what `dvc exp show` names its columns after a full run (metrics, then params, then deps)
    "Experiment", "Created", "State", "Executor", "records", "reports/fetch/metrics.json:seconds", "kept",
    "reports/label_qa/metrics.json:records_in", "train_records", "test_records", "gate_passed",
    "test_fingerprint", "test_fingerprint_count", "quantize_relative_f1_loss", "quantize_size_ratio",
    "gates_failed", "sft_f1", "train_loss", "eval_loss", "eval_ppl", "base_eval_loss", "base.intent.macro_f1",
    "sft.intent.accuracy", "sft.intent.macro_f1", "sft.compliance.macro_f1", "sft.entities.f1",
    "sft.entities.precision", "sft.efficiency.ms_per_token", "tfidf_lr.intent.macro_f1", "stage.test_records",
    "seed", "tasks.intent.labels", "fetch.source", "clean.min_chars", "train.learning_rate",
    "params.yaml:train.max_steps", "scripts/fetch.py", "src/deepseek_sft/io.py", "data/processed/train.jsonl",
]  # fmt: skip


def test_show_keeps_the_headline_columns_and_drops_the_rest(workdir):
    out = make(workdir, "show", "KEEP=tfidf_lr\\.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no metrics yet")  # a clean checkout: said once, no DVC warning
    (argv,) = calls(workdir)
    assert argv[:6] == ["dvc", "exp", "show", "--no-pager", "--md", "--only-changed"]
    keep = re.compile("|".join(v for k, v in itertools.pairwise(argv) if k == "--keep"))
    drop = re.compile("|".join(v for k, v in itertools.pairwise(argv) if k == "--drop"))
    # dvc exp show: --keep protects a column from every drop; --drop removes what it matches
    shown = [c for c in SAMPLE_COLUMNS if keep.match(c) or not drop.match(c)]
    assert shown == [
        "Experiment", "Created", "State", "Executor", "test_fingerprint", "test_fingerprint_count",
        "gates_failed", "eval_loss", "sft.intent.macro_f1", "sft.compliance.macro_f1", "sft.entities.f1",
        "tfidf_lr.intent.macro_f1", "seed", "tasks.intent.labels", "fetch.source", "clean.min_chars",
        "train.learning_rate",
    ]  # fmt: skip
    # params columns survive the drop, so --only-changed decides: equal in every row -> gone
    assert not keep.match("train.learning_rate") and not keep.match("State")


@pytest.mark.slow
def test_show_on_a_real_dvc_repository(tmp_path):
    """Real dvc, real git: the headline table on a clean checkout and after the data stages wrote metrics."""
    root = copy_repo(tmp_path / "repo")
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool in ("python", "dvc"):
        _write_exe(venv / tool, f'#!/bin/sh\nexec "{Path(sys.executable).parent / tool}" "$@"\n')
    earlier = time.time() - 60
    for name in ("pyproject.toml", "requirements.lock"):
        os.utime(root / name, (earlier, earlier))
    (root / ".venv" / ".installed").touch()
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)

    clean = make(root, "show")
    assert clean.returncode == 0, clean.stderr
    assert "failed to load" not in clean.stdout + clean.stderr
    assert clean.stdout.splitlines()[1].split("|")[1:-1] == [" Experiment   ", " Created   "]

    (root / "reports" / "label_qa").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "label_qa" / "metrics.json").write_text(
        json.dumps({"test_records": 723, "test_fingerprint": "3fa9c1e0b27d", "test_fingerprint_count": 723})
    )
    (root / "params.yaml").write_text(
        (root / "params.yaml").read_text(encoding="utf-8").replace("\nseed: 42\n", "\nseed: 7\n")
    )
    run = make(root, "show")
    assert run.returncode == 0, run.stderr
    header, _, workspace, baseline = run.stdout.splitlines()[:4]
    assert [c.strip() for c in header.split("|")[1:-1]] == [
        "Experiment", "Created", "test_fingerprint", "test_fingerprint_count", "seed",
    ]  # fmt: skip
    assert [c.strip() for c in workspace.split("|")[1:-1]][2:] == ["3fa9c1e0b27d", "723", "7"]
    assert [c.strip() for c in baseline.split("|")[1:-1]][4] == "42"
    assert "…" not in run.stdout
