"""An async client for OpenAI-compatible chat completions: concurrency cap, token-bucket rate, retries.

- at most `concurrency` requests in flight (asyncio.Semaphore);
- at most `requests_per_second` on average, `burst` at once (a token bucket shared by all requests);
- 429, 5xx, timeouts and connection errors are retried with exponential backoff (base * 2**(n-1),
  capped); a Retry-After header on the reply is respected (capped by backoff_max);
- 401/403 stop the run at once (a wrong key fails every request); other 4xx are final for that request.
The API key goes into the Authorization header only; it is never logged or returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx

from ..config.sources import LlmParams

log = logging.getLogger(__name__)


class AuthError(RuntimeError):
    """The endpoint refused the key (401/403); every further request would fail the same way."""


class TokenBucket:
    """Requests per second with a burst capacity; `acquire` waits until a token is free."""

    def __init__(self, rate: float, capacity: int):
        self.rate, self.capacity = rate, float(capacity)
        self.tokens, self.updated = float(capacity), time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Take one token, sleeping while the bucket is empty."""
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


@dataclass
class Reply:
    """The outcome of one chat request after retries: content and usage, or the reason it failed."""

    content: str | None = None
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    error: str = ""
    attempts: int = 0


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (seconds or HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(params: LlmParams, attempt: int, hint: float | None = None) -> float:
    """Wait before retry `attempt` (1-based): Retry-After when given, else exponential; both capped."""
    if hint is not None:
        return min(params.backoff_max, hint)
    return min(params.backoff_max, params.backoff_base * 2 ** (attempt - 1))


def _parse_ok(response: httpx.Response) -> Reply:
    try:
        body = response.json()
    except ValueError:
        return Reply(error="bad_api_response")
    usage = body.get("usage") if isinstance(body, dict) and isinstance(body.get("usage"), dict) else {}
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Reply(error="bad_api_response", usage=usage)
    if not isinstance(content, str):
        return Reply(error="bad_api_response", usage=usage)
    return Reply(content=content, usage=usage, finish_reason=choice.get("finish_reason"))


class ChatClient:
    """Sends chat requests under the concurrency cap and the rate limit, retrying transient failures."""

    def __init__(self, params: LlmParams, api_key: str, client: httpx.AsyncClient):
        self.params = params
        self.url = params.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.client = client
        self.semaphore = asyncio.Semaphore(params.concurrency)
        self.bucket = TokenBucket(params.requests_per_second, params.burst)
        self.retries = 0
        self.http_calls = 0
        self.usage_total = {"prompt_tokens": 0, "completion_tokens": 0}

    def _count_usage(self, usage: dict) -> None:
        for key in self.usage_total:
            if isinstance(usage.get(key), int):
                self.usage_total[key] += usage[key]

    async def _send(self, body: dict) -> tuple[Reply | None, str, float | None]:
        """One HTTP call: (final reply, "", None) or (None, retry reason, Retry-After)."""
        await self.bucket.acquire()
        self.http_calls += 1
        try:
            response = await self.client.post(
                self.url, json=body, headers=self.headers, timeout=self.params.timeout
            )
        except httpx.TimeoutException:
            return None, "timeout", None
        except httpx.TransportError as e:
            return None, f"transport_{type(e).__name__}", None
        code = response.status_code
        if code in (401, 403):
            raise AuthError(f"{self.url}: HTTP {code}; check the key in ${self.params.api_key_env}")
        if code == 429 or code >= 500:
            return None, f"http_{code}", retry_after(response)
        if code >= 400:
            return Reply(error=f"http_{code}"), "", None
        reply = _parse_ok(response)
        self._count_usage(reply.usage)  # tokens are billed even when the reply is rejected later
        return reply, "", None

    async def chat(self, body: dict) -> Reply:
        """POST one chat completion with retries; never raises for transient failures."""
        async with self.semaphore:
            reason = ""
            for attempt in range(1, self.params.max_retries + 2):
                reply, reason, hint = await self._send(body)
                if reply is not None:
                    reply.attempts = attempt
                    return reply
                if attempt <= self.params.max_retries:
                    self.retries += 1
                    wait = backoff(self.params, attempt, hint)
                    log.info("llm: %s, retry %d in %.2fs", reason, attempt, wait)
                    await asyncio.sleep(wait)
            return Reply(error=f"gave_up_{reason}", attempts=self.params.max_retries + 1)
