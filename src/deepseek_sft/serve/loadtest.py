"""A bounded load test of the service: a fixed number of requests, a wall-clock cap, N concurrent clients.

It only ever talks to loopback addresses: it is a tool for measuring your own service, not for loading
someone else's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from tqdm.auto import tqdm

from ..io import DataError, read_jsonl

log = logging.getLogger(__name__)

# Used when no data file is given: a few requests in the reference domain's style.
EXAMPLE_TEXTS = (
    "我的招商银行信用卡丢了，请帮我挂失",
    "昨天给张伟转账5000元一直没到账",
    "请问建设银行的房贷利率现在是多少",
    "我想赎回上个月买的稳健理财产品",
    "帮我查一下工商银行储蓄卡的余额",
    "客户经理说这个基金保本保收益，可以买吗",
    "2024年3月的信用卡账单有一笔不认识的扣费",
    "我要申请提高信用卡额度到五万元",
)


class NotLoopback(ValueError):
    """The target is not a loopback address."""


@dataclass(frozen=True)
class Sample:
    """One request's outcome as the client saw it."""

    endpoint: str
    status: int  # 0 = no HTTP answer (timeout, connection error)
    seconds: float
    tokens: int
    error: str = ""


def check_loopback(url: str) -> str:
    """Return the host of `url` if every address it resolves to is loopback; raise NotLoopback otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopback(f"{url!r}: expected an http://host:port URL")
    host = parts.hostname
    try:
        addresses = {
            info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        }
    except socket.gaierror as e:
        raise NotLoopback(f"{url!r}: cannot resolve {host!r}: {e}") from None
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise NotLoopback(
            f"{url!r}: {host!r} resolves to non-loopback address(es) {', '.join(outside)}; "
            "the load test only targets 127.0.0.0/8 or ::1"
        )
    return host


def load_texts(path: str | os.PathLike | None) -> list[str]:
    """Request texts: the `text` of each record in a JSONL file, or the built-in examples when `path` is None."""
    if path is None:
        return list(EXAMPLE_TEXTS)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: no such file; run the data stages (make data) or set serve.loadtest.texts_path: null "
            "to use built-in example texts"
        )
    texts = [r["text"] for r in read_jsonl(path) if isinstance(r.get("text"), str) and r["text"].strip()]
    if not texts:
        raise DataError(f"{path}: no record with a non-empty 'text' field")
    return texts


def request_plan(tasks: Sequence[str], texts: Sequence[str], n: int) -> list[tuple[str, dict]]:
    """(path, body) of the n requests, cycling through tasks and texts deterministically."""
    if not tasks:
        raise ValueError("no task to load-test; params `tasks` is empty")
    return [(f"/v1/tasks/{tasks[i % len(tasks)]}", {"text": texts[i % len(texts)]}) for i in range(n)]


async def _one(client: httpx.AsyncClient, path: str, body: dict) -> Sample:
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as e:
        return Sample(path, 0, time.perf_counter() - started, 0, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return Sample(path, response.status_code, seconds, 0, response.text[:200])
    return Sample(path, 200, seconds, int(response.json().get("tokens", 0)))


async def drive(
    url: str,
    plan: Sequence[tuple[str, dict]],
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    headers: dict | None = None,
) -> tuple[list[Sample], float]:
    """Send `plan` with `concurrency` clients until done or `duration_s` passed; return samples and wall time."""
    check_loopback(url)
    next_index = 0
    samples: list[Sample] = []
    deadline = time.monotonic() + duration_s

    # a run may take minutes (the duration cap): show requests done, so it never looks hung
    progress = tqdm(total=len(plan), desc="load test", unit="req", leave=False)

    async def client_loop(client: httpx.AsyncClient):
        nonlocal next_index
        while next_index < len(plan) and time.monotonic() < deadline:
            path, body = plan[next_index]
            next_index += 1  # single event loop: no lock needed between the read and the increment
            samples.append(await _one(client, path, body))
            progress.update(1)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: an HTTP(S)_PROXY in the environment must not route loopback traffic elsewhere.
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout_s, limits=limits, headers=headers, trust_env=False
    ) as client:
        started = time.perf_counter()
        try:
            await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        finally:
            progress.close()
        wall = time.perf_counter() - started
    return samples, wall


def summarize(samples: Sequence[Sample], wall_s: float, planned: int, concurrency: int) -> dict:
    """Flat report: counts, error classes, latency percentiles (ms), throughput."""
    ok = [s for s in samples if s.status == 200]
    latencies = np.array([s.seconds for s in samples]) * 1000.0
    report: dict = {
        "requests_planned": planned,
        "requests_sent": len(samples),
        "requests_ok": len(ok),
        "errors": len(samples) - len(ok),
        "concurrency": concurrency,
        "stopped_by_duration": int(len(samples) < planned),
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "tokens_generated": sum(s.tokens for s in ok),
        "tokens_per_s": round(sum(s.tokens for s in ok) / wall_s, 3) if wall_s > 0 else 0.0,
    }
    for q in (50, 95, 99):
        report[f"latency_ms_p{q}"] = round(float(np.percentile(latencies, q)), 3) if len(samples) else 0.0
    report["latency_ms_mean"] = round(float(latencies.mean()), 3) if len(samples) else 0.0
    report["latency_ms_max"] = round(float(latencies.max()), 3) if len(samples) else 0.0
    for status, n in sorted(Counter(s.status for s in samples if s.status != 200).items()):
        report[f"errors_status_{status}"] = n  # status 0 = no HTTP answer (timeout, refused)
    return report


def run_loadtest(
    url: str,
    tasks: Sequence[str],
    texts: Sequence[str],
    requests: int,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    token: str | None = None,
) -> dict:
    """Run a bounded load test against the service at `url` (loopback only) and return its report."""
    check_loopback(url)
    plan = request_plan(tasks, texts, requests)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    log.info("load test: %d requests, %d clients, cap %.0f s -> %s", requests, concurrency, duration_s, url)
    samples, wall = asyncio.run(drive(url, plan, concurrency, duration_s, timeout_s, headers))
    report = summarize(samples, wall, requests, concurrency)
    first_error = next((s for s in samples if s.status != 200), None)
    if first_error is not None:
        log.warning("first error: %s %s %s", first_error.endpoint, first_error.status, first_error.error)
    return report


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url`/readyz until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    log.info("waiting up to %.0f s for %s/readyz (the model loads first)", timeout_s, url)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode} before it was ready")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2.0, trust_env=False)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}"
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


@contextmanager
def spawned_service(
    command: Sequence[str], url: str, ready_timeout_s: float = 120.0, env=None, log_path=None
):
    """Run the service `command` as a subprocess, wait until `url` is ready, stop it afterwards."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(list(command), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, ready_timeout_s, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            out.close()
