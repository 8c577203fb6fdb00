"""Resume: a checkpoint resumes only its own run (base weights by content), and a resumed run reports the same
metrics, curves and model as an uninterrupted one."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_sft.checkpoint_digest import DIGEST_FILE, digest_record
from deepseek_sft.train.callbacks import ThroughputCallback
from test_train import base_models, run_in_process, train_data  # noqa: F401 - session fixtures

RESUME_TRAIN = {"max_steps": 6, "save_steps": 3, "logging_steps": 2}


def other_weights_same_shapes(src, dst, record: bool) -> None:
    """A copy of checkpoint `src` (config, tokenizer, file names and sizes) holding other weights."""
    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(123)
    save_file(
        {k: torch.randn(v.shape, generator=gen).to(v.dtype) * 0.02 for k, v in weights.items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    if record:  # as the base_model stage writes it
        (dst / DIGEST_FILE).write_text(json.dumps(digest_record(dst)))


@pytest.mark.slow
@pytest.mark.parametrize("record", [False, True], ids=["digest-computed", "digest-recorded"])
def test_a_base_checkpoint_with_other_weights_starts_from_step_zero(
    tmp_path,
    monkeypatch,
    caplog,
    base_models,  # noqa: F811
    train_data,  # noqa: F811
    record,
):
    first, _ = run_in_process(tmp_path, monkeypatch, base_models["v3"], train_data, **RESUME_TRAIN)
    assert first["resumed_from_step"] == 0 and first["global_step"] == 6
    again, _ = run_in_process(tmp_path, monkeypatch, base_models["v3"], train_data, **RESUME_TRAIN)
    assert again["resumed_from_step"] == 6  # the same inputs do resume (so the next check means something)

    other = tmp_path / "other_base"
    other_weights_same_shapes(base_models["v3"], other, record)
    caplog.set_level(logging.INFO)
    swapped, _ = run_in_process(tmp_path, monkeypatch, other, train_data, **RESUME_TRAIN)
    assert swapped["resumed_from_step"] == 0 and swapped["global_step"] == 6
    assert "resuming from" not in caplog.text
    assert "base_weights changed; training starts at step 0" in caplog.text
    assert swapped["base_eval_loss"] != first["base_eval_loss"]  # measured on the new base, not copied over


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of a run."""


@pytest.mark.slow
def test_a_resumed_run_reports_what_an_uninterrupted_run_does(tmp_path, monkeypatch, base_models, train_data):  # noqa: F811
    # logging every 3 steps, checkpoints every 4: the checkpoint at step 4 falls inside a logging window
    train = {"max_steps": 10, "save_steps": 4, "logging_steps": 3, "save_total_limit": None}
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole, whole_paths = run_in_process(
        tmp_path / "whole", monkeypatch, base_models["v3"], train_data, **train
    )

    kill_at = 7  # after checkpoint-4 and after the step-6 log line reached dvclive
    step_end = ThroughputCallback.on_step_end

    def dies(self, args, state, control, **kwargs):
        step_end(self, args, state, control, **kwargs)
        if state.global_step == kill_at:
            raise Killed

    monkeypatch.setattr(ThroughputCallback, "on_step_end", dies)
    with pytest.raises(Killed):
        run_in_process(tmp_path / "resumed", monkeypatch, base_models["v3"], train_data, **train)
    monkeypatch.setattr(ThroughputCallback, "on_step_end", step_end)
    resumed, paths = run_in_process(tmp_path / "resumed", monkeypatch, base_models["v3"], train_data, **train)

    assert resumed["resumed_from_step"] == 4 and resumed["global_step"] == whole["global_step"] == 10
    assert (paths.out / "model.safetensors").read_bytes() == (
        whole_paths.out / "model.safetensors"
    ).read_bytes()
    for key in (
        "train_loss",
        "moe_max_expert_load",
        "moe_dead_experts",
        "train_tokens_seen",
        "eval_loss",
        "base_eval_loss",
        "plan_steps",
        "plan_tokens",
        "epochs",
    ):
        assert resumed[key] == whole[key], key
    # every curve (loss, learning rate, grad norm, per-layer expert load, evals, train_loss) has the same rows
    curves = sorted(p.relative_to(whole_paths.reports) for p in whole_paths.reports.rglob("*.tsv"))
    assert curves == sorted(p.relative_to(paths.reports) for p in paths.reports.rglob("*.tsv"))
    assert any("moe" in str(c) for c in curves) and len(curves) > 5
    for curve in curves:
        if "runtime" in curve.name or "per_second" in curve.name:
            continue  # wall-clock timings of each process
        assert (paths.reports / curve).read_text() == (whole_paths.reports / curve).read_text(), curve
    assert (paths.reports / "expert_load.csv").read_text() == (
        whole_paths.reports / "expert_load.csv"
    ).read_text()
    steps = [
        int(line.split("\t")[0])
        for line in (paths.reports / "live/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    ]
    assert steps == [1, 3, 4, 6, 8, 9, 10]  # logging_steps, plus every checkpoint step, each once
