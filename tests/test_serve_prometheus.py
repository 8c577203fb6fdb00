"""The service under a bounded load, scraped by a real Prometheus server; monitoring/ configs checked by promtool.

Nothing here is skipped: a missing `prometheus`/`promtool` (Debian package `prometheus`, installed by .ci/run)
is a failure with the install command in the message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deepseek_sft.config import load_section
from deepseek_sft.serve.loadtest import free_port, spawned_service
from deepseek_sft.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, TOKEN_BUCKETS
from test_serve import build_tiny_model_dir

from conftest import REPO

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "deepseek-sft-serve.json"
REQUESTS = 48  # 16 per task endpoint
CONCURRENCY = 8


def require_binary(name: str) -> str:
    """The path of a Prometheus binary, or a test failure saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` not found on PATH: install Debian's Prometheus with `apt-get install -y prometheus`"
        )
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args[:2], str(MONITORING / args[2]))
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_the_series_they_watch():
    """promtool's rule unit tests: each alert fires after its `for:` on bad series, none on healthy ones."""
    result = promtool("test", "rules", str(MONITORING / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


HISTOGRAM_BUCKETS = {
    "dsft_request_duration_seconds_bucket": LATENCY_BUCKETS,
    "dsft_time_per_output_token_seconds_bucket": TOKEN_BUCKETS,
    "dsft_batch_size_bucket": BATCH_BUCKETS,
}


def test_every_quantile_alert_threshold_is_a_bucket_boundary():
    """Issue 15.4: a threshold inside a bucket fires or not depending on histogram_quantile's interpolation
    (2 s inside (1, 2.5]: client p95 2.04 s, Prometheus 2.34 s). On a boundary it is exact."""
    checked = 0
    for group in yaml.safe_load((MONITORING / "alerts.yml").read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            if "histogram_quantile" not in expr:
                continue
            metric = re.search(r"\b(dsft_\w+_bucket)\b", expr).group(1)
            threshold = float(re.search(r"\)\s*>\s*([0-9.eE+-]+)\s*$", expr.strip()).group(1))
            assert threshold in HISTOGRAM_BUCKETS[metric], (
                f"alerts.yml {rule['alert']}: threshold {threshold} is not a bucket boundary of {metric} "
                f"{HISTOGRAM_BUCKETS[metric]} (serve/metrics.py)"
            )
            checked += 1
    assert checked >= 1  # the p95 latency alert at least


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


# ----- the integration: service + load + Prometheus -----------------------------------------------------


def expressions() -> dict[str, str]:
    """Every PromQL expression of the alert rules and the dashboard, by where it comes from."""
    out = {}
    for group in yaml.safe_load((MONITORING / "alerts.yml").read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            out[f"alerts.yml:{rule['alert']}"] = rule["expr"]
    for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]:
        for target in panel["targets"]:
            out[f"dashboard:{panel['title']}:{target['refId']}"] = target["expr"]
    return out


def prometheus_config(service_port: int) -> dict:
    """monitoring/prometheus.yml pointed at the test service, scraping every second."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A served tiny model and a Prometheus scraping it, both on free loopback ports; stopped afterwards."""
    prometheus = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("stack")
    params_path = tmp / "params.yaml"
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    tasks = load_section("serve", REPO / "params.yaml").tasks
    model_dir = build_tiny_model_dir(tmp / "model", tasks)
    params["serve"] |= {"model_dir": model_dir, "num_threads": 1, "log_level": "warning"}
    params["serve"]["loadtest"] |= {"texts_path": None, "requests": REQUESTS, "concurrency": CONCURRENCY}
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")

    service_port, prom_port = free_port(), free_port()
    service_url, prom_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prom_port}"
    env = {**os.environ, "DSFT_PARAMS": str(params_path), "DVC_EXP_NAME": "exp-prom"}
    env.pop("DSFT_SERVE_TOKEN", None)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(service_port)), encoding="utf-8")
    prom_cmd = [
        prometheus,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    serve_cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(service_port)]
    with open(tmp / "prometheus.log", "wb") as prom_log:
        prom = subprocess.Popen(prom_cmd, stdout=prom_log, stderr=subprocess.STDOUT)
        try:
            with spawned_service(serve_cmd, service_url, 120, env=env, log_path=tmp / "serve.log"):
                wait_prometheus(prom_url, prom)
                yield {
                    "service": service_url,
                    "prometheus": prom_url,
                    "tmp": tmp,
                    "env": env,
                    "model_dir": model_dir,
                }
        finally:
            prom.terminate()
            prom.wait(15)


def wait_prometheus(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited with code {process.returncode}"
        try:
            if httpx.get(f"{url}/-/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus at {url} not ready after {timeout_s} s")


def query(prom_url: str, expr: str) -> list[dict]:
    """Result vector of an instant PromQL query through Prometheus' HTTP API."""
    response = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=5, trust_env=False)
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_value(prom_url: str, expr: str, expected: float, timeout_s: float = 20.0) -> float:
    """Poll until `expr` (a single series) equals `expected` (the next scrapes catch up) or time runs out."""
    deadline, value = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        result = query(prom_url, expr)
        value = float(result[0]["value"][1]) if result else None
        if value == expected:
            return value
        time.sleep(0.5)
    pytest.fail(f"{expr} = {value}, expected {expected} within {timeout_s} s")


@pytest.mark.slow
def test_load_is_counted_by_prometheus(stack):
    """8 concurrent clients, zero errors; Prometheus sees exactly the requests sent."""
    out = stack["tmp"] / "loadtest.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "loadtest.py"), "--url", stack["service"], "--out", str(out)],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    print(
        f"\nload test: {report['requests_ok']}/{report['requests_sent']} ok, {CONCURRENCY} clients, "
        f"p50 {report['latency_ms_p50']} ms, p95 {report['latency_ms_p95']} ms, p99 {report['latency_ms_p99']} ms, "
        f"{report['throughput_rps']} req/s, {report['tokens_per_s']} tokens/s"
    )
    assert report["requests_sent"] == REQUESTS and report["errors"] == 0 and report["requests_ok"] == REQUESTS
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p95"] <= report["latency_ms_p99"]

    prom = stack["prometheus"]
    api = 'endpoint=~"/v1/tasks/.+"'
    wait_for_value(prom, f"sum(dsft_requests_total{{{api}}})", REQUESTS)
    wait_for_value(prom, f"sum(dsft_request_duration_seconds_count{{{api}}})", REQUESTS)
    assert query(prom, f'sum(dsft_requests_total{{{api}, status!="200"}})') == []
    per_task = {
        r["metric"]["endpoint"]: float(r["value"][1])
        for r in query(prom, f"sum by (endpoint) (dsft_requests_total{{{api}}})")
    }
    assert per_task == {f"/v1/tasks/{t}": REQUESTS / 3 for t in ("intent", "compliance", "entities")}
    tokens = float(query(prom, f"sum(dsft_generated_tokens_total{{{api}}})")[0]["value"][1])
    assert tokens == report["tokens_generated"]
    p95 = float(
        query(
            prom,
            f"histogram_quantile(0.95, sum by (le) (rate(dsft_request_duration_seconds_bucket{{{api}}}[1m])))",
        )[0]["value"][1]
    )
    print(f"prometheus: p95 latency from the histogram {p95 * 1000:.0f} ms (bucket-interpolated)")
    assert 0 < p95 <= 60

    info = query(prom, "dsft_model_info")[0]["metric"]
    assert info["model_name"] == "model" and info["dvc_exp"] == "exp-prom"  # the name, never the path
    assert "model_dir" not in info and not any(stack["model_dir"] in v for v in info.values())
    assert query(prom, 'up{job="deepseek-sft-serve"}')[0]["value"][1] == "1"


JUNK = [  # (body bytes, endpoint): each a client's mistake, each must be a 4xx
    (b'{"text": "\\ud800"}', "/v1/tasks/entities"),
    (b'{"prompt": "\\udfff", "max_new_tokens": 4}', "/v1/generate"),
    ('{"text": "给⟨PER⟩张⟨+⟩三"}'.encode(), "/v1/tasks/entities"),
    (b'{"prompt": "hi", "max_new_tokens": "5"}', "/v1/generate"),
    (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "/v1/chat/completions"),
]


@pytest.mark.slow
def test_junk_is_4xx_and_the_error_panels_show_zero(stack):
    """Issue 15.2/15.4: junk never counts as 5xx (so it cannot fire DsftServeHighErrorRate), and the error
    panels read 0 on a healthy service instead of "No data" (no 5xx series exists)."""
    for body, path in JUNK * 4:
        response = httpx.post(
            f"{stack['service']}{path}",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
            trust_env=False,
        )
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert response.json()["error"]["code"], response.text
    prom = stack["prometheus"]
    wait_for_value(prom, 'sum(dsft_requests_total{status=~"4.."})', 4 * len(JUNK), timeout_s=30)
    assert query(prom, 'sum(dsft_requests_total{status=~"5.."})') == []
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]}
    for title in ("5xx error rate (API)", "Error rate (share of API requests)"):
        for target in panels[title]["targets"]:
            result = query(prom, target["expr"])
            assert len(result) == 1, (title, target["expr"], result)  # a value, not "No data"
            if "5.." in target["expr"]:
                assert float(result[0]["value"][1]) == 0.0, (title, result)
    assert query(prom, "dsft_engine_stuck_requests")[0]["value"][1] == "0"
    assert query(prom, "dsft_engine_worker_up")[0]["value"][1] == "1"


@pytest.mark.slow
def test_prometheus_loaded_the_alert_rules(stack):
    groups = httpx.get(f"{stack['prometheus']}/api/v1/rules", timeout=5, trust_env=False).json()["data"][
        "groups"
    ]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {
        "DsftServeDown",
        "DsftServeModelNotReady",
        "DsftServeEngineStuck",
        "DsftServeWorkerDown",
        "DsftServeHighP95Latency",
        "DsftServeHighErrorRate",
    }
    assert all(r["health"] in ("ok", "unknown") for r in rules.values()), rules


@pytest.mark.slow
def test_every_metric_in_the_dashboard_and_rules_is_exported(stack):
    """No panel or alert watches a series the service does not export (a typo would silently show nothing)."""
    httpx.post(f"{stack['service']}/v1/tasks/intent", json={"text": "挂失"}, timeout=30, trust_env=False)
    exported = set()
    for line in httpx.get(f"{stack['service']}/metrics", timeout=5, trust_env=False).text.splitlines():
        if line and not line.startswith("#"):
            exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    used = {
        name: where
        for where, expr in expressions().items()
        for name in re.findall(r"\bdsft_[a-z0-9_]+", expr)
    }
    assert used, "no dsft_ metric found in the dashboard or the rules"
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"referenced but not exported: {missing}"
    for where, expr in expressions().items():  # and the real server parses and evaluates every expression
        response = httpx.get(
            f"{stack['prometheus']}/api/v1/query", params={"query": expr}, timeout=5, trust_env=False
        )
        assert response.json()["status"] == "success", (where, response.text)


def test_monitoring_readme_names_the_files_it_uses():
    readme = (MONITORING / "README.md").read_text(encoding="utf-8")
    for path in (
        "prometheus.yml",
        "alerts.yml",
        "alerts_test.yml",
        DASHBOARD.name,
        "make serve",
        "make loadtest",
    ):
        assert path in readme, path
    assert Path(MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").is_file()
