"""fetch.source: llm — against a loopback server that speaks the chat-completions API.

Each (label, index) request gets a scripted behaviour: good replies (with and without offsets, in a
```json fence), a 429 with Retry-After, a timeout, malformed JSON, schema violations, wrong or
overlapping spans, a broken API envelope and a 503 that never recovers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.fetch import llm
from deepseek_sft.fetch.llm_client import AuthError, TokenBucket

from conftest import edit_params

KEY = "sk-test-SECRET-4242"
TEXT = "我在招商银行的卡丢了，帮我挂失"


def reply(obj_or_text) -> dict:
    content = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, ensure_ascii=False)
    return {
        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50},
    }


GOOD = {"text": TEXT, "entities": [{"text": "招商银行", "type": "ORG", "start": 2, "end": 6}]}
# (label, index) -> list of behaviours, one per attempt (the last one repeats)
SCRIPT = {
    ("card_loss", 0): [("ok", GOOD)],
    ("card_loss", 1): [("ok", {"text": "张伟的卡丢了", "entities": [{"text": "张伟", "type": "PER"}]})],
    ("card_loss", 2): [("status", 429), ("ok", {"text": "卡不见了，帮我锁住", "entities": []})],
    ("card_loss", 3): [("sleep", 2.5), ("ok", {"text": "钱包丢了，卡也丢了", "entities": []})],
    ("card_loss", 4): [("ok", "这不是JSON")],
    ("card_loss", 5): [("ok", {"text": TEXT, "entities": [{"text": "工商银行", "type": "ORG"}]})],
    ("transfer", 0): [("ok", {"text": TEXT, "entities": [{"text": "招商银行", "type": "BANK"}]})],
    ("transfer", 1): [("status", 503)],
    ("transfer", 2): [("ok", "```json\n" + json.dumps({"text": "给李雷转五百元", "entities": []}) + "\n```")],
    ("transfer", 3): [
        ("ok", {"text": TEXT, "entities": [{"text": "招商银行", "type": "ORG", "start": 0, "end": 4}]})
    ],
    ("transfer", 4): [
        ("envelope", {"error": "no choices", "usage": {"prompt_tokens": 100, "completion_tokens": 50}})
    ],
    ("transfer", 5): [
        (
            "ok",
            {
                "text": TEXT,
                "entities": [{"text": "招商银行", "type": "ORG"}, {"text": "招商", "type": "ORG"}],
            },
        )
    ],
}
PROMPT_RE = re.compile(r"生成一条(\w+)类客户请求，编号(\d+)")


class Api:
    """A chat-completions server on 127.0.0.1 that plays SCRIPT and records what it saw."""

    def __init__(self):
        self.calls: list[tuple[tuple[str, int], float]] = []
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.startswith("/unauthorized/"):
                    return self.send(401, {"error": "bad key"})
                m = PROMPT_RE.search(body["messages"][-1]["content"])
                job = (m.group(1), int(m.group(2)))
                with api.lock:
                    api.calls.append((job, time.monotonic()))
                    api.auth.add(self.headers.get("Authorization", ""))
                    api.bodies.append(body)
                    attempt = sum(j == job for j, _ in api.calls) - 1
                    api.in_flight += 1
                    api.max_in_flight = max(api.max_in_flight, api.in_flight)
                try:
                    steps = SCRIPT[job]
                    kind, arg = steps[min(attempt, len(steps) - 1)]
                    if kind == "sleep":
                        time.sleep(arg)  # longer than the client timeout
                        return self.send(200, reply(GOOD))
                    if kind == "status":
                        return self.send(arg, {"error": "busy"}, {"Retry-After": "0.4"} if arg == 429 else {})
                    return self.send(200, arg if kind == "envelope" else reply(arg))
                finally:
                    with api.lock:
                        api.in_flight -= 1

            def send(self, code, obj, headers=None):
                data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"

    def times(self, job):
        return [t for j, t in self.calls if j == job]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def llm_updates(base_url: str, **overrides) -> dict:
    updates = {
        "fetch.source": "llm",
        "fetch.llm.base_url": base_url,
        "fetch.llm.prompts": {
            "card_loss": "生成一条{label}类客户请求，编号{index}。",
            "transfer": "生成一条{label}类客户请求，编号{index}。",
        },
        "fetch.llm.fixed_labels": {"compliance": "compliant"},
        "fetch.llm.records_per_label": 6,
        "fetch.llm.concurrency": 2,
        "fetch.llm.requests_per_second": 100.0,
        "fetch.llm.burst": 4,
        "fetch.llm.timeout": 1.0,
        "fetch.llm.max_retries": 2,
        "fetch.llm.backoff_base": 0.05,
        "fetch.llm.backoff_max": 2.0,
        "fetch.llm.price_per_1k_prompt_tokens": 1.0,
        "fetch.llm.price_per_1k_completion_tokens": 2.0,
        "fetch.llm.review_fraction": 0.4,
    }
    updates.update({f"fetch.llm.{k}": v for k, v in overrides.items()})
    return updates


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One generation run: (records, stats, side dir, api, captured log text)."""
    api = Api()
    tmp = tmp_path_factory.mktemp("llm")
    params_path = tmp / "params.yaml"
    params_path.write_text((__import__("conftest").REPO / "params.yaml").read_text(encoding="utf-8"))
    edit_params(params_path, llm_updates(f"{api.root}/v1"))
    stage = load_section("fetch", params_path)
    handler = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPSEEK_API_KEY", KEY)
    try:
        stats: dict = {}
        records = llm.fetch_records(stage, side_dir=tmp / "raw", stats=stats)
    finally:
        mp.undo()
        root.removeHandler(handler)
        root.setLevel(old_level)
        api.close()
    return records, stats, tmp / "raw", api, "\n".join(handler.lines)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_kept_records_follow_the_raw_contract(run):
    records, _, _, _, _ = run
    assert [r["id"] for r in records] == [
        "llm-card_loss-00000", "llm-card_loss-00001", "llm-card_loss-00002", "llm-card_loss-00003",
        "llm-transfer-00002",
    ]  # fmt: skip
    first = records[0]
    assert first["source"] == "llm" and first["text"] == TEXT
    assert first["annotations"] == {
        "llm": {
            "intent": "card_loss",
            "compliance": "compliant",
            "entities": [{"start": 2, "end": 6, "type": "ORG"}],
        }
    }
    located = records[1]["annotations"]["llm"]["entities"]
    assert located == [{"start": 0, "end": 2, "type": "PER"}]  # no offsets given: found in the text
    assert records[4]["text"] == "给李雷转五百元"  # the ```json fence was tolerated


