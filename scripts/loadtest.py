"""Bounded load test of the inference service (loopback only): p50/p95/p99 latency, throughput, errors.

`make loadtest` runs it against a running `make serve`; with --spawn it starts its own service on a free
loopback port, waits until the model is loaded, runs the load and stops the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.io import DataError, write_metrics
from deepseek_sft.serve.auth import token_from_env
from deepseek_sft.serve.loadtest import (
    NotLoopback,
    check_loopback,
    free_port,
    load_texts,
    run_loadtest,
    spawned_service,
    wait_ready,
)

SERVE_SCRIPT = Path(__file__).with_name("serve.py")


def main(argv: list[str] | None = None) -> int:
    """Parse paths and overrides, load params section `serve`, run the load test and write its report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="reports/serve/loadtest.json", help="report JSON")
    parser.add_argument("--url", help="service base URL (default: http://serve.host:serve.port)")
    parser.add_argument("--spawn", action="store_true", help="start a service for the test and stop it after")
    parser.add_argument("--model-dir", help="with --spawn: model directory (default: serve.model_dir)")
    parser.add_argument("--requests", type=int, help="override serve.loadtest.requests")
    parser.add_argument("--concurrency", type=int, help="override serve.loadtest.concurrency")
    parser.add_argument("--texts", help="override serve.loadtest.texts_path (JSONL with a 'text' field)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the summary
    try:
        stage = load_section("serve")
        section, load = stage.section, stage.section.loadtest
        texts = load_texts(args.texts or load.texts_path)
    except (ParamsError, DataError) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 1
    tasks = load.tasks or list(stage.tasks)
    token = token_from_env(section.token_env, os.environ)
    requests = args.requests or load.requests
    concurrency = args.concurrency or load.concurrency
    port = free_port() if args.spawn else section.port
    url = args.url or f"http://{'127.0.0.1' if args.spawn else section.host}:{port}"

    def run() -> dict:
        return run_loadtest(url, tasks, texts, requests, concurrency, load.duration_s, load.timeout_s, token)

    try:
        check_loopback(url)  # before any request, including the readiness probe
        if args.spawn:
            command = [sys.executable, str(SERVE_SCRIPT), "--host", "127.0.0.1", "--port", str(port)]
            command += ["--model-dir", args.model_dir] if args.model_dir else []
            with spawned_service(command, url):
                report = run()
        else:
            wait_ready(url, 5.0)
            report = run()
    except NotLoopback as e:
        print(f"loadtest: refused: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as e:
        hint = "" if args.spawn else "; start it with `make serve` or pass --spawn"
        print(f"loadtest: error: {e}{hint}", file=sys.stderr)
        return 1
    write_metrics(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
