"""Serve a model directory over HTTP (FastAPI + uvicorn) with Prometheus metrics at /metrics.

`make serve` runs it; the model directory, host and port come from params `serve:` unless given here.
Bearer authentication is on when the env var named by serve.token_env (default DSFT_SERVE_TOKEN) is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deepseek_sft.config import ParamsError, load_section
from deepseek_sft.serve.auth import token_from_env
from deepseek_sft.serve.server import run_server


def main(argv: list[str] | None = None) -> int:
    """Parse overrides, load params section `serve`, load the model and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", help="model directory to serve (default: serve.model_dir)")
    parser.add_argument("--host", help="interface to bind (default: serve.host)")
    parser.add_argument("--port", type=int, help="TCP port (default: serve.port)")
    args = parser.parse_args(argv)
    try:
        stage = load_section("serve")
    except ParamsError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    section = stage.section
    logging.basicConfig(
        level=section.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = token_from_env(section.token_env, os.environ)
    try:
        run_server(section, stage.tasks, args.model_dir, args.host, args.port, token=token)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
