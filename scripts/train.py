"""Stage train: SFT of models/base on the processed train split (HF Trainer, DeepSpeed when configured).

Launched by dvc.yaml as `python -m deepseek_sft.train.launch --num_gpus ${train.num_processes} scripts/train.py ...`
(deepspeed's launcher on a free port, after clearing a killed run's leftovers); with `train.deepspeed: null` (and
num_processes 1) it is also fine to run `python scripts/train.py ...` directly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deepseek_sft.config import load_section
from deepseek_sft.train import TrainPaths, run_training


def main(argv: list[str] | None = None) -> None:
    """Parse paths, load params `train` (+ how to load the base model) and run the stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, type=Path, help="base model directory (models/base)")
    parser.add_argument("--train", required=True, type=Path, help="processed train split (JSONL)")
    parser.add_argument("--val", required=True, type=Path, help="processed val split (held-out loss)")
    parser.add_argument("--out", required=True, type=Path, help="final model directory to write (models/sft)")
    parser.add_argument("--checkpoints", required=True, type=Path, help="persistent checkpoint directory")
    parser.add_argument("--reports", required=True, type=Path, help="reports directory (reports/train)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    params = load_section("train")
    base = load_section("base_model").section
    load_kwargs = {
        "trust_remote_code": base.trust_remote_code,
        "dtype": base.dtype,
        "attn_implementation": base.attn_implementation,
    }
    paths = TrainPaths(args.base, args.train, args.val, args.out, args.checkpoints, args.reports)
    run_training(params, load_kwargs, paths)


if __name__ == "__main__":
    main()
