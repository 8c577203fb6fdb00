"""Stage fetch: get raw records (records.py's raw contract) from the source named by `fetch.source`.

A source is a module of this package named like the source (synthetic.py, local.py, hf.py; later web.py,
llm.py) that exposes::

    fetch_records(params: StageParams) -> list[dict]   # raw records, in a deterministic order
    VERSION: str                                        # optional; recorded in the manifest
    SIDE_OUTPUTS: tuple[str, ...]                       # optional; then fetch_records also takes
                                                        # side_dir= (where to write those files) and
                                                        # stats= (a dict to add flat counters to)

Modules are imported only when their source is chosen, so `synthetic` never imports `datasets` and a
new source needs no change here.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from types import ModuleType

from ..config import ParamsError, StageParams
from ..io import DataError
from .summary import build_manifest, summarize

__all__ = ["fetch", "manifest", "source_module", "summarize"]

log = logging.getLogger(__name__)


def source_module(source: str) -> ModuleType:
    """The module implementing `source` (imported on first use)."""
    try:
        module = importlib.import_module(f"{__name__}.{source}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{source}":
            raise  # the source exists but one of its own imports is missing
        raise ParamsError(f"fetch.source={source!r}: no module {__name__}.{source}") from None
    if not hasattr(module, "fetch_records"):
        raise ParamsError(f"fetch.source={source!r}: {module.__name__} has no fetch_records(params)")
    return module


def fetch(
    params: StageParams, side_dir: str | os.PathLike | None = None, timing: dict | None = None
) -> tuple[list[dict], dict]:
    """Fetch the raw records of `params.section.source`; return them with flat, numeric stats.

    Sources with side outputs (crawl log, LLM rejects, review queue) write them into `side_dir`. The stats
    are deterministic (they go to DVC-tracked metrics); wall-clock seconds go into `timing` when given.
    """
    source = params.section.source
    module = source_module(source)
    log.info("fetch: source=%s (%s)", source, getattr(module, "VERSION", "unversioned"))
    started = time.perf_counter()
    source_stats: dict = {}
    if hasattr(module, "SIDE_OUTPUTS"):
        records = module.fetch_records(params, side_dir=side_dir, stats=source_stats)
    else:
        records = module.fetch_records(params)
    seconds = time.perf_counter() - started
    if not records:
        raise DataError(f"fetch.source={source!r} produced no records; check its input")
    stats = {**summarize(records, params.tasks, seconds), **source_stats}
    # seconds differ run to run: in metrics.json they would change dvc.lock on every identical run
    stats.pop("generation_seconds", None)
    if timing is not None:
        timing["fetch_seconds"] = round(seconds, 3)
    log.info("fetch: %d records in %.2fs", len(records), seconds)
    return records, stats


def manifest(params: StageParams, records_path: str | os.PathLike, records: list[dict]) -> dict:
    """The manifest of a fetch run whose records were written to `records_path`."""
    version = getattr(source_module(params.section.source), "VERSION", "unversioned")
    return build_manifest(params, records_path, records, version)