def test_invalid_replies_go_to_rejects_with_reasons(run):
    _, stats, side, _, _ = run
    rejects = {r["id"]: r for r in read_lines(side / "llm_rejects.jsonl")}
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "llm-card_loss-00004": "invalid_json",
        "llm-card_loss-00005": "entity_not_in_text",
        "llm-transfer-00000": "schema",
        "llm-transfer-00001": "gave_up_http_503",
        "llm-transfer-00003": "span_mismatch",
        "llm-transfer-00004": "bad_api_response",
        "llm-transfer-00005": "overlapping_entities",
    }
    assert "entities/0/type" in rejects["llm-transfer-00000"]["detail"]
    assert rejects["llm-card_loss-00004"]["reply"] == "这不是JSON"
    assert stats["llm_kept"] + stats["llm_rejected"] == stats["llm_requests"] == 12
    assert stats["llm_rejected_schema"] == 1 and stats["llm_rejected_gave_up_http_503"] == 1


def test_429_waits_for_retry_after_and_timeouts_are_retried(run):
    _, stats, _, api, _ = run
    first, second = api.times(("card_loss", 2))
    assert second - first >= 0.4  # Retry-After: 0.4, not the 0.05 s backoff
    assert len(api.times(("card_loss", 3))) == 2  # timed out once, then answered
    assert len(api.times(("transfer", 1))) == 3  # 1 + max_retries, then given up
    assert stats["llm_retries"] == 1 + 1 + 2
    assert stats["llm_http_calls"] == len(api.calls) == 16


def test_concurrency_cap_and_request_body(run):
    _, _, _, api, _ = run
    assert api.max_in_flight <= 2
    body = api.bodies[0]
    assert body["model"] == "deepseek-chat" and body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system"
    assert "ORG、PER、MONEY、DATE、PRODUCT" in body["messages"][1]["content"]


def test_token_usage_and_cost(run):
    _, stats, _, _, _ = run
    # 11 replies with HTTP 200 carried usage (rejected ones are billed too); the timed-out call was not
    assert stats["llm_prompt_tokens"] == 1100 and stats["llm_completion_tokens"] == 550
    assert stats["llm_cost"] == pytest.approx(1.1 + 1.1)
    assert stats["llm_cost_per_kept_record"] == pytest.approx(2.2 / 5)


