"""Inference service (in-process, tiny DeepSeek-V3 model): endpoints, bad input, saturation, auth, metrics, load test."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from deepseek_sft.base_model import build_tiny, save_base
from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.config.model import TinyDeepseekParams, TinyTokenizerParams
from deepseek_sft.config.serve import ServeParams
from deepseek_sft.evaluate.generate import decode_answers, generate_batched
from deepseek_sft.io import DataError
from deepseek_sft.serve import loadtest
from deepseek_sft.serve.app import create_app
from deepseek_sft.serve.engine import Engine
from deepseek_sft.sft_data import encode_prompt

from conftest import REPO, edit_params

TEXTS = [
    "招商银行的信用卡丢了帮我挂失",
    "昨天给张伟转账5000元没到账",
    "工商银行理财产品怎么赎回",
    "我想申请房贷",
]
TOKEN = "s3cret-token-for-tests"


def tiny_train_records() -> list[dict]:
    """A few processed records, enough to train the tiny tokenizer."""
    return [
        {
            "id": f"r{i}",
            "text": text,
            "intent": "card_loss",
            "compliance": "compliant",
            "entities": [{"start": 0, "end": 4, "type": "ORG", "text": text[:4]}],
        }
        for i, text in enumerate(TEXTS * 4)
    ]


def build_tiny_model_dir(path, tasks) -> str:
    """Save a very small DeepSeek-V3 model + BPE tokenizer with chat template (as stage base_model does)."""
    params = TinyDeepseekParams(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_group=2,
        topk_group=1,
        max_position_embeddings=256,
        tokenizer=TinyTokenizerParams(vocab_size=400, min_frequency=1),
    )
    model, tokenizer = build_tiny(params, tiny_train_records(), tasks, seed=0)
    save_base(model, tokenizer, path)
    return str(path)


@pytest.fixture(scope="module")
def tasks():
    return load_section("serve", REPO / "params.yaml").tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tasks):
    torch.set_num_threads(1)
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", tasks)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(model_dir, num_threads=1, max_batch_size=8, batch_wait_ms=5.0)
    eng.load()
    yield eng
    eng.stop()


def make_client(engine, tasks, token=None, **overrides) -> TestClient:
    params = ServeParams(model_dir=str(engine.model_dir), **overrides)
    engine.max_batch_size = params.max_batch_size  # the shared engine follows each test's params
    engine.batch_wait_s = params.batch_wait_ms / 1000.0
    return TestClient(create_app(params, tasks, engine, token=token))


@pytest.fixture
def client(engine, tasks):
    with make_client(engine, tasks) as c:
        yield c


def metric_value(text: str, name: str, **labels) -> float:
    """A sample's value from the exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_str = sample.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_str))
        if metric == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


# ----- happy paths --------------------------------------------------------------------------------------


