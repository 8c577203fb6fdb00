"""`make bench`: the project's training path against plain HF Trainer and TRL's SFTTrainer.

Same model (models/base), same data (a token budget of the train split; held-out = val), same hyperparameters
(params.train); each contender in its own subprocess. Writes reports/bench/{bench.json,metrics.json,bench.png}.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deepseek_sft.bench.report import write_report
from deepseek_sft.bench.suite import BenchPaths, run_bench
from deepseek_sft.config import load_section


def main(argv: list[str] | None = None) -> None:
    """Parse paths, load params `bench` (+ `train` and `base_model`), run the bench and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, type=Path, help="base model directory (models/base)")
    parser.add_argument("--train", required=True, type=Path, help="processed train split (JSONL)")
    parser.add_argument("--val", required=True, type=Path, help="processed val split (held-out loss)")
    parser.add_argument("--out", required=True, type=Path, help="reports directory (reports/bench)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    bench = load_section("bench").section
    stage = load_section("train")
    base = load_section("base_model").section
    report = run_bench(BenchPaths(args.base, args.train, args.val, args.out), stage, bench, base)
    write_report(report, args.out)
    log = logging.getLogger("bench")
    log.info("ratios %s", report["ratios"])
    log.info("deepspeed overhead %s; layouts %s", report["deepspeed_overhead"], report["layouts"])
    log.info("profile shares %s; total %.0f s", report["profile"]["shares"], report["bench_seconds"])


if __name__ == "__main__":
    main()
