"""The FastAPI app: one JSON endpoint per task, raw generation, OpenAI-style chat, probes and /metrics.

Every error is JSON `{"error": "..."}` with a 4xx/5xx status; nothing a client sends can stop the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config.data import TaskSpec
from ..config.serve import ServeParams
from ..tasks import answer_budget, parse_response
from .auth import BearerAuthMiddleware
from .engine import Engine, Generation, NotReady, PromptTooLong
from .limits import Admission, BodyLimitMiddleware, Saturated
from .metrics import MetricsMiddleware, ServeMetrics, model_info_labels
from .schemas import ChatRequest, GenerateRequest, TaskRequest

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the service refuses, with the status code and the message the client sees."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape of the service."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """(status, message) of a FastAPI validation error: 400 for unparsable JSON, 422 for a wrong shape."""
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return 400, f"request body is not valid JSON{': ' + detail if detail else ''}"
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if not loc:  # the body itself is wrong: not an object, or not sent as JSON
            return (
                422,
                'request body must be a JSON object (Content-Type: application/json), e.g. {"text": "..."}',
            )
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return 422, "invalid request: " + "; ".join(parts)


class Service:
    """The request logic behind the routes: input checks, admission, generation, metrics."""

    def __init__(
        self, params: ServeParams, tasks: dict[str, TaskSpec], engine: Engine, metrics: ServeMetrics
    ):
        self.params = params
        self.tasks = tasks
        self.engine = engine
        self.metrics = metrics
        self.admission: Admission | None = None  # created in the serving loop (lifespan)
        self._info_set = False

    def check_text(self, text: str, what: str) -> None:
        """Refuse empty and oversized input (422 / 413)."""
        if not text.strip():
            raise ApiError(422, f"{what} is empty; send non-blank text")
        if len(text) > self.params.max_text_chars:
            raise ApiError(
                413,
                f"{what} is {len(text)} characters; the limit is {self.params.max_text_chars} (serve.max_text_chars)",
            )

    def budget(self, requested: int | None) -> int:
        """New-token budget of a free-form request, refusing more than serve.max_new_tokens_limit (422)."""
        if requested is None:
            return self.params.default_new_tokens
        if requested > self.params.max_new_tokens_limit:
            raise ApiError(
                422,
                f"max_new_tokens={requested} exceeds the limit of {self.params.max_new_tokens_limit} "
                "(serve.max_new_tokens_limit)",
            )
        return requested

    async def generate(self, endpoint: str, encode, budget: int, constraint=None) -> Generation:
        """Encode, check the context window, wait for an admission slot and generate (under `constraint`,
        if any); record token metrics."""
        try:
            ids = encode()
            self.engine.check_length(ids, budget)
        except PromptTooLong as e:
            raise ApiError(422, str(e)) from None
        if self.admission is None:
            raise NotReady("the service is starting")
        try:
            async with self.admission.slot():
                generation = await asyncio.wrap_future(self.engine.submit(ids, budget, constraint))
        except Saturated as e:
            self.metrics.rejected.labels("saturated").inc()
            raise ApiError(503, str(e)) from None
        self.metrics.observe_generation(
            endpoint, generation.prompt_tokens, len(generation.token_ids), generation.batch_seconds
        )
        return generation

    async def run_task(self, name: str, body: TaskRequest) -> dict:
        """Answer one task request: prompt, greedy answer, parsed result."""
        task = self.tasks[name]
        self.check_text(body.text, "text")
        configured = getattr(self.params.max_new_tokens, task.type)
        budget = answer_budget(task, configured, self.engine.count_tokens(body.text))
        constraint = (
            self.engine.task_constraint(task, body.text) if self.params.constrained_decoding else None
        )
        gen = await self.generate(
            f"/v1/tasks/{name}", lambda: self.engine.encode_task(task, body.text), budget, constraint
        )
        parsed = parse_response(task, gen.text, body.text)
        out: dict = {"task": name, "type": task.type}
        if task.type == "classification":
            out["label"] = parsed.value if parsed.ok else None
        elif task.type == "extraction":
            out["entities"] = parsed.spans
            out["items"] = [{"type": kind, "text": surface} for kind, surface in parsed.value]
        else:
            out["text"] = parsed.value
        out |= {"parse_ok": parsed.ok, "parse_error": parsed.error or None, "raw": gen.text}
        out |= {"tokens": len(gen.token_ids), "finish_reason": gen.finish_reason}
        return out

    def refresh_model_info(self) -> None:
        """Fill the model info metric once the model is loaded (its type is known only then)."""
        self.metrics.model_ready.set(1 if self.engine.ready else 0)
        if self.engine.ready and not self._info_set:
            self.metrics.model_info.info(model_info_labels(self.engine.model_dir, self.engine.model_type))
            self._info_set = True


def create_app(
    params: ServeParams,
    tasks: dict[str, TaskSpec],
    engine: Engine | None = None,
    token: str | None = None,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """The service app; `engine` defaults to one built from params (loaded in the background at startup).

    `token` turns bearer authentication on (scripts read it from the env var serve.token_env).
    """
    metrics = metrics or ServeMetrics()
    engine = engine or Engine.from_params(params)
    engine.on_batch = lambda size, seconds: metrics.batch_size.observe(size)
    service = Service(params, tasks, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.admission = Admission(params.max_concurrency, params.queue_timeout_s)
        if not engine.ready:
            engine.load_in_background()
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="deepseek-sft inference service", lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    known_paths = frozenset(r.path for r in app.routes if "{" not in getattr(r, "path", "{"))
    # add_middleware stacks outward: metrics (outermost) sees 401s and 413s too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=params.max_body_bytes)
    if token:
        app.add_middleware(BearerAuthMiddleware, token=token)
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(*validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            detail = (
                f"method {request.method} not allowed on {request.url.path}; allowed: {allowed or 'none'}"
            )
        return error_response(exc.status_code, str(detail), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # The traceback goes to the log (Starlette re-raises after this), never to the client.
        return error_response(500, f"internal error ({type(exc).__name__}); see the service log")

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        return error_response(503, f"model not ready: {exc}", {"Retry-After": "5"})


def _add_routes(app: FastAPI, service: Service) -> None:
    engine = service.engine

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: the model is loaded."""
        if not engine.ready:
            return error_response(503, f"model not ready: {engine.load_error or 'loading'}")
        return {"status": "ready", "model_dir": str(engine.model_dir)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():
        service.refresh_model_info()
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/tasks")
    async def list_tasks():
        """The task endpoints and what they answer."""
        return {name: task.model_dump() for name, task in service.tasks.items()}

    for name in service.tasks:
        _add_task_route(app, service, name)

    @app.post("/v1/tasks/{name}")
    async def unknown_task(name: str):
        raise ApiError(404, f"unknown task {name!r}; known tasks: {', '.join(service.tasks) or '(none)'}")

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        """Greedy continuation of a raw prompt (no chat template)."""
        service.check_text(body.prompt, "prompt")
        budget = service.budget(body.max_new_tokens)
        gen = await service.generate("/v1/generate", lambda: engine.encode_raw(body.prompt), budget)
        return {
            "text": gen.text,
            "tokens": len(gen.token_ids),
            "prompt_tokens": gen.prompt_tokens,
            "finish_reason": gen.finish_reason,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        """OpenAI-compatible chat completion (non-streaming, greedy)."""
        if body.stream:
            raise ApiError(400, "stream=true is not supported; send stream=false")
        if body.n != 1:
            raise ApiError(400, f"n={body.n} is not supported; greedy decoding gives one choice (n=1)")
        service.check_text("".join(m.content for m in body.messages), "messages content")
        budget = service.budget(body.max_completion_tokens or body.max_tokens)
        messages = [m.model_dump() for m in body.messages]
        gen = await service.generate("/v1/chat/completions", lambda: engine.encode_chat(messages), budget)
        return chat_completion_body(gen, str(engine.model_dir))

    @app.get("/v1/models")
    async def models():
        """OpenAI-compatible model list (the one model served)."""
        return {
            "object": "list",
            "data": [{"id": str(engine.model_dir), "object": "model", "owned_by": "deepseek-sft"}],
        }


def _add_task_route(app: FastAPI, service: Service, name: str) -> None:
    task = service.tasks[name]

    async def run(body: TaskRequest):
        return await service.run_task(name, body)

    app.add_api_route(
        f"/v1/tasks/{name}",
        run,
        methods=["POST"],
        name=f"task_{name}",
        summary=f"{task.type}: {task.instruction}",
    )


def chat_completion_body(gen: Generation, model_name: str) -> dict:
    """The OpenAI chat.completion response object for one generation."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "finish_reason": gen.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": len(gen.token_ids),
            "total_tokens": gen.prompt_tokens + len(gen.token_ids),
        },
    }


def run_server(
    params: ServeParams,
    tasks: dict[str, TaskSpec],
    model_dir: str | None = None,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
) -> None:
    """Load the model (failing fast on a bad directory), then serve with uvicorn until interrupted."""
    import uvicorn

    host, port = host or params.host, port or params.port
    engine = Engine.from_params(params, model_dir)
    engine.load()
    if not token and not _is_loopback(host):
        log.warning(
            "serving on %s without authentication; set $%s to require a bearer token", host, params.token_env
        )
    log.info("auth %s; serving %s on http://%s:%d", "on" if token else "off", engine.model_dir, host, port)
    app = create_app(params, tasks, engine, token=token)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=params.log_level,
        access_log=params.log_level in ("info", "debug"),
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
