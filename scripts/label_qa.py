"""Stage label_qa: agreement (kappa) gate, majority-vote adjudication, stable train/val/test split.

Paths come from the dvc.yaml cmd line; parameters from params.yaml `seed`, `tasks` and `label_qa`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.io import DataError
from deepseek_sft.label_qa import AgreementGateError, run_label_qa


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line paths of the stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="in_path", required=True, help="interim records (clean.jsonl)")
    parser.add_argument("--out-dir", required=True, help="directory for train/val/test.jsonl")
    parser.add_argument("--needs-review", required=True, help="records without a majority label (JSONL)")
    parser.add_argument("--reports", required=True, help="directory for metrics.json and plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the stage; exit status 1 with a one-paragraph reason on bad params, bad data or a failed gate."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_section("label_qa")
        run_label_qa(args.in_path, args.out_dir, args.needs_review, args.reports, params)
    except (ParamsError, DataError, AgreementGateError) as e:
        logging.getLogger("label_qa").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
