"""Running the app: uvicorn with a shutdown that drains the engine, so SIGTERM ends in bounded time."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import uvicorn

from ..config.data import TaskSpec
from ..config.serve import ServeParams
from .app import create_app
from .engine import Engine

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown first stops accepting connections and drains the engine: open
    requests get `drain_s` seconds to finish and are then answered 503, so no handler is left waiting."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float):
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # no new connections while the open requests finish
            server.close()
        failed = await asyncio.to_thread(self.engine.drain, self.drain_s)
        log.info("drained the engine (%d open request(s) answered 503)", failed)
        await super().shutdown(sockets)


def run_server(
    params: ServeParams,
    tasks: dict[str, TaskSpec],
    model_dir: str | None = None,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
) -> None:
    """Load the model (failing fast on a bad directory), then serve with uvicorn until SIGINT/SIGTERM."""
    host, port = host or params.host, port or params.port
    engine = Engine.from_params(params, model_dir)
    engine.load()
    if not token and not is_loopback(host):
        log.warning(
            "serving on %s without authentication; set $%s to require a bearer token", host, params.token_env
        )
    log.info("auth %s; serving %s on http://%s:%d", "on" if token else "off", engine.model_dir, host, port)
    app = create_app(params, tasks, engine, token=token)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=params.log_level,
        access_log=params.log_level in ("info", "debug"),
        # after the drain, what is still open (a slow client reading a stream) gets 2 s more, then is cut
        timeout_graceful_shutdown=2,
    )
    DrainingServer(config, engine, params.shutdown_timeout_s).run()


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (where serving without a token is fine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
