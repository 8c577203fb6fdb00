"""Stage base_model: build the tiny DeepSeek-V3 default (or resolve a local/hub checkpoint) into models/base."""

from __future__ import annotations

import argparse
import logging

from deepseek_sft.base_model import build_base_model, write_reports
from deepseek_sft.config import load_section
from deepseek_sft.io import read_jsonl


def main(argv: list[str] | None = None) -> None:
    """Parse paths, load params `base_model`, build/resolve the model and write metrics and plots."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="processed train split (the tokenizer's only corpus)")
    parser.add_argument("--val", required=True, help="processed val split (for tokenizer statistics only)")
    parser.add_argument("--out", required=True, help="model directory to write (models/base)")
    parser.add_argument("--reports", required=True, help="reports directory (reports/base_model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    params = load_section("base_model")
    metrics, lengths = build_base_model(
        params.section, params.seed, params.tasks, read_jsonl(args.train), read_jsonl(args.val), args.out
    )
    write_reports(metrics, lengths, args.reports)
    logging.getLogger("base_model").info("wrote %s: %s", args.out, metrics)


if __name__ == "__main__":
    main()
