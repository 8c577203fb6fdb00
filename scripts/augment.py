"""Stage augment: train split -> train split + label-preserving variants (val/test are never read)."""

from __future__ import annotations

import argparse
import logging
import sys

from deepseek_sft.augment import run_augment
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.io import DataError


def main(argv: list[str] | None = None) -> int:
    """Parse paths, load params section `augment`, augment the train split and write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="train split JSONL (from stage label_qa)")
    parser.add_argument("--out", required=True, help="train records followed by their variants, JSONL")
    parser.add_argument("--reports", required=True, help="directory for metrics.json and plot data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_augment(args.train, args.out, args.reports, load_section("augment"))
    except (DataError, ParamsError) as e:
        print(f"augment: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
