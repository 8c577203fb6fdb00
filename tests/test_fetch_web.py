"""fetch.source: web — a real Scrapy crawl of fixture pages served on loopback by the test.

The site has a robots.txt disallow, a page that fails with 500 once and then recovers, the same article
at two URLs, a page without an article body, a permanently failing page and an offsite link.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.fetch import web
from deepseek_sft.fetch.web_spider import BackoffRetryMiddleware, content_hash, retry_after_seconds

from conftest import edit_params

AGENTS = ["dsft-test-agent/1", "dsft-test-agent/2", "dsft-test-agent/3"]


def article(title: str, body: str, category: str = "card_loss") -> str:
    return (
        f"<html><head><title>{title}</title></head><body><h1>{title}</h1>"
        f"<time>2024-05-01</time><span class='category'>{category}</span>"
        f"<article><p>{body}</p><p>第二段。</p><script>var x = 1;</script></article></body></html>"
    )


INDEX = """<html><body>
<a href="/news/1.html">1</a> <a href="/news/2.html">2</a> <a href="/news/dup.html">dup</a>
<a href="/news/flaky.html">flaky</a> <a href="/news/broken.html">broken</a> <a href="/news/gone.html">gone</a>
<a href="/private/secret.html">secret</a> <a href="/news/1.html">1 again</a>
<a href="http://offsite.invalid/news/x.html">offsite</a>
</body></html>"""

PAGES = {
    "/robots.txt": "User-agent: *\nDisallow: /private/\n",
    "/index.html": INDEX,
    "/news/1.html": article("招行发布公告", "招商银行今日发布信用卡挂失新规。"),
    "/news/dup.html": article("招行发布公告", "招商银行今日发布信用卡挂失新规。"),
    "/news/2.html": article("理财新品", "某银行推出稳盈理财产品。", category="wealth_product_purchase"),
    "/news/flaky.html": article("基金动态", "基金净值上涨。", category="not_a_label"),
    "/news/broken.html": "<html><body><h1>只有标题</h1><div class='nav'>没有正文</div></body></html>",
    "/private/secret.html": article("内部", "不应被抓取。"),
}


class Site:
    """A tiny website on 127.0.0.1 that records every request (path, User-Agent, time)."""

    def __init__(self):
        self.requests: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with site.lock:
                    site.requests.append((self.path, self.headers.get("User-Agent", ""), time.monotonic()))
                    hits = sum(p == self.path for p, _, _ in site.requests)
                if self.path == "/news/gone.html" or (self.path == "/news/flaky.html" and hits == 1):
                    self.send_response(500)
                    self.end_headers()
                    return
                body = PAGES.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = body.encode("utf-8")
                kind = "text/plain" if self.path.endswith(".txt") else "text/html; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hits(self, path: str) -> list[tuple[str, str, float]]:
        return [r for r in self.requests if r[0] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.close()


def web_params(params_path, site: Site, **overrides):
    updates = {
        "fetch.source": "web",
        "fetch.web.start_urls": [f"{site.root}/index.html"],
        "fetch.web.allowed_domains": ["127.0.0.1"],
        "fetch.web.article_url_pattern": r"/news/",
        "fetch.web.selectors": {
            "kind": "css",
            "title": "h1",
            "body": "article p",
            "date": "time",
            "links": "a",
        },
        "fetch.web.label_selectors": {"intent": "span.category::text"},
        "fetch.web.user_agents": AGENTS,
        "fetch.web.concurrency": 2,
        "fetch.web.download_delay": 0.0,
        "fetch.web.retry_times": 2,
        "fetch.web.retry_backoff_base": 0.3,
        "fetch.web.retry_backoff_max": 1.0,
        "fetch.web.download_timeout": 10.0,
    }
    updates.update({f"fetch.web.{k}": v for k, v in overrides.items()})
    edit_params(params_path, updates)
    return load_section("fetch", params_path)


@pytest.fixture(scope="module")
def crawl(site, tmp_path_factory):
    """One crawl of the fixture site: (records, stats, crawl log lines)."""
    tmp = tmp_path_factory.mktemp("web")
    params_path = tmp / "params.yaml"
    params_path.write_text((__import__("conftest").REPO / "params.yaml").read_text(encoding="utf-8"))
    stage = web_params(params_path, site)
    stats: dict = {}
    records = web.fetch_records(stage, side_dir=tmp / "raw", stats=stats)
    log_lines = [json.loads(line) for line in (tmp / "raw" / "crawl_log.jsonl").read_text().splitlines()]
    return records, stats, log_lines


def by_path(records, site):
    return {r["meta"]["url"].removeprefix(site.root): r for r in records}


def test_articles_become_raw_records(crawl, site):
    records, _, _ = crawl
    pages = by_path(records, site)
    # 1.html and dup.html share content (one is kept); flaky recovered; broken/gone/secret give none
    assert len(records) == 3
    assert {"/news/2.html", "/news/flaky.html"} <= set(pages)
    assert len({"/news/1.html", "/news/dup.html"} & set(pages)) == 1
    second = pages["/news/2.html"]
    assert second["id"].startswith("web-") and second["source"] == "web"
    assert second["text"] == "某银行推出稳盈理财产品。\n第二段。"  # <script> text left out
    assert second["meta"]["title"] == "理财新品" and second["meta"]["date"] == "2024-05-01"
    assert second["meta"]["fetched_at"].endswith("+00:00")
    assert second["annotations"] == {"gold": {"intent": "wealth_product_purchase"}}
    assert [r["meta"]["url"] for r in records] == sorted(r["meta"]["url"] for r in records)


def test_unknown_page_label_is_dropped_and_counted(crawl, site):
    records, stats, _ = crawl
    assert by_path(records, site)["/news/flaky.html"]["annotations"] == {}
    assert stats["web_labels_dropped"] == 1


def test_robots_disallow_is_obeyed(crawl, site):
    _, stats, log_lines = crawl
    assert site.hits("/private/secret.html") == []
    assert stats["web_robots_forbidden"] == 1
    assert {
        "url": f"{site.root}/private/secret.html",
        "outcome": "failed",
        "reason": "robots_txt",
    } in log_lines


def test_500_recovers_after_a_backoff(crawl, site):
    _, stats, log_lines = crawl
    flaky = site.hits("/news/flaky.html")
    assert len(flaky) == 2
    assert flaky[1][2] - flaky[0][2] >= 0.3  # backoff base, not an immediate retry
    assert len(site.hits("/news/gone.html")) == 3  # first try + retry_times=2, then given up
    assert stats["web_failed_http_500"] == 1
    assert stats["web_retries"] == 3  # one for flaky, two for gone
    assert any(e["outcome"] == "kept" and e["url"].endswith("/news/flaky.html") for e in log_lines)


def test_duplicates_by_url_and_by_content(crawl, site):
    _, stats, log_lines = crawl
    assert len(site.hits("/news/1.html")) == 1  # linked twice, fetched once (dupefilter)
    assert stats["web_duplicate_urls"] >= 1
    assert stats["web_duplicate_content"] == 1
    dup = [e for e in log_lines if e["outcome"] == "duplicate_content"]
    assert len(dup) == 1 and dup[0]["duplicate_of"].endswith(("/news/1.html", "/news/dup.html"))


def test_offsite_links_are_not_followed(crawl):
    _, stats, log_lines = crawl
    assert stats["web_offsite_filtered"] == 1
    assert not any("offsite.invalid" in e["url"] for e in log_lines)


def test_malformed_page_is_a_counted_skip(crawl, site):
    _, stats, log_lines = crawl
    assert stats["web_skipped_no_body"] == 1
    assert {
        "url": f"{site.root}/news/broken.html",
        "outcome": "skipped",
        "reason": "no_body",
        "status": 200,
    } in (log_lines)
    assert any(e["outcome"] == "navigation" and e["url"].endswith("/index.html") for e in log_lines)


def test_user_agents_rotate_over_the_pool(crawl, site):
    agents = {ua for _, ua, _ in site.requests}
    assert agents <= set(AGENTS)
    assert len(agents) >= 2


def test_second_crawl_in_the_same_process(site, params_copy, tmp_path):
    """The reactor lives in a child process, so crawling again works; unlabelled pages get annotations {}."""
    start = [f"{site.root}/news/2.html"]
    stage = web_params(
        params_copy, site, start_urls=start, label_selectors={}, split_body=True, max_pages=2, concurrency=1
    )
    stats: dict = {}
    records = web.fetch_records(stage, side_dir=tmp_path, stats=stats)
    assert [(r["text"], r["meta"]["part"]) for r in records] == [
        ("某银行推出稳盈理财产品。", 0),
        ("第二段。", 1),
    ]
    assert records[0]["id"].endswith("-000") and records[1]["id"].endswith("-001")
    assert all(r["annotations"] == {} and r["meta"]["url"] == start[0] for r in records)
    assert stats["web_hit_page_limit"] == 1  # robots.txt + the page reach max_pages=2
    assert (tmp_path / "crawl_log.jsonl").stat().st_size > 0


def test_missing_start_urls_fail_before_crawling(params_copy):
    edit_params(params_copy, {"fetch.source": "web"})
    with pytest.raises(ParamsError, match=r"fetch\.web\.start_urls"):
        web.fetch_records(load_section("fetch"))


def test_label_selector_must_name_a_task_field(params_copy):
    edit_params(
        params_copy,
        {
            "fetch.source": "web",
            "fetch.web.start_urls": ["http://127.0.0.1:9/"],
            "fetch.web.label_selectors": {"x": "b"},
        },
    )
    with pytest.raises(ParamsError, match=r"fetch\.web\.label_selectors\.x: not a task field"):
        web.fetch_records(load_section("fetch"))


def test_bad_params_are_refused(params_copy):
    edit_params(params_copy, {"fetch.web.start_urls": ["ftp://x"]})
    with pytest.raises(ParamsError, match="is not an http"):
        load_section("fetch")
    edit_params(params_copy, {"fetch.web.start_urls": [], "fetch.web.article_url_pattern": "(["})
    with pytest.raises(ParamsError, match="not a valid regex"):
        load_section("fetch")


def test_retry_after_and_backoff_arithmetic():
    assert retry_after_seconds(b"7") == 7.0
    assert retry_after_seconds(b"soon") is None
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past

    class Settings(dict):
        def getbool(self, k):
            return True

        def getint(self, k):
            return 2

        def getlist(self, k):
            return []

        def getfloat(self, k, default=None):
            return {"DSFT_RETRY_BACKOFF_BASE": 1.0, "DSFT_RETRY_BACKOFF_MAX": 5.0}[k]

    from scrapy.http import Request

    mw = BackoffRetryMiddleware(Settings(RETRY_GIVE_UP_LOG_LEVEL="ERROR"))
    waits = [mw.backoff(Request("http://x/", meta={"retry_times": n}), None) for n in (1, 2, 3, 4)]
    assert 1.0 <= waits[0] <= 1.1 and 2.0 <= waits[1] <= 2.2 and 4.0 <= waits[2] <= 4.4
    assert waits[3] == 5.0  # capped


def test_content_hash_ignores_whitespace():
    assert content_hash("招商 银行\n公告") == content_hash("招商银行公告")
    assert content_hash("招商银行公告") != content_hash("工商银行公告")
