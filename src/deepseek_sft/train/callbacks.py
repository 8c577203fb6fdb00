"""Trainer callbacks of the train stage: dvclive logging keyed by global step, and the base model's loss."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback

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


def dvclive_callback(live_dir: str | Path) -> StepDVCLiveCallback:
    """A dvclive logger writing to `live_dir` (metrics + plots/metrics/*.tsv), never touching dvc.yaml.

    dvcyaml=False: the stage declares these files in dvc.yaml itself. save_dvc_exp=False: the run is already a
    DVC stage (dvc repro / dvc exp run), so dvclive must not create experiments of its own.
    """
    from dvclive import Live

    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=False)
    return StepDVCLiveCallback(live=live, log_model=False)


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
    evaluations and checkpoint saves that happen inside train())."""

    def __init__(self):
        self.step_seconds = 0.0
        self._t0: float | None = None
        self._tokens0 = 0
        self.tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens0 = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_seconds += time.perf_counter() - self._t0
        self.tokens = state.num_input_tokens_seen - self._tokens0

    def metrics(self) -> dict[str, float]:
        """train_step_seconds and train_tokens_per_second (all processes' tokens / wall seconds)."""
        rate = self.tokens / self.step_seconds if self.step_seconds else 0.0
        return {
            "train_step_seconds": round(self.step_seconds, 2),
            "train_tokens_per_second": round(rate, 1),
            "train_tokens_seen": int(self.tokens),
        }
