"""Stage compress: int8 quantization, magnitude and expert pruning, distillation; each evaluated and gated."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from deepseek_sft.compress.gates import GateError
from deepseek_sft.compress.stage import run_compress
from deepseek_sft.config import load_section
from deepseek_sft.evaluate import read_split


def main(argv: list[str] | None = None) -> None:
    """Parse paths, load params `compress` (+ `evaluate`, `train` for the short training runs, and how
    `base_model` loads checkpoints), run the stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft", required=True, help="the SFT model directory (teacher and reference)")
    parser.add_argument(
        "--train", required=True, help="processed train split (router load, recovery, distillation)"
    )
    parser.add_argument("--test", required=True, help="processed test split every model is scored on")
    parser.add_argument(
        "--out", required=True, help="output root: one directory per method (models/compressed)"
    )
    parser.add_argument("--reports", required=True, help="reports directory (reports/compress)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    params = load_section("compress")
    evaluate = load_section("evaluate").section
    base = load_section("base_model").section
    if evaluate.num_threads:
        # OMP_NUM_THREADS too: accelerate (the training runs) otherwise resets torch's thread count
        os.environ["OMP_NUM_THREADS"] = str(evaluate.num_threads)
        torch.set_num_threads(evaluate.num_threads)
    load_options = {
        "trust_remote_code": base.trust_remote_code,
        "dtype": base.dtype,
        "attn_implementation": base.attn_implementation,
    }
    try:
        run_compress(
            args.sft,
            read_split(args.train, params.tasks),
            read_split(args.test, params.tasks),
            params.tasks,
            params.section,
            evaluate,
            seed=params.seed,
            out_root=args.out,
            reports_dir=args.reports,
            load_options=load_options,
            train_params=load_section("train").section,
        )
    except GateError as e:
        logging.getLogger("compress").error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
