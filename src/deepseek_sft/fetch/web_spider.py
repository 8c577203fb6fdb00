"""The Scrapy side of `fetch.source: web`: spider, middlewares and pipelines, run in a child process.

``python -m deepseek_sft.fetch.web_spider --config crawl.json --out-dir DIR`` writes into DIR:
- items.jsonl: one page per line (url, title, body, date, labels, depth, status, fetched_at, content hash);
- crawl_log.jsonl: one line per page outcome (kept, skipped with a reason, duplicate, navigation, failed);
- stats.json: Scrapy's crawl stats; scrapy.log: Scrapy's log.

A child process because Twisted's reactor cannot be restarted within one process: a second fetch (or a
second test) in the same interpreter would fail with ReactorNotRestartable.

What Scrapy does and what is added here:
- robots.txt (ROBOTSTXT_OBEY), AutoThrottle, depth and page limits, URL dedup (RFPDupeFilter): Scrapy;
- User-Agent rotation: `RotatingUserAgentMiddleware` (round robin over the params pool);
- backoff: Scrapy 2.19's RetryMiddleware reschedules a retry at once (no delay, only a priority drop), so
  `BackoffRetryMiddleware` subclasses it and awaits base * 2**(n-1) seconds (or Retry-After, capped) before
  handing the retry back; async middleware methods are supported by the 2.19 downloader middleware manager;
- content dedup: `ContentDedupPipeline` drops an item whose normalised body hash was seen before.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.exceptions import DropItem, IgnoreRequest, NotConfigured
from scrapy.http import Request, Response, TextResponse
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.asyncio import sleep

MODULE = "deepseek_sft.fetch.web_spider"
TEXT_XPATH = ".//text()[not(ancestor::script) and not(ancestor::style)]"


def normalise_space(text: str) -> str:
    """Collapse whitespace runs to one space and strip."""
    return re.sub(r"\s+", " ", text).strip()


def content_hash(body: str) -> str:
    """Hash of a body with all whitespace removed (re-wrapped copies of a page count as duplicates)."""
    return hashlib.sha256(re.sub(r"\s+", "", body).encode("utf-8")).hexdigest()


class CrawlLog:
    """crawl_log.jsonl: one JSON line per page outcome, flushed as it goes (a killed crawl keeps its log)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the spider closes

    def write(self, url: str, outcome: str, **extra: Any) -> None:
        """Append one outcome."""
        self.file.write(json.dumps({"url": url, "outcome": outcome, **extra}, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


# --- downloader middlewares --------------------------------------------------------------------------


class RotatingUserAgentMiddleware:
    """Give each request the next User-Agent of the pool (setting DSFT_USER_AGENTS)."""

    def __init__(self, agents: list[str]):
        self._agents = itertools.cycle(agents)

    @classmethod
    def from_crawler(cls, crawler):
        """Read the pool; no pool, no middleware."""
        agents = crawler.settings.getlist("DSFT_USER_AGENTS")
        if not agents:
            raise NotConfigured("DSFT_USER_AGENTS is empty")
        return cls(agents)

    def process_request(self, request: Request) -> None:
        """Set the User-Agent header (UserAgentMiddleware only fills it when missing)."""
        request.headers["User-Agent"] = next(self._agents)


class BackoffRetryMiddleware(RetryMiddleware):
    """RetryMiddleware plus an exponential backoff before each retry (Retry-After wins when larger)."""

    def __init__(self, settings):
        super().__init__(settings)
        self.base = settings.getfloat("DSFT_RETRY_BACKOFF_BASE", 1.0)
        self.cap = settings.getfloat("DSFT_RETRY_BACKOFF_MAX", 60.0)

    def backoff(self, retry: Request, response: Response | None) -> float:
        """Seconds to wait before `retry` (its meta holds the retry count)."""
        delay = self.base * 2 ** (retry.meta.get("retry_times", 1) - 1)
        delay *= 1.0 + 0.1 * random.random()  # jitter, so retries of many pages do not arrive in lockstep
        after = retry_after_seconds(response.headers.get(b"Retry-After")) if response is not None else None
        return min(self.cap, max(delay, after or 0.0))

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        """Retry per RETRY_* settings, after the backoff."""
        result = super().process_response(request, response)
        if isinstance(result, Request):
            await sleep(self.backoff(result, response))
        return result

    async def process_exception(self, request: Request, exception: Exception) -> Request | Response | None:
        """Retry network errors per RETRY_* settings, after the backoff."""
        result = super().process_exception(request, exception)
        if isinstance(result, Request):
            await sleep(self.backoff(result, None))
        return result


def retry_after_seconds(value: bytes | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(text) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


# --- item pipelines ----------------------------------------------------------------------------------


class ContentDedupPipeline:
    """Drop an item whose body (whitespace removed) hashes like an earlier one's."""

    def __init__(self, crawler):
        self.crawler = crawler
        self.first_url: dict[str, str] = {}

    @classmethod
    def from_crawler(cls, crawler):
        """Keep the crawler (for the spider's crawl log)."""
        return cls(crawler)

    def process_item(self, item: dict) -> dict:
        """Pass the first copy of a content, drop the others (logged as duplicate_content)."""
        digest = content_hash(item["body"])
        if digest in self.first_url:
            self.crawler.spider.crawl_log.write(
                item["url"], "duplicate_content", duplicate_of=self.first_url[digest]
            )
            self.crawler.stats.inc_value("dsft/duplicate_content")
            raise DropItem(f"same content as {self.first_url[digest]}")
        self.first_url[digest] = item["url"]
        item["content_sha256"] = digest
        return item


class JsonlItemPipeline:
    """Append each kept item to items.jsonl (setting DSFT_ITEMS_PATH)."""

    def __init__(self, crawler):
        self.crawler = crawler
        self.path = Path(crawler.settings["DSFT_ITEMS_PATH"])
        self.file = None

    @classmethod
    def from_crawler(cls, crawler):
        """Build from the crawler settings."""
        return cls(crawler)

    def open_spider(self) -> None:
        """Open the items file."""
        self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close_spider

    def close_spider(self) -> None:
        """Close the items file."""
        self.file.close()

    def process_item(self, item: dict) -> dict:
        """Write the item and log the page as kept."""
        self.file.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.file.flush()
        self.crawler.spider.crawl_log.write(item["url"], "kept")
        return item


# --- spider ------------------------------------------------------------------------------------------


def select(response: TextResponse, kind: str, selector: str):
    """Run a CSS or XPath selector."""
    return response.css(selector) if kind == "css" else response.xpath(selector)


def extract_text(response: TextResponse, kind: str, selector: str | None, sep: str = "\n") -> str:
    """Visible text of what `selector` picks (elements: their text nodes; text/attribute nodes: as is)."""
    if not selector:
        return ""
    parts = []
    for node in select(response, kind, selector):
        raw = node.get() if isinstance(node.root, str) else " ".join(node.xpath(TEXT_XPATH).getall())
        if text := normalise_space(raw):
            parts.append(text)
    return sep.join(parts)


def extract_links(response: TextResponse, kind: str, selector: str | None) -> list[str]:
    """URLs `selector` picks (attribute/text nodes as is; elements through their href)."""
    if not selector:
        return []
    links = []
    for node in select(response, kind, selector):
        value = node.get() if isinstance(node.root, str) else node.attrib.get("href")
        if value and value.strip():
            links.append(value.strip())
    return links


def failure_reason(failure) -> tuple[str, dict]:
    """A short reason (and details) for a failed request."""
    if failure.check(HttpError):
        return f"http_{failure.value.response.status}", {}
    if failure.check(IgnoreRequest):
        message = str(failure.value)
        if "robots.txt" in message:
            return "robots_txt", {}
        if "offsite" in message.lower():
            return "offsite", {}
        return "ignored", {"detail": message}
    return type(failure.value).__name__, {"detail": str(failure.value)[:200]}


class ArticleSpider(scrapy.Spider):
    """Follows links from the start URLs; each article page with a body becomes an item."""

    name = "deepseek_sft_web"

    def __init__(self, config: dict, out_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.start_urls = config["start_urls"]
        self.allowed_domains = config["allowed_domains"]
        pattern = config.get("article_url_pattern")
        self.article_re = re.compile(pattern) if pattern else None
        self.crawl_log = CrawlLog(Path(out_dir) / "crawl_log.jsonl")

    async def start(self):
        """Requests for the start URLs."""
        for url in self.start_urls:
            yield Request(url, callback=self.parse, errback=self.on_error)

    def parse(self, response: Response, **kwargs: Any):
        """Emit the page's item (or log why not) and follow its links."""
        if not isinstance(response, TextResponse):
            self.crawl_log.write(response.url, "skipped", reason="not_text", status=response.status)
            return
        if self.article_re is None or self.article_re.search(response.url):
            item = self.page_item(response)
            if item is not None:
                yield item
        else:
            self.crawl_log.write(response.url, "navigation", status=response.status)
        for link in extract_links(
            response, self.config["selectors"]["kind"], self.config["selectors"]["links"]
        ):
            yield response.follow(link, callback=self.parse, errback=self.on_error)

    def page_item(self, response: TextResponse) -> dict | None:
        """The page as an item, or None (logged with a reason) when its body selector finds nothing."""
        sel = self.config["selectors"]
        body = extract_text(response, sel["kind"], sel["body"])
        if not body:
            self.crawl_log.write(response.url, "skipped", reason="no_body", status=response.status)
            self.crawler.stats.inc_value("dsft/skipped/no_body")
            return None
        labels = {}
        for name, selector in self.config["label_selectors"].items():
            if value := extract_text(response, sel["kind"], selector, sep=" "):
                labels[name] = value
        return {
            "url": response.url,
            "title": extract_text(response, sel["kind"], sel["title"], sep=" "),
            "body": body,
            "date": extract_text(response, sel["kind"], sel["date"], sep=" "),
            "labels": labels,
            "depth": response.meta.get("depth", 0),
            "status": response.status,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def on_error(self, failure) -> None:
        """Log a request that produced no page: robots.txt, offsite, HTTP error after retries, network error."""
        reason, extra = failure_reason(failure)
        self.crawl_log.write(failure.request.url, "failed", reason=reason, **extra)
        self.crawler.stats.inc_value(f"dsft/failed/{reason}")

    def closed(self, reason: str) -> None:
        """Write stats.json and close the crawl log."""
        stats = {k: v for k, v in self.crawler.stats.get_stats().items()}
        stats["finish_reason"] = reason
        out = Path(self.config["out_dir"]) / "stats.json"
        out.write_text(json.dumps(stats, default=str, ensure_ascii=False, indent=1), encoding="utf-8")
        self.crawl_log.close()


# --- process -----------------------------------------------------------------------------------------


def crawl_settings(config: dict, out_dir: Path) -> dict:
    """Scrapy settings from the crawl config (built by fetch.web from WebParams)."""
    return {
        "ROBOTSTXT_OBEY": config["obey_robots_txt"],
        "USER_AGENT": config["user_agents"][0],  # what robots.txt rules are matched against
        "DSFT_USER_AGENTS": config["user_agents"],
        "CONCURRENT_REQUESTS": config["concurrency"],
        "CONCURRENT_REQUESTS_PER_DOMAIN": config["concurrency"],
        "DOWNLOAD_DELAY": config["download_delay"],
        "DOWNLOAD_TIMEOUT": config["download_timeout"],
        "AUTOTHROTTLE_ENABLED": config["autothrottle"],
        "AUTOTHROTTLE_START_DELAY": max(config["download_delay"], 0.1),
        "AUTOTHROTTLE_MAX_DELAY": config["autothrottle_max_delay"],
        "AUTOTHROTTLE_TARGET_CONCURRENCY": config["autothrottle_target_concurrency"],
        "RETRY_ENABLED": True,
        "RETRY_TIMES": config["retry_times"],
        "RETRY_HTTP_CODES": config["retry_http_codes"],
        "DSFT_RETRY_BACKOFF_BASE": config["retry_backoff_base"],
        "DSFT_RETRY_BACKOFF_MAX": config["retry_backoff_max"],
        "DEPTH_LIMIT": config["depth_limit"],
        "CLOSESPIDER_PAGECOUNT": config["max_pages"],
        "DUPEFILTER_CLASS": "scrapy.dupefilters.RFPDupeFilter",
        "DOWNLOADER_MIDDLEWARES": {
            "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
            f"{MODULE}.BackoffRetryMiddleware": 550,
            f"{MODULE}.RotatingUserAgentMiddleware": 400,
        },
        "ITEM_PIPELINES": {f"{MODULE}.ContentDedupPipeline": 100, f"{MODULE}.JsonlItemPipeline": 900},
        "DSFT_ITEMS_PATH": str(out_dir / "items.jsonl"),
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "LOG_FILE": str(out_dir / "scrapy.log"),
    }


def run(config_path: Path, out_dir: Path) -> None:
    """Run one crawl to completion (blocks until the reactor stops)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["out_dir"] = str(out_dir)
    (out_dir / "items.jsonl").touch()
    process = CrawlerProcess(crawl_settings(config, out_dir))
    process.crawl(ArticleSpider, config=config, out_dir=str(out_dir))
    process.start()


def main() -> None:
    """Command line of the child process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="crawl config JSON (from fetch.web)")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for items, log and stats")
    args = parser.parse_args()
    run(args.config, args.out_dir)


if __name__ == "__main__":
    main()
