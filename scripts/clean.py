"""Stage clean: raw records -> normalised, validated, deduplicated records (+ rejects with reasons)."""

from __future__ import annotations

import argparse
import logging
import sys

from deepseek_sft.clean import clean_file, write_outputs
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.io import DataError


def main(argv: list[str] | None = None) -> int:
    """Parse paths, load params section `clean`, clean the raw file and write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in", dest="in_path", required=True, help="raw records JSONL (from stage fetch)")
    parser.add_argument("--out", required=True, help="kept, cleaned records JSONL")
    parser.add_argument("--rejects", required=True, help="rejected and duplicate records JSONL, with reasons")
    parser.add_argument("--reports", required=True, help="directory for metrics.json and plot data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stage = load_section("clean")
        result = clean_file(args.in_path, stage)
    except (DataError, ParamsError) as e:
        print(f"clean: error: {e}", file=sys.stderr)
        return 1
    write_outputs(result, args.out, args.rejects, args.reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
