"""Stage evaluate: task metrics, efficiency and error analysis of the base and the SFT model, plus the report."""

from __future__ import annotations

import argparse
import logging

import torch

from deepseek_sft.config import load_section
from deepseek_sft.evaluate import read_split, run_evaluation


def parse_models(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """--model NAME=DIR options as an ordered {name: dir}; a malformed one is a usage error."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            parser.error(f"--model {spec!r}: expected NAME=DIR, e.g. base=models/base")
        models[name] = path
    if not models:
        parser.error("give at least one --model NAME=DIR")
    return models


def main(argv: list[str] | None = None) -> None:
    """Parse paths, load params `evaluate` (and how `base_model` loads checkpoints), run the stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--test", required=True, help="processed test split")
    parser.add_argument("--train", help="processed train split (TF-IDF baseline, long-tail frequencies)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a model to evaluate, in table order (repeatable), e.g. base=models/base",
    )
    parser.add_argument("--reports", required=True, help="output directory (reports/evaluate)")
    parser.add_argument("--report-md", help="Markdown report to write (reports/report.md)")
    parser.add_argument("--report-html", help="self-contained HTML report to write (reports/report.html)")
    parser.add_argument("--label-qa-reports", help="reports of label_qa summarised in the report")
    parser.add_argument("--train-reports", help="reports of train (metrics.json, dvclive curves)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    models = parse_models(args.model, parser)
    params = load_section("evaluate")
    base = load_section("base_model").section
    if params.section.num_threads:
        torch.set_num_threads(params.section.num_threads)
    load_options = {
        "trust_remote_code": base.trust_remote_code,
        "dtype": base.dtype,
        "attn_implementation": base.attn_implementation,
    }
    run_evaluation(
        read_split(args.test, params.tasks),
        read_split(args.train, params.tasks) if args.train else None,
        models,
        params.tasks,
        params.section,
        seed=params.seed,
        reports_dir=args.reports,
        report_md=args.report_md,
        report_html=args.report_html,
        label_qa_dir=args.label_qa_reports,
        train_reports_dir=args.train_reports,
        load_options=load_options,
    )


if __name__ == "__main__":
    main()
