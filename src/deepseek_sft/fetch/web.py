"""fetch.source: web — crawl financial news / announcement pages with Scrapy into raw records.

The crawl runs in a child process (web_spider.py: Twisted's reactor cannot restart within a process).
Each kept page becomes a raw record (records.py)::

    {"id": "web-<sha1(url)[:16]>[-<part>]", "text": <body, or one body element>, "source": "web",
     "annotations": {} | {"gold": {<field>: <value from fetch.web.label_selectors>}},
     "meta": {"url", "fetched_at", "title", "date", "status", "depth", "content_sha256"[, "part"]}}

`split_body: true` makes one record per element the body selector matches (per paragraph), which keeps
texts short enough for clean.max_chars; otherwise a page is one record.

Labels: a crawled page is *unlabelled text* (annotations {}) unless the page itself carries a label that
`fetch.web.label_selectors` points at (e.g. a category tag -> intent, the headline -> a generation
field); those values become the single annotator "gold". A classification value outside the task's
label list is dropped from the record and counted (web_labels_dropped). Unlabelled records are meant to
be labelled downstream (people, or an LLM), not trained on as they are.

Side output (side_dir, next to records.jsonl): crawl_log.jsonl, one line per page outcome.
Records are sorted by URL; `fetched_at` and the pages themselves change over time, so unlike the other
sources a re-crawl is not byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from ..config import ParamsError, StageParams, TaskSpec
from ..config.sources import WebParams
from ..io import atomic_path, read_jsonl

log = logging.getLogger(__name__)

VERSION = f"scrapy-{version('scrapy')}"
SIDE_OUTPUTS = ("crawl_log.jsonl",)
DEFAULT_SIDE_DIR = Path("data/raw")


def check_params(web: WebParams, tasks: dict[str, TaskSpec]) -> None:
    """Fail before crawling when the params cannot work."""
    if not web.start_urls:
        raise ParamsError("fetch.source='web' needs fetch.web.start_urls (at least one http(s) URL)")
    fields = {t.field: t for t in tasks.values()}
    for name in web.label_selectors:
        if name not in fields:
            raise ParamsError(
                f"fetch.web.label_selectors.{name}: not a task field; use one of {', '.join(sorted(fields))}"
            )
        if fields[name].type == "extraction":
            raise ParamsError(f"fetch.web.label_selectors.{name}: entity spans cannot come from a selector")


def crawl_config(web: WebParams) -> dict:
    """The JSON handed to the child process."""
    return web.model_dump(mode="json")


def run_crawl(config: dict, work: Path) -> None:
    """Run web_spider in a child process inside `work`; a failed crawl raises with the log's tail."""
    (work / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "deepseek_sft.fetch.web_spider", "--config", str(work / "config.json")]
    cmd += ["--out-dir", str(work)]
    log.info(
        "web: crawling %d start URL(s), at most %d pages", len(config["start_urls"]), config["max_pages"]
    )
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (work / "stats.json").exists():
        scrapy_log = work / "scrapy.log"
        tail = scrapy_log.read_text(encoding="utf-8")[-3000:] if scrapy_log.exists() else ""
        raise RuntimeError(f"web crawl failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n{tail}")


def page_labels(item: dict, tasks: dict[str, TaskSpec]) -> tuple[dict, int]:
    """The page's labels usable for the tasks, and how many were dropped (not in the task's labels)."""
    fields = {t.field: t for t in tasks.values()}
    kept, dropped = {}, 0
    for name, value in item.get("labels", {}).items():
        task = fields[name]
        if task.type == "classification" and task.labels is not None and value not in task.labels:
            dropped += 1
            continue
        kept[name] = value
    return kept, dropped


def item_to_records(item: dict, labels: dict, split_body: bool) -> list[dict]:
    """Raw records from one crawled page: one, or one per body element when `split_body`."""
    meta_keys = ("url", "fetched_at", "title", "date", "status", "depth", "content_sha256")
    meta = {k: item[k] for k in meta_keys if k in item}
    base = "web-" + hashlib.sha1(item["url"].encode("utf-8")).hexdigest()[:16]
    # web_spider joins the (whitespace-normalised) body elements with newlines
    parts = [p for p in item["body"].split("\n") if p] if split_body else [item["body"]]
    return [
        {
            "id": f"{base}-{k:03d}" if split_body else base,
            "text": text,
            "source": "web",
            "annotations": {"gold": dict(labels)} if labels else {},
            "meta": {**meta, "part": k} if split_body else meta,
        }
        for k, text in enumerate(parts)
    ]


def crawl_stats(scrapy_stats: dict, events: list[dict], records: int, labels_dropped: int) -> dict:
    """Flat numbers of a crawl for reports/fetch/metrics.json."""
    stats = {
        "web_responses": int(scrapy_stats.get("response_received_count", 0)),
        "web_records": records,
        "web_duplicate_urls": int(scrapy_stats.get("dupefilter/filtered", 0)),
        "web_duplicate_content": sum(e["outcome"] == "duplicate_content" for e in events),
        "web_robots_forbidden": int(scrapy_stats.get("robotstxt/forbidden", 0)),
        "web_offsite_filtered": int(scrapy_stats.get("offsite/filtered", 0)),
        "web_retries": int(scrapy_stats.get("retry/count", 0)),
        "web_navigation_pages": sum(e["outcome"] == "navigation" for e in events),
        "web_hit_page_limit": int(scrapy_stats.get("finish_reason") == "closespider_pagecount"),
        "web_labels_dropped": labels_dropped,
    }
    for event in events:
        if event["outcome"] in ("skipped", "failed"):
            key = f"web_{event['outcome']}_{event['reason']}"
            stats[key] = stats.get(key, 0) + 1
    return stats


def fetch_records(
    params: StageParams, side_dir: str | os.PathLike | None = None, stats: dict | None = None
) -> list[dict]:
    """Crawl per `fetch.web`; return raw records sorted by URL, write crawl_log.jsonl, add to `stats`."""
    web: WebParams = params.section.web
    check_params(web, params.tasks)
    with tempfile.TemporaryDirectory(prefix="dsft-web-") as tmp:
        work = Path(tmp)
        run_crawl(crawl_config(web), work)
        items = read_jsonl(work / "items.jsonl")
        events = read_jsonl(work / "crawl_log.jsonl") if (work / "crawl_log.jsonl").exists() else []
        scrapy_stats = json.loads((work / "stats.json").read_text(encoding="utf-8"))
        side = Path(side_dir) if side_dir is not None else DEFAULT_SIDE_DIR
        with atomic_path(side / "crawl_log.jsonl") as out:
            out.write_text("")
            if events:
                shutil.copyfile(work / "crawl_log.jsonl", out)
    records, dropped = [], 0
    for item in items:
        labels, n = page_labels(item, params.tasks)
        dropped += n
        records += item_to_records(item, labels, web.split_body)
    records.sort(key=lambda r: (r["meta"]["url"], r["meta"].get("part", 0)))
    numbers = crawl_stats(scrapy_stats, events, len(records), dropped)
    log.info("web: %s", ", ".join(f"{k}={v}" for k, v in numbers.items()))
    if stats is not None:
        stats.update(numbers)
    return records
