"""One bench run in its own process (or process group): build a contender, train the budget, score val.

Started by the suite as `python -m deepseek_sft.bench.worker --spec '{...}' --work DIR ...` (or under the
`deepspeed` launcher for DeepSpeed layouts). Each rank writes result_rank<k>.json into its run directory:
real/padded tokens, the steady-state window, its peak RSS, and its share of the held-out loss sums.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from ..config import load_section
from ..io import read_jsonl, write_json
from .contenders import BUILDERS
from .heldout import heldout_sums
from .runs import CountingCollator, RunSpec, StepClock, steady_window

log = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _profiled_train(trainer, steps: int, warmup: int) -> dict:
    """Train under torch.profiler (parts labelled); return the per-category milliseconds of `steps` steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from .profile import PartLabels, ProfilerSteps, summarize

    labels = PartLabels(trainer.model)
    plan = schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=plan, acc_events=True) as prof:
        trainer.add_callback(ProfilerSteps(prof))
        trainer.train()
    labels.remove()
    summary = summarize(prof.events())
    summary["steps"] = steps
    return summary


def run(spec: RunSpec, work: Path, base: Path, out_dir: Path) -> dict:
    """Build, train and score one contender; return this rank's result (also written as JSON)."""
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    torch.set_num_threads(spec.threads)
    stage = load_section("train")
    bench = load_section("bench").section
    model_params = load_section("base_model").section
    load_kwargs = {
        "trust_remote_code": model_params.trust_remote_code,
        "dtype": model_params.dtype,
        "attn_implementation": model_params.attn_implementation,
    }
    meta = json.loads((work / "meta.json").read_text(encoding="utf-8"))
    examples = read_jsonl(work / "train_examples.jsonl")
    if spec.profile_steps:
        # only what the profile needs: warmup + profiled steps worth of examples
        examples = examples[: meta["global_batch"] * (spec.profile_steps + bench.warmup_steps_excluded + 1)]
    built = BUILDERS[spec.contender](
        stage, spec, examples, meta["global_batch"], str(out_dir / "trainer"), load_kwargs, base
    )
    trainer = built.trainer
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock()
    trainer.add_callback(clock)
    load_start = time.perf_counter()
    result: dict = {"name": spec.name, "spec": spec.to_dict(), "loadavg_start": os.getloadavg()[0]}
    if spec.profile_steps:
        result["profile_ms"] = _profiled_train(
            trainer, spec.profile_steps, max(bench.warmup_steps_excluded, 1)
        )
    else:
        trainer.train()
    result["train_seconds"] = round(clock.step_ends[-1] - clock.start, 3) if clock.step_ends else 0.0
    window_tokens, window_seconds, window_cpu_seconds = steady_window(
        clock, counter, built.grad_accum, bench.warmup_steps_excluded
    )
    rank, world = _rank_world()
    result |= {
        "rank": rank,
        "world_size": world,
        "steps": len(clock.step_ends),
        "real_tokens": counter.real,
        "padded_tokens": counter.padded,
        "collate_seconds": round(counter.seconds, 3),
        "window_tokens": window_tokens,
        "window_seconds": round(window_seconds, 4),
        "window_cpu_seconds": round(window_cpu_seconds, 4),
        "loadavg_end": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "experts_implementation": getattr(trainer.model.config, "_experts_implementation", None),
    }
    if not spec.profile_steps:
        val = read_jsonl(work / "val_examples.jsonl")[rank::world]
        eval_start = time.perf_counter()
        total, count = heldout_sums(
            trainer.model, val, built.tokenizer.pad_token_id, bench.heldout_batch_size
        )
        total, count = _all_reduce_sum([total, float(count)])
        result |= {"heldout_nll_sum": total, "heldout_tokens": int(count)}
        result["heldout_seconds"] = round(time.perf_counter() - eval_start, 3)
    result["process_seconds"] = round(time.perf_counter() - load_start, 3)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    write_json(out_dir / f"result_rank{rank}.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse the run spec and paths, then run one contender."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="RunSpec as JSON")
    parser.add_argument("--work", required=True, type=Path, help="bench work dir (examples, meta.json)")
    parser.add_argument("--base", required=True, type=Path, help="base model directory")
    parser.add_argument("--out", required=True, type=Path, help="this run's directory")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(RunSpec(**json.loads(args.spec)), args.work, args.base, args.out)


if __name__ == "__main__":
    main()
