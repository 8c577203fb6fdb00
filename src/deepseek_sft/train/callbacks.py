"""Trainer callbacks of the train stage: dvclive logging keyed by global step (continued across a resume), the
base model's loss, throughput, and the whole-run totals a checkpoint carries to the resumed run."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import ExportableState

from ..io import write_json

log = logging.getLogger(__name__)


class StepDVCLiveCallback(DVCLiveCallback):
    """transformers' DVCLiveCallback, with dvclive's step set to the trainer's global step.

    The stock callback counts log calls, so eval lines and a resume would shift the x axis of every plot.
    """

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if self.live is not None and state.is_world_process_zero:
            self.live.step = state.global_step
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)


def dvclive_callback(live_dir: str | Path, resumed_step: int = 0) -> StepDVCLiveCallback:
    """A dvclive logger writing to `live_dir` (metrics + plots/metrics/*.tsv), never touching dvc.yaml.

    dvcyaml=False: the stage declares these files in dvc.yaml itself. save_dvc_exp=False: the run is already a
    DVC stage (dvc repro / dvc exp run), so dvclive must not create experiments of its own. A run resumed at
    `resumed_step` > 0 continues the curves: rows logged after that step by the interrupted run are dropped
    (the resumed run logs those steps again), the rest are kept, so the curves equal an uninterrupted run's.
    """
    from dvclive import Live

    if resumed_step > 0:
        truncate_curves(Path(live_dir) / "plots" / "metrics", resumed_step)
    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=resumed_step > 0)
    return StepDVCLiveCallback(live=live, log_model=False)


def truncate_curves(plots_dir: Path, last_step: int) -> None:
    """Drop the rows of every dvclive curve (*.tsv with a `step` column) logged after `last_step`."""
    for path in sorted(plots_dir.rglob("*.tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if int(r[col]) <= last_step)]
        if len(kept) < len(rows):
            path.write_text("".join("\t".join(r) + "\n" for r in kept), encoding="utf-8")


class BaseEvalCallback(TrainerCallback):
    """Measure the held-out loss of the untouched base model at step 0 (kept in `store` for resumed runs).

    It runs inside training, once DeepSpeed has built its engine: Trainer.evaluate() before train() would need
    a ZeRO-3 inference engine and refuses ZeRO-2.
    """

    def __init__(self, store: Path, is_main: bool, enabled: bool = True):
        self.store = Path(store)
        self.is_main = is_main
        self.enabled = enabled
        self.trainer = None  # set once the trainer exists
        self.metrics: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        if state.global_step > 0:
            if self.store.is_file():
                self.metrics = json.loads(self.store.read_text())
            log.info("resumed at step %d; base model eval loaded from %s", state.global_step, self.store)
            return
        self.metrics = self.trainer.evaluate(metric_key_prefix="base_eval")
        if self.is_main:
            write_json(self.store, self.metrics)


class ThroughputCallback(TrainerCallback):
    """Training tokens per second over the optimizer steps only (Trainer's train_runtime also counts the
    evaluations and checkpoint saves that happen inside train()). The rate is this process's (steps since a
    resume); the token count is the whole run's."""

    def __init__(self):
        self.step_seconds = 0.0
        self._t0: float | None = None
        self._tokens0 = 0
        self.tokens = 0
        self.run_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens0 = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_seconds += time.perf_counter() - self._t0
        self.tokens = state.num_input_tokens_seen - self._tokens0
        self.run_tokens = state.num_input_tokens_seen

    def metrics(self) -> dict[str, float]:
        """train_step_seconds and train_tokens_per_second (all processes' tokens / wall seconds) of this
        process's steps, and train_tokens_seen of the whole run."""
        rate = self.tokens / self.step_seconds if self.step_seconds else 0.0
        return {
            "train_step_seconds": round(self.step_seconds, 2),
            "train_tokens_per_second": round(rate, 1),
            "train_tokens_seen": int(self.run_tokens),
        }


class WholeRunCallback(TrainerCallback, ExportableState):
    """Carries what describes the whole run through a checkpoint, so a resumed run reports what an
    uninterrupted one does: the running sum of logged losses (train_loss) and the MoE expert load history.

    Trainer restarts both at a resume (its train_loss covers only the steps after it). This callback forces a
    log at every checkpoint step, so no loss is pending when the checkpoint is written; its state goes into the
    checkpoint's trainer_state.json (`stateful_callbacks`) and is put back at train begin. The sum then goes on
    from the same float in the same order, and train_loss matches the uninterrupted run's bit for bit.
    """

    def __init__(self, monitor=None):
        self.trainer = None  # set once the trainer exists
        self.monitor = monitor  # RouterMonitor or None
        self.restored_step = 0

    def state(self) -> dict:
        """The checkpoint's copy (called by Trainer while it saves one)."""
        attributes = {"loss_sum": float(getattr(self.trainer, "_total_loss_scalar", 0.0))}
        if self.monitor is not None and self.monitor.routers:
            attributes["moe_history"] = [list(row) for row in self.monitor.history]
            attributes["moe_totals"] = {str(k): v.tolist() for k, v in self.monitor.totals.items()}
        return {"args": {}, "attributes": attributes}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step == 0 or not isinstance(saved, dict):
            return
        attributes = saved.get("attributes", {})
        self.trainer._total_loss_scalar = float(attributes.get("loss_sum", 0.0))
        if self.monitor is not None and "moe_history" in attributes:
            self.monitor.history = [tuple(row) for row in attributes["moe_history"]]
            self.monitor.totals = {
                int(k): torch.tensor(v, dtype=torch.long) for k, v in attributes["moe_totals"].items()
            }
        self.restored_step = state.global_step
        log.info(
            "resumed at step %d: loss sum and expert load of the steps before restored", state.global_step
        )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True  # flush the pending loss window into the sum the checkpoint records

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer divides the sum by the steps of this process only; the sum already covers the whole run.
        if logs is not None and "train_loss" in logs and state.global_step > 0:
            logs["train_loss"] = self.trainer._total_loss_scalar / state.global_step