def test_task_endpoints_answer_in_the_task_format(client, tasks):
    for name, task in tasks.items():
        text = TEXTS[1]
        r = client.post(f"/v1/tasks/{name}", json={"text": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == name and body["type"] == task.type
        assert isinstance(body["parse_ok"], bool) and isinstance(body["raw"], str)
        assert 0 <= body["tokens"] <= getattr(ServeParams().max_new_tokens, task.type)
        assert body["finish_reason"] in ("stop", "length")
        if task.type == "classification":
            assert body["label"] is None or body["label"] in task.labels
            assert (body["label"] is not None) == body["parse_ok"]
        else:
            for span in body["entities"]:  # spans index into the request text
                assert text[span["start"] : span["end"]] == span["text"]


def test_task_answer_equals_the_evaluation_path(client, engine, tasks):
    """The service prompts and decodes exactly as evaluation does, so served answers are the evaluated ones."""
    task = tasks["intent"]
    ids = encode_prompt(engine.tokenizer, task, TEXTS[0])
    expected = decode_answers(
        engine.tokenizer, generate_batched(engine.model, engine.tokenizer, [ids], 8, 1)
    )[0]
    assert client.post("/v1/tasks/intent", json={"text": TEXTS[0]}).json()["raw"] == expected


def test_generate_and_openai_chat(client):
    r = client.post("/v1/generate", json={"prompt": "招商银行", "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] <= 5 and body["prompt_tokens"] > 0
    assert body["finish_reason"] == ("length" if body["tokens"] == 5 else "stop")

    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "whatever",
            "messages": [{"role": "user", "content": "你好"}],
            "max_tokens": 4,
            "top_p": 1,
        },
    )
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    usage = chat["usage"]
    assert usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "model"  # the directory's name, not its path
    assert chat["model"] == "model"


def test_concurrent_requests_are_batched_and_answered_correctly(engine, tasks):
    """8 simultaneous requests share generate calls; each gets the answer it would get alone."""
    with make_client(engine, tasks, batch_wait_ms=200.0) as c:
        alone = {t: c.post("/v1/tasks/compliance", json={"text": t}).json()["raw"] for t in TEXTS}
        before = metric_value(c.get("/metrics").text, "dsft_batch_size_count")
        results: dict[int, dict] = {}

        def call(i):
            results[i] = c.post("/v1/tasks/compliance", json={"text": TEXTS[i % 4]}).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    assert [results[i]["raw"] for i in range(8)] == [alone[TEXTS[i % 4]] for i in range(8)]
    assert metric_value(metrics, "dsft_batch_size_count") - before < 8  # fewer generate calls than requests


# ----- bad input ----------------------------------------------------------------------------------------

RAW = {"content-type": "application/json"}
CHAT_HI = [{"role": "user", "content": "hi"}]

# (id, path, request, status, code, message): every refusal is OpenAI's error shape with a code to branch on
BAD_INPUTS = [
    ("empty text", "/v1/tasks/intent", {"json": {"text": ""}}, 422, "empty_input", "text is empty"),
    ("blank text", "/v1/tasks/intent", {"json": {"text": "  \n "}}, 422, "empty_input", "text is empty"),
    ("oversized text", "/v1/tasks/intent", {"json": {"text": "银" * 2001}}, 413, "input_too_long", "limit is 2000"),
    ("oversized body", "/v1/tasks/intent", {"json": {"text": "a" * 70000}}, 413, "body_too_large", "serve.max_body_bytes"),
    ("invalid JSON", "/v1/tasks/intent", {"content": b'{"text": ', "headers": RAW}, 400, "invalid_json", "not valid JSON"),
    ("not an object", "/v1/tasks/intent", {"json": ["text"]}, 422, "invalid_body", "must be a JSON object"),
    ("not JSON at all", "/v1/tasks/intent", {"content": b"text=hi", "headers": {"content-type": "text/plain"}}, 422, "invalid_body", "must be a JSON object"),
    ("missing field", "/v1/tasks/intent", {"json": {"txt": "hi"}}, 422, "invalid_request", "text: Field required"),
    ("wrong type", "/v1/tasks/intent", {"json": {"text": 5}}, 422, "invalid_request", "text: Input should be a valid string"),
    ("unknown task", "/v1/tasks/sentiment", {"json": {"text": "hi"}}, 404, "unknown_task", "unknown task 'sentiment'; known tasks: intent"),
    ("too many new tokens", "/v1/generate", {"json": {"prompt": "hi", "max_new_tokens": 100000}}, 422, "max_tokens_exceeded", "exceeds the limit of 256"),
    ("zero new tokens", "/v1/generate", {"json": {"prompt": "hi", "max_new_tokens": 0}}, 422, "invalid_request", "max_new_tokens"),
    ("chat too many tokens", "/v1/chat/completions", {"json": {"messages": CHAT_HI, "max_tokens": 9999}}, 422, "max_tokens_exceeded", "max_tokens=9999 exceeds the limit"),
    ("chat no messages", "/v1/chat/completions", {"json": {"messages": []}}, 422, "invalid_request", "messages"),
    ("chat bad role", "/v1/chat/completions", {"json": {"messages": [{"role": "robot", "content": "x"}]}}, 422, "invalid_request", "role"),
    ("chat n=2", "/v1/chat/completions", {"json": {"messages": CHAT_HI, "n": 2}}, 400, "unsupported", "n=2 is not supported"),
    ("chat stop", "/v1/chat/completions", {"json": {"messages": CHAT_HI, "stop": ["。"]}}, 400, "unsupported", "stop sequences are not supported"),
    ("prompt beyond context", "/v1/generate", {"json": {"prompt": "转账失败" * 400, "max_new_tokens": 8}}, 422, "context_length_exceeded", "context window of 256 tokens"),
    ("unknown route", "/v1/nothing", {"json": {}}, 404, "not_found", "no endpoint POST /v1/nothing"),
    # issue 15.2: a lone surrogate reached the tokenizer (TypeError: 500 or a reset connection)
    ("lone surrogate text", "/v1/tasks/entities", {"content": b'{"text": "\\ud800"}', "headers": RAW}, 422, "invalid_request", "text: Value error, holds a lone surrogate (U+D800 at character 0)"),
    ("lone surrogate prompt", "/v1/generate", {"content": b'{"prompt": "ab\\udfff"}', "headers": RAW}, 422, "invalid_request", "prompt: Value error, holds a lone surrogate (U+DFFF at character 2)"),
    ("lone surrogate chat", "/v1/chat/completions", {"content": b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "headers": RAW}, 422, "invalid_request", "lone surrogate"),
    ("lone surrogate in path", "/v1/tasks/%ED%A0%80", {"json": {"text": "hi"}}, 404, "unknown_task", "unknown task"),
    # issue 15.3: strict types, no coercion
    ("tokens as string", "/v1/generate", {"json": {"prompt": "hi", "max_new_tokens": "5"}}, 422, "invalid_request", "max_new_tokens: Input should be a valid integer"),
    ("tokens as bool", "/v1/generate", {"json": {"prompt": "hi", "max_new_tokens": True}}, 422, "invalid_request", "max_new_tokens: Input should be a valid integer"),
    ("tokens as float", "/v1/generate", {"json": {"prompt": "hi", "max_new_tokens": 5.0}}, 422, "invalid_request", "max_new_tokens: Input should be a valid integer"),
    ("chat stream as int", "/v1/chat/completions", {"json": {"messages": CHAT_HI, "stream": 1}}, 422, "invalid_request", "stream: Input should be a valid boolean"),
    ("chat max_tokens as string", "/v1/chat/completions", {"json": {"messages": CHAT_HI, "max_tokens": "4"}}, 422, "invalid_request", "max_tokens: Input should be a valid integer"),
    ("completion prompt as number", "/v1/completions", {"json": {"prompt": 5}}, 422, "invalid_request", "prompt: Input should be a valid string"),
    ("unknown field", "/v1/generate", {"json": {"prompt": "hi", "max_tokens": 5}}, 422, "invalid_request", "max_tokens: Extra inputs are not permitted"),
    # issue 15.1: the task's own markup in its input text
    ("tag tokens in text", "/v1/tasks/entities", {"json": {"text": "给⟨PER⟩张⟨+⟩三"}}, 422, "reserved_characters", "text holds '⟨' (U+27E8) at character 1"),
    ("tag character alone", "/v1/tasks/entities", {"json": {"text": "转账⟩"}}, 422, "reserved_characters", "markup characters ⟨ ⟩"),
]  # fmt: skip


def error_of(response) -> dict:
    """The error object of a response, checked to be OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["code"]
    expected_type = "server_error" if response.status_code >= 500 else "invalid_request_error"
    special = {401: "authentication_error", 404: "not_found_error"}
    assert error["type"] == special.get(response.status_code, expected_type), error
    return error


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code", "message"),
    [b[1:] for b in BAD_INPUTS],
    ids=[b[0] for b in BAD_INPUTS],
)
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_answering(
    client, path, kwargs, status, code, message
):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["code"] == code and message in error["message"], error
    ok = client.post("/v1/tasks/intent", json={"text": TEXTS[0]})
    assert ok.status_code == 200
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "dsft_requests_total", status=str(status)) >= 1
    assert not [line for line in metrics.splitlines() if re.match(r'dsft_requests_total\{.*status="5', line)]


def test_oversized_chunked_body_is_413_while_streaming(client):
    chunks = iter([b'{"text": "', b"a" * 70000, b'"}'])  # no Content-Length: counted as it arrives
    r = client.post("/v1/tasks/intent", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than 65536 bytes" in error_of(r)["message"]
    assert client.post("/v1/tasks/intent", json={"text": TEXTS[0]}).status_code == 200


def test_wrong_method_is_405_with_the_allowed_one(client):
    r = client.get("/v1/tasks/intent")
    assert r.status_code == 405 and "allowed: POST" in error_of(r)["message"]


def test_unloadable_model_dir_is_not_ready_but_alive(tmp_path, tasks):
    params = ServeParams(model_dir=str(tmp_path / "missing"))
    with TestClient(create_app(params, tasks)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        for _ in range(50):  # the background loader fails fast
            r = c.get("/readyz")
            if "no config.json" in r.text:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "no config.json" in error_of(r)["message"]
        r = c.post("/v1/tasks/intent", json={"text": "hi"})
        assert r.status_code == 503 and "model not ready" in error_of(r)["message"]
        assert metric_value(c.get("/metrics").text, "dsft_model_ready") == 0.0


# ----- saturation ---------------------------------------------------------------------------------------


def _hold_generation(engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the engine block inside generation until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    original = engine._generate_group

    def held(group, budget, *args):
        entered.set()
        release.wait(10)
        original(group, budget, *args)

    monkeypatch.setattr(engine, "_generate_group", held)
    return entered, release


@pytest.mark.parametrize("queue_timeout_s", [0.0, 0.3])
def test_saturated_service_answers_503_then_recovers(engine, tasks, monkeypatch, queue_timeout_s):
    entered, release = _hold_generation(engine, monkeypatch)
    with make_client(
        engine, tasks, max_batch_size=1, max_concurrency=1, queue_timeout_s=queue_timeout_s
    ) as c:
        first: dict = {}
        holder = threading.Thread(
            target=lambda: first.update(r=c.post("/v1/tasks/intent", json={"text": TEXTS[0]}))
        )
        holder.start()
        assert entered.wait(10)
        started = time.perf_counter()
        r = c.post("/v1/tasks/intent", json={"text": TEXTS[1]})
        waited = time.perf_counter() - started
        release.set()
        holder.join(10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "serve.max_concurrency" in error_of(r)["message"]
        assert waited >= queue_timeout_s
        assert first["r"].status_code == 200
        assert c.post("/v1/tasks/intent", json={"text": TEXTS[1]}).status_code == 200
        metrics = c.get("/metrics").text
    assert metric_value(metrics, "dsft_rejected_requests_total", reason="saturated") == 1
    assert metric_value(metrics, "dsft_requests_total", endpoint="/v1/tasks/intent", status="503") == 1


# ----- auth ---------------------------------------------------------------------------------------------


def test_bearer_auth_guards_the_api_but_not_probes_or_metrics(engine, tasks, caplog):
    caplog.set_level("DEBUG")
    with make_client(engine, tasks, token=TOKEN) as c:
        for headers, why in [
            ({}, "missing bearer token"),
            ({"Authorization": "Bearer nope"}, "invalid bearer token"),
        ]:
            r = c.post("/v1/tasks/intent", json={"text": TEXTS[0]}, headers=headers)
            assert r.status_code == 401 and why in error_of(r)["message"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/docs").status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200
        good = c.post(
            "/v1/tasks/intent", json={"text": TEXTS[0]}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert good.status_code == 200
        metrics = c.get("/metrics").text
    assert metric_value(metrics, "dsft_requests_total", endpoint="/v1/tasks/intent", status="401") == 2
    assert TOKEN not in caplog.text and TOKEN not in metrics and TOKEN not in good.text


def test_auth_is_off_without_a_token(client):
    assert client.post("/v1/tasks/intent", json={"text": TEXTS[0]}).status_code == 200


def test_token_comes_from_the_named_env_var():
    from deepseek_sft.serve.auth import token_from_env

    assert token_from_env("DSFT_SERVE_TOKEN", {"DSFT_SERVE_TOKEN": " abc "}) == "abc"
    assert token_from_env("DSFT_SERVE_TOKEN", {"DSFT_SERVE_TOKEN": ""}) is None
    assert token_from_env("DSFT_SERVE_TOKEN", {}) is None


# ----- metrics ------------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_describe_the_model(engine, tasks, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    with make_client(engine, tasks) as c:
        tokens = sum(c.post("/v1/tasks/entities", json={"text": t}).json()["tokens"] for t in TEXTS)
        c.post("/v1/tasks/entities", json={"text": ""})
        text = c.get("/metrics").text
    ep = "/v1/tasks/entities"
    assert metric_value(text, "dsft_requests_total", endpoint=ep, status="200") == 4
    assert metric_value(text, "dsft_requests_total", endpoint=ep, status="422") == 1
    assert metric_value(text, "dsft_request_duration_seconds_count", endpoint=ep) == 5
    assert metric_value(text, "dsft_request_duration_seconds_bucket", endpoint=ep, le="+Inf") == 5
    assert metric_value(text, "dsft_generated_tokens_total", endpoint=ep) == tokens > 0
    assert metric_value(text, "dsft_time_per_output_token_seconds_count", endpoint=ep) == 4
    assert metric_value(text, "dsft_requests_in_flight", endpoint=ep) == 0
    assert metric_value(text, "dsft_model_ready") == 1
    info = next(line for line in text.splitlines() if line.startswith("dsft_model_info{"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    assert labels["model_name"] == "model" and labels["model_type"] == "deepseek_v3"
    assert str(engine.model_dir.parent) not in text  # issue 15.5: the host's paths stay private
    assert labels["dvc_exp"] == "exp-test"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["git_commit"])


# ----- params and load test helpers ---------------------------------------------------------------------


def test_serve_params_reject_bad_values(params_copy):
    assert load_section("serve").section.host == "127.0.0.1"
    edit_params(params_copy, {"serve.default_new_tokens": 500})
    with pytest.raises(ParamsError, match="default_new_tokens=500 > max_new_tokens_limit=256"):
        load_section("serve")
    edit_params(params_copy, {"serve.default_new_tokens": 64, "serve.port": "8000"})
    with pytest.raises(ParamsError, match=r"serve\.port"):
        load_section("serve")
    edit_params(params_copy, {"serve.port": 8000, "serve.max_concurrency": 2})
    with pytest.raises(ParamsError, match="max_concurrency=2 < max_batch_size=8"):
        load_section("serve")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.0.0.5:80"]
)
def test_loadtest_accepts_loopback(url):
    loadtest.check_loopback(url)


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8000", "http://0.0.0.0:8000", "http://8.8.8.8", "ftp://127.0.0.1"]
)
def test_loadtest_refuses_anything_but_loopback(url):
    with pytest.raises(loadtest.NotLoopback):
        loadtest.check_loopback(url)


def test_loadtest_script_refuses_a_remote_url_before_any_request(params_copy, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loadtest_script", REPO / "scripts" / "loadtest.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    edit_params(params_copy, {"serve.loadtest.texts_path": None})
    out = tmp_path / "lt.json"
    assert script.main(["--url", "http://192.0.2.1:8000", "--out", str(out)]) == 2
    assert "non-loopback" in capsys.readouterr().err and not out.exists()


def test_loadtest_summary_and_texts(tmp_path):
    samples = [loadtest.Sample("/v1/tasks/intent", 200, s / 1000, 3) for s in range(1, 101)]
    samples.append(loadtest.Sample("/v1/tasks/intent", 503, 0.001, 0, "busy"))
    report = loadtest.summarize(samples, wall_s=2.0, planned=120, concurrency=8)
    assert report["requests_sent"] == 101 and report["requests_ok"] == 100 and report["errors"] == 1
    assert report["errors_status_503"] == 1 and report["stopped_by_duration"] == 1
    assert report["throughput_rps"] == 50.0 and report["tokens_generated"] == 300
    assert 49.0 <= report["latency_ms_p50"] <= 51.0 and 94.0 <= report["latency_ms_p95"] <= 96.0
    assert loadtest.request_plan(["a", "b"], ["x"], 3) == [
        ("/v1/tasks/a", {"text": "x"}),
        ("/v1/tasks/b", {"text": "x"}),
        ("/v1/tasks/a", {"text": "x"}),
    ]
    assert loadtest.load_texts(None) == list(loadtest.EXAMPLE_TEXTS)
    with pytest.raises(DataError, match="no such file"):
        loadtest.load_texts(tmp_path / "missing.jsonl")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "转账"}) + "\n" + json.dumps({"text": " "}) + "\n", encoding="utf-8")
    assert loadtest.load_texts(path) == ["转账"]
