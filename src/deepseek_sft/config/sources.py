"""Params of the record sources: local files and `datasets` (column mappings), the crawler (`web`), LLM synthesis
(`llm`).

Entity spans in a label column may be written in any of the usual shapes (fetch/spans.py): this project's
[{start, end, type}], [{start, end, label}], [[start, end, label]], or a map {name: {span: [start, end],
text}} (NLU++ slots); a span that gives its text is checked against the record text by clean.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from ..records import SPLITS
from .base import Section


class ColumnMapping(Section):
    """How columns of a user table map onto the record fields."""

    text_column: str = Field(default="text", description="column holding the input text")
    id_column: str | None = Field(default=None, description="column holding a record id; null = row number")
    label_columns: dict[str, str] = Field(
        default_factory=dict, description="record field -> column, e.g. {intent: label}"
    )
    annotator_column: str | None = Field(
        default=None, description="column naming the annotator when a text has one row per annotator"
    )
    split_column: str | None = Field(
        default=None,
        description="column holding the dataset's own split (train/val/test; also training, validation, "
        "dev, testing); label_qa keeps it and carves val from train; null = label_qa draws the split",
    )
    multi_label_join: str | None = Field(
        default=None,
        description="a classification column holding a list (multi-label, e.g. NLU++ intents) becomes one "
        "label: its items sorted and joined with this text (e.g. '+'); null = clean rejects list labels",
    )


class LocalParams(ColumnMapping):
    """Local files: JSONL, CSV/TSV, Parquet or a Label Studio JSON export."""

    path: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None,
        description="a file, a directory of files or a glob (data/x/fold*.json), or a list of those; or a "
        "map of the dataset's own split -> those ({train: a.csv, test: b.csv}): label_qa keeps that split",
    )
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "label_studio"] = Field(
        default="auto",
        description="file format; auto = from the extension (.json: a Label Studio export when its items "
        "hold a 'data' object, else json = a JSON array of row objects)",
    )

    @model_validator(mode="after")
    def _check_path(self):
        if isinstance(self.path, dict):
            unknown = [k for k in self.path if k not in SPLITS]
            if unknown or "train" not in self.path:
                raise ValueError(
                    f"path: a map of split -> file needs a 'train' key and only keys of {', '.join(SPLITS)} "
                    f"(got {', '.join(map(repr, self.path)) or 'none'})"
                )
            if self.split_column is not None:
                raise ValueError(
                    "path is a map of split -> file and split_column is set: give the split one way only"
                )
        if isinstance(self.path, list) and not self.path:
            raise ValueError("path: an empty list; give at least one file, directory or glob")
        for spec in _path_specs(self.path):
            if not spec.strip():
                raise ValueError("path: an empty file name")
        return self


def _path_specs(path: str | list | dict | None) -> list[str]:
    """Every file/directory/glob string in a `fetch.local.path` value."""
    if path is None:
        return []
    if isinstance(path, str):
        return [path]
    if isinstance(path, dict):
        return [s for value in path.values() for s in _path_specs(value)]
    return list(path)


class HfParams(ColumnMapping):
    """A dataset loaded with datasets.load_dataset (hub id or local dataset directory)."""

    path: str | None = Field(default=None, description="hub dataset id or local directory")
    name: str | None = Field(default=None, description="dataset config name")
    split: str | list[str] = Field(
        default="train",
        description="split to load; a list (e.g. [train, test]) loads each and keeps it as the dataset's own "
        "split (label_qa carves val from train; names such as validation map to val)",
    )
    revision: str | None = Field(default=None, description="pinned git revision (required for hub ids)")
    trust_remote_code: bool = Field(default=False, description="allow dataset scripts to run code")


DEFAULT_USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
]


class WebSelectors(Section):
    """Where a page keeps its parts. Each selector picks elements (their text is joined) or text/attribute nodes."""

    kind: Literal["css", "xpath"] = Field(
        default="css", description="selector language of every selector below"
    )
    title: str | None = Field(default="h1", description="page title; null = none")
    body: str = Field(
        default="article p", description="article body; a page where it matches nothing is skipped"
    )
    date: str | None = Field(default="time", description="publication date (kept in meta); null = none")
    links: str | None = Field(
        default="a::attr(href)", description="URLs to follow (must yield URL strings); null = no following"
    )


class WebParams(Section):
    """A Scrapy crawl of financial news / announcement pages into unlabelled (or selector-labelled) text records."""

    start_urls: list[str] = Field(default_factory=list, description="pages the crawl starts from")
    allowed_domains: list[str] = Field(
        default_factory=list, description="domains the crawl may visit (host names, no scheme); [] = no limit"
    )
    article_url_pattern: str | None = Field(
        default=None,
        description="regex a URL must match to become a record; others are only followed; null = every page",
    )
    selectors: WebSelectors = Field(default_factory=WebSelectors)
    split_body: bool = Field(
        default=False,
        description="one record per element the body selector matches (e.g. per paragraph) instead of per page",
    )
    label_selectors: dict[str, str] = Field(
        default_factory=dict,
        description="record field -> selector of a label the page itself carries (as annotator 'gold'); "
        "{} = records stay unlabelled",
    )
    max_pages: int = Field(default=200, ge=1, le=10_000_000, description="stop after this many responses")
    depth_limit: int = Field(
        default=3, ge=0, le=100, description="link depth from the start URLs; 0 = no limit"
    )
    concurrency: int = Field(default=4, ge=1, le=256, description="parallel requests per domain")
    download_delay: float = Field(
        default=1.0, ge=0.0, le=600.0, description="seconds between requests to a site"
    )
    download_timeout: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="seconds before a request fails"
    )
    obey_robots_txt: bool = Field(default=True, description="respect robots.txt (ROBOTSTXT_OBEY)")
    autothrottle: bool = Field(default=True, description="adapt the delay to server latency (AutoThrottle)")
    autothrottle_target_concurrency: float = Field(
        default=1.0, gt=0.0, le=256.0, description="AutoThrottle: average parallel requests per site"
    )
    autothrottle_max_delay: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="AutoThrottle: max delay"
    )
    user_agents: list[str] = Field(
        default_factory=lambda: list(DEFAULT_USER_AGENTS),
        min_length=1,
        description="User-Agent pool; each request takes the next one (round robin)",
    )
    retry_times: int = Field(default=3, ge=0, le=20, description="retries of a failed request")
    retry_http_codes: list[int] = Field(
        default_factory=lambda: [429, 500, 502, 503, 504, 522, 524, 408],
        description="HTTP statuses that are retried",
    )
    retry_backoff_base: float = Field(
        default=1.0, ge=0.0, le=600.0, description="retry n waits base * 2**(n-1) seconds (plus jitter)"
    )
    retry_backoff_max: float = Field(default=60.0, ge=0.0, le=3600.0, description="cap of one retry wait")

    @model_validator(mode="after")
    def _check(self):
        for url in self.start_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"start_urls: {url!r} is not an http(s) URL")
        for domain in self.allowed_domains:
            if "/" in domain or ":" in domain:
                raise ValueError(f"allowed_domains: {domain!r} must be a host name (no scheme, port or path)")
        if self.article_url_pattern is not None:
            try:
                re.compile(self.article_url_pattern)
            except re.error as e:
                raise ValueError(f"article_url_pattern: not a valid regex ({e})") from None
        return self


class LlmParams(Section):
    """Synthetic records from an OpenAI-compatible chat-completions endpoint (one prompt per label)."""

    base_url: str | None = Field(default=None, description="endpoint root, e.g. https://api.deepseek.com/v1")
    model: str = Field(default="deepseek-chat", description="model name sent with each request")
    api_key_env: str = Field(
        default="DEEPSEEK_API_KEY", description="environment variable holding the API key (never put it here)"
    )
    label_field: str = Field(default="intent", description="classification field the prompts are keyed by")
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="label -> prompt template; placeholders {label}, {index}, {entity_types}",
    )
    fixed_labels: dict[str, str] = Field(
        default_factory=dict,
        description="other classification fields set on every record, e.g. {compliance: compliant}",
    )
    with_entities: bool = Field(
        default=True, description="ask for entity spans too (stored under the extraction task's field)"
    )
    system_prompt: str = Field(
        default="你是金融客服数据生成助手。只输出一个 JSON 对象，不要输出其他内容。",
        description="system message of every request",
    )
    records_per_label: int = Field(default=10, ge=1, le=1_000_000, description="requests per label")
    json_mode: bool = Field(
        default=True, description="send response_format {type: json_object} (DeepSeek / OpenAI JSON mode)"
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="sampling temperature")
    max_tokens: int = Field(default=256, ge=16, le=32768, description="completion token cap per request")
    concurrency: int = Field(default=4, ge=1, le=256, description="requests in flight at once")
    requests_per_second: float = Field(
        default=2.0, gt=0.0, le=1000.0, description="token-bucket request rate"
    )
    burst: int = Field(default=2, ge=1, le=1000, description="token-bucket capacity (requests sent at once)")
    timeout: float = Field(default=60.0, gt=0.0, le=3600.0, description="seconds per request")
    max_retries: int = Field(default=5, ge=0, le=50, description="retries on 429, 5xx and timeouts")
    backoff_base: float = Field(
        default=1.0, ge=0.0, le=600.0, description="retry n waits base * 2**(n-1) s (or Retry-After)"
    )
    backoff_max: float = Field(default=60.0, ge=0.0, le=3600.0, description="cap of one retry wait")
    price_per_1k_prompt_tokens: float = Field(
        default=0.00027, ge=0.0, description="price per 1000 prompt tokens (in `currency`)"
    )
    price_per_1k_completion_tokens: float = Field(
        default=0.0011, ge=0.0, description="price per 1000 completion tokens (in `currency`)"
    )
    currency: str = Field(default="USD", description="currency of the prices (reported only)")
    review_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, description="share of kept records copied to the human-review queue"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env: {self.api_key_env!r} is not an environment variable name")
        if self.label_field in self.fixed_labels:
            raise ValueError(f"fixed_labels must not set label_field {self.label_field!r} (the prompts do)")
        return self