def test_review_queue_is_a_seeded_sample(run):
    records, stats, side, _, _ = run
    queue = read_lines(side / "llm_review_queue.jsonl")
    assert len(queue) == stats["llm_review_queue"] == 2  # ceil(0.4 * 5)
    ids = {r["id"] for r in records}
    assert all(q["id"] in ids and q["review"]["status"] == "pending" for q in queue)
    assert queue == llm.review_sample(records, 0.4, 42) and [q["id"] for q in queue] == sorted(
        q["id"] for q in queue
    )


def test_api_key_never_leaks(run):
    records, stats, side, api, log_text = run
    assert api.auth == {f"Bearer {KEY}"}  # it was sent, as a header
    assert "llm:" in log_text  # the run did log (retries)
    outputs = [log_text, json.dumps(records), json.dumps(stats)]
    outputs += [p.read_text(encoding="utf-8") for p in side.iterdir()]
    assert not any(KEY in text for text in outputs)


def test_unauthorized_stops_the_run(params_copy, monkeypatch):
    api = Api()
    try:
        edit_params(params_copy, llm_updates(f"{api.root}/unauthorized/v1", records_per_label=1))
        monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
        with pytest.raises(AuthError, match=r"HTTP 401; check the key in \$DEEPSEEK_API_KEY") as err:
            llm.fetch_records(load_section("fetch"), side_dir=params_copy.parent)
        assert KEY not in str(err.value)
    finally:
        api.close()


def test_missing_key_fails_before_any_request(params_copy, monkeypatch):
    edit_params(params_copy, llm_updates("http://127.0.0.1:9/v1"))
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(ParamsError, match=r"DEEPSEEK_API_KEY \(fetch\.llm\.api_key_env\) is not set"):
        llm.fetch_records(load_section("fetch"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"prompts": {"no_such_intent": "x"}},
            r"fetch\.llm\.prompts\.no_such_intent: label 'no_such_intent'",
        ),
        ({"prompts": {"card_loss": "生成{topic}"}}, r"fetch\.llm\.prompts\.card_loss: bad placeholder"),
        ({"fixed_labels": {"compliance": "maybe"}}, r"fetch\.llm\.fixed_labels\.compliance: label 'maybe'"),
        ({"prompts": {}}, r"fetch\.llm\.prompts"),
    ],
)
def test_bad_params_fail_before_any_request(params_copy, monkeypatch, overrides, message):
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    edit_params(params_copy, llm_updates("http://127.0.0.1:9/v1", **overrides))
    with pytest.raises(ParamsError, match=message):
        llm.fetch_records(load_section("fetch"))


def test_schema_refuses_a_key_in_params_shape(params_copy):
    edit_params(params_copy, {"fetch.llm.api_key_env": "sk-live-123"})
    with pytest.raises(ParamsError, match="not an environment variable name"):
        load_section("fetch")


def test_token_bucket_limits_the_rate():
    async def take(n):
        bucket = TokenBucket(rate=20.0, capacity=1)
        start = time.monotonic()
        for _ in range(n):
            await bucket.acquire()
        return time.monotonic() - start

    elapsed = asyncio.run(take(11))
    assert 0.45 <= elapsed < 1.5  # 10 waits of 1/20 s after the first token


def test_through_the_fetch_dispatcher(params_copy, monkeypatch, tmp_path):
    """fetch.fetch(params, side_dir) passes the side directory and keeps the source's own stats."""
    from deepseek_sft.fetch import fetch

    api = Api()
    try:
        prompts = {"card_loss": "生成一条{label}类客户请求，编号{index}。"}
        edit_params(params_copy, llm_updates(f"{api.root}/v1", prompts=prompts, records_per_label=1))
        monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
        records, stats = fetch(load_section("fetch"), side_dir=tmp_path / "side")
    finally:
        api.close()
    assert [r["id"] for r in records] == ["llm-card_loss-00000"] and stats["records"] == 1
    assert (tmp_path / "side" / "llm_rejects.jsonl").read_text() == ""
    assert len(read_lines(tmp_path / "side" / "llm_review_queue.jsonl")) == 1
    assert any(key.startswith("llm_") for key in stats)
