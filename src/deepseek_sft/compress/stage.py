"""The compress stage: build every variant, evaluate them and the SFT model alike, compare, report, then gate.

Outputs:
  models/compressed/<method>/        one checkpoint per method (quantize, prune, expert_prune, head_prune, distill);
                                     quantize and prune are packed (load_compressed; plain transformers refuses
                                     them with that hint), prune_dense/ is the pruned model as a plain checkpoint
  reports/compress/metrics.json      flat `<method>_<metric>` numbers (size ratio, speed-ups, F1 deltas, gates)
  reports/compress/comparison.{csv,md}, {size,latency}_vs_f1.csv, plots/{size,latency}_vs_f1.png, plots/summary.png
  reports/compress/details.json      build details (e.g. router load and kept experts) and full eval metrics
Reports are written before the gates are enforced, so a failing run still shows why.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..config.compress import CompressParams
from ..config.data import TaskSpec
from ..config.evaluate import EvaluateParams
from ..config.train import TrainParams
from ..evaluate.stage import evaluate_all
from ..io import write_json, write_metrics
from . import compare as C
from . import gates as G
from . import speed as S
from .variants import build_variant

log = logging.getLogger(__name__)


def load_any(path, **load_options):
    """A model directory as (model, tokenizer): compressed checkpoints via load_compressed, others as usual."""
    from ..base_model import load_model_and_tokenizer
    from .storage import is_compressed, load_compressed

    if is_compressed(path):
        return load_compressed(path, **load_options)
    return load_model_and_tokenizer(path, **load_options)


def evaluate_dir(
    model_dir,
    records: list[dict],
    tasks: dict[str, TaskSpec],
    params: EvaluateParams,
    *,
    name: str,
    load_options: dict | None = None,
    seed: int = 0,
):
    """The evaluate stage's code path on one model directory, compressed or not (evaluate_model's signature,
    so evaluate.stage.evaluate_all can run it in its worker processes)."""
    from ..evaluate.core import evaluate_loaded, resolve_device

    model, tokenizer = load_any(model_dir, **(load_options or {}))
    model.to(resolve_device(params.device))
    result = evaluate_loaded(
        model, tokenizer, records, tasks, params, name=name, model_dir=model_dir, seed=seed
    )
    result.efficiency["params_held"] = params_held(model)
    return result


def params_held(model) -> int:
    """Weights a model holds: parameters (tied ones once) plus int8 weight buffers of quantized modules."""
    int8 = sum(b.numel() for n, b in model.named_buffers() if b.dtype == torch.int8 and n.endswith("_int8"))
    return sum(p.numel() for p in model.parameters()) + int8


def run_compress(
    sft_dir: str | Path,
    train: list[dict],
    test: list[dict],
    tasks: dict[str, TaskSpec],
    params: CompressParams,
    eval_params: EvaluateParams,
    *,
    seed: int,
    out_root: str | Path,
    reports_dir: str | Path,
    load_options: dict | None = None,
    train_params: TrainParams | None = None,
) -> dict[str, float]:
    """Run the stage; returns the flat metrics. Raises GateError (after writing reports) when a gate fails.

    `train_params` (params `train`: DeepSpeed config, precision...) drive the recovery and distillation runs.
    """
    started = time.perf_counter()
    load_options = load_options or {}
    out_root, reports_dir = Path(out_root), Path(reports_dir)
    if params.eval_limit:
        eval_params = eval_params.model_copy(update={"limit": params.eval_limit})

    def load(path):
        return load_any(path, **load_options)

    # every build first (their training runs use all cores), then every model evaluated, the SFT reference
    # included, in evaluate's parallel one-thread worker processes
    builds = {}
    for method in params.methods:
        log.info("building %s -> %s", method, out_root / method)
        builds[method] = build_variant(
            method, load, sft_dir, out_root / method, params, train, tasks, seed, train_params
        )
    models = {"sft": sft_dir} | {method: out_root / method for method in params.methods}
    results = evaluate_all(models, test, tasks, eval_params, load_options, seed, evaluator=evaluate_dir)
    speed = S.measure_all(models, load_options, seed=seed, **params.speed.model_dump())
    reference = results["sft"].flat()
    comparisons, outcomes = {}, []
    for method in params.methods:
        comparisons[method] = G.compare_to_reference(reference, results[method].flat(), tasks)
        # batch-1 speed and peak memory from the side-by-side run (evaluation's workers mix several models)
        comparisons[method] |= S.speedups(speed["sft"], speed[method])
        comparisons[method]["eval_s"] = results[method].efficiency["total_s"]
        outcomes.append(G.check_gate(method, comparisons[method], getattr(params, method).gate))
    passed = {o.method: o.passed for o in outcomes}
    sft_row = G.compare_to_reference(reference, reference, tasks) | S.speedups(speed["sft"], speed["sft"])
    C.write_comparison(C.table_rows(comparisons, sft_row, passed), reports_dir)
    numeric_builds = {m: {k: v for k, v in b.items() if k != "details"} for m, b in builds.items()}
    metrics = C.flat_metrics(comparisons, passed, numeric_builds)
    metrics |= {"sft_f1": sft_row["f1"], "sft_size_weights_mb": sft_row["size_weights_mb"]}
    metrics |= {
        "sft_decode_ms_per_token": sft_row["decode_ms_per_token"],
        "sft_peak_rss_mb": sft_row["peak_rss_mb"],
    }
    metrics["seconds"] = time.perf_counter() - started
    write_metrics(reports_dir / "metrics.json", metrics)
    write_json(
        reports_dir / "details.json",
        {
            "builds": builds,
            "evaluations": {name: result.flat() for name, result in results.items()},
            "gates": [o.__dict__ for o in outcomes],
            "speed": speed,
        },
    )
    log.info("compress stage: %d variant(s) in %.1fs", len(params.methods), metrics["seconds"])
    G.enforce(outcomes, params.on_fail)
    return metrics
