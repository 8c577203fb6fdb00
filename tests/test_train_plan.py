"""Training length: max_steps / target_tokens / num_train_epochs / min_steps, planned, logged and in metrics.json
before the first step, and equal to what the run then does."""

from __future__ import annotations

import json
import math

import pytest

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.train import TrainParams
from deepseek_sft.io import write_jsonl
from deepseek_sft.train import runner
from deepseek_sft.train.plan import make_plan
from test_train import REPO, base_models, make_records, run_in_process, train_data  # noqa: F401 - fixtures

from conftest import edit_params

# 10 examples of 30 tokens: 300 tokens per epoch
EXAMPLES = [{"input_ids": list(range(30))} for _ in range(10)]


def test_the_default_length_follows_num_train_epochs_unchanged():
    default = load_section("train", REPO / "params.yaml").section
    assert default.target_tokens is None and default.min_steps == 0 and default.max_steps == -1
    plan = make_plan(default, EXAMPLES, batches=5, world_size=2)
    assert plan.source == "num_train_epochs"  # the runner then leaves TrainingArguments.max_steps at -1
    assert (plan.max_steps, plan.epochs, plan.tokens) == (10, 2.0, 600)


def test_budgets_a_user_can_reason_about():
    by_tokens = make_plan(TrainParams(max_steps=-1, target_tokens=1000), EXAMPLES, batches=5, world_size=1)
    assert by_tokens.source == "target_tokens" and by_tokens.max_steps == math.ceil(
        1000 / 60
    )  # 60 tokens/step
    assert by_tokens.tokens == pytest.approx(1000, abs=60)
    floor = make_plan(TrainParams(num_train_epochs=1.0, min_steps=12), EXAMPLES, batches=5, world_size=1)
    assert (floor.source, floor.max_steps, floor.epochs) == ("min_steps", 12, 2.4)
    exact = make_plan(TrainParams(max_steps=7), EXAMPLES, batches=5, world_size=1)
    assert (exact.source, exact.max_steps) == ("max_steps", 7)
    assert "7 optimizer steps = 1.40 epochs of 5 steps over 10 examples" in exact.describe()


def test_a_fixed_max_steps_with_a_budget_is_refused(params_copy):
    edit_params(params_copy, {"train.max_steps": 100, "train.target_tokens": 10000})
    with pytest.raises(ParamsError, match="max_steps=100 fixes the run length"):
        load_section("train", params_copy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("budget", "source"),
    [({"min_steps": 12}, "min_steps"), ({"target_tokens": 12000}, "target_tokens")],
)
def test_the_planned_length_is_written_first_and_is_what_ran(
    tmp_path,
    monkeypatch,
    base_models,  # noqa: F811
    budget,
    source,
):
    data = {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl"}
    write_jsonl(data["train"], make_records(24, seed=1))  # 72 examples: 9 steps of 8 per epoch
    write_jsonl(data["val"], make_records(8, seed=2))
    seen = {}
    write = runner.write_train_metrics

    def spy(reports, metrics):
        seen.setdefault("first", dict(metrics))  # the plan, written before training starts
        write(reports, metrics)

    monkeypatch.setattr(runner, "write_train_metrics", spy)
    train = {"max_steps": -1, "num_train_epochs": 1.0, "eval_base": False, "save_steps": 100, **budget}
    metrics, paths = run_in_process(tmp_path, monkeypatch, base_models["v3"], data, **train)
    assert set(seen["first"]) == {k for k in metrics if k.startswith("plan_")}
    assert metrics["plan_steps_per_epoch"] == 9 and metrics["global_step"] == metrics["plan_steps"] > 9
    if source == "min_steps":
        assert metrics["global_step"] == 12
    else:  # about 12,000 tokens: within one step's tokens
        per_step = metrics["plan_epoch_tokens"] / 9
        assert abs(metrics["train_tokens_seen"] - 12000) < 2 * per_step
    assert json.loads((paths.reports / "metrics.json").read_text())["plan_steps"] == metrics["global_step"]
