"""Stage fetch: write raw records (data/raw/records.jsonl), their manifest and reports/fetch/metrics.json.

reports/fetch/timing.json holds the wall-clock seconds; it is not a DVC output, so identical runs leave
dvc.lock unchanged."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.fetch import fetch, manifest
from deepseek_sft.io import DataError, write_json, write_jsonl, write_metrics


def main(argv: list[str] | None = None) -> int:
    """Fetch the records of `fetch.source` and write them with a manifest and metrics."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="records JSONL to write")
    parser.add_argument("--manifest", required=True, type=Path, help="manifest JSON to write")
    parser.add_argument("--side-dir", required=True, type=Path, help="directory for a source's side files")
    parser.add_argument("--reports", required=True, type=Path, help="directory for metrics.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_section("fetch")
        args.side_dir.mkdir(parents=True, exist_ok=True)
        timing: dict = {}
        records, stats = fetch(params, side_dir=args.side_dir, timing=timing)
    except (DataError, ParamsError) as e:
        print(f"fetch: error: {e}", file=sys.stderr)
        return 2
    write_jsonl(args.out, records)
    write_json(args.manifest, manifest(params, args.out, records))
    write_metrics(args.reports / "metrics.json", stats)
    write_json(args.reports / "timing.json", timing)  # wall-clock: not DVC-tracked (see dvc.yaml)
    # The side directory is one DVC output whatever the source: list what this run put there.
    side_files = sorted(p.name for p in args.side_dir.iterdir() if p.name != "index.json")
    write_json(args.side_dir / "index.json", {"source": params.section.source, "files": side_files})
    logging.info("fetch: wrote %d records to %s", len(records), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
