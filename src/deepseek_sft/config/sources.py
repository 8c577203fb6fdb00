"""Params of the crawler (`fetch.source: web`) and LLM-synthesis (`fetch.source: llm`) sources."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class WebParams(Section):
    """A Scrapy crawl of financial news / announcement pages."""

    start_urls: list[str] = Field(default_factory=list, description="pages the crawl starts from")


class LlmParams(Section):
    """Synthetic records from an OpenAI-compatible chat endpoint."""

    base_url: str | None = Field(default=None, description="endpoint, e.g. https://api.deepseek.com/v1")
