"""The FastAPI app: one JSON endpoint per task, raw generation, the OpenAI API, probes and /metrics.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` (errors.py) with a 4xx
status when the request is to blame and 5xx only when the service is; nothing a client sends can stop the
service or hold a slot forever:
- bad input is refused before generation: empty (422) or oversized (413) text, invalid Unicode (a lone
  surrogate, 422), wrong types (422), and, for an extraction task that echoes its text, the characters of its
  own answer markup (422, code `reserved_characters`: `⟨⟩` for tagged answers, `⟦⟧` for inline ones). The
  service refuses such a text rather than escaping it: an answer's tags could no longer be told from the
  text's, and the span offsets the client gets back would not index its own text;
- every admitted request resolves: a generation failure is a 500 with code `generation_failed`, a request
  that waits longer than serve.request_timeout_s a 504, and its admission slot is given back either way;
- /readyz is 503 when the model is not loaded or the engine is stuck (a request older than
  serve.stuck_after_s, or the generation worker dead), so a load balancer stops sending it traffic;
- on SIGTERM the service stops accepting connections, waits serve.shutdown_timeout_s for open requests and
  answers the rest 503, so shutdown takes bounded time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response

from ..config.data import TaskSpec
from ..config.serve import ServeParams
from ..tasks import MARK_CLOSE, MARK_OPEN, TAG_CLOSE, TAG_OPEN, answer_budget, echoes_text, parse_response
from .auth import BearerAuthMiddleware
from .engine import Engine, EngineStopped, Generation, GenerationFailed, NotReady, PromptTooLong
from .errors import ApiError, engine_error, error_json, install_error_handlers
from .limits import Admission, BodyLimitMiddleware, Saturated
from .metrics import MetricsMiddleware, ServeMetrics, git_commit, model_info_labels, model_name
from .openai_api import add_openai_routes
from .schemas import GenerateRequest, TaskRequest


def reserved_characters(task: TaskSpec) -> str:
    """Characters a text sent to `task` may not hold: those of its answer markup, if it echoes its text."""
    if not echoes_text(task):
        return ""
    return MARK_OPEN + MARK_CLOSE if task.answer_format == "inline" else TAG_OPEN + TAG_CLOSE


class Service:
    """The request logic behind the routes: input checks, admission, generation, metrics."""

    def __init__(
        self, params: ServeParams, tasks: dict[str, TaskSpec], engine: Engine, metrics: ServeMetrics
    ):
        self.params = params
        self.tasks = tasks
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name(engine.model_dir, params.model_name)
        self.git_commit = git_commit()
        self.admission: Admission | None = None  # created in the serving loop (lifespan)
        self._info_set = False

    # ----- input checks --------------------------------------------------------------------------------
    def check_text(self, text: str, what: str) -> None:
        """Refuse empty and oversized input (422 / 413)."""
        if not text.strip():
            raise ApiError(422, f"{what} is empty; send non-blank text", "empty_input")
        if len(text) > self.params.max_text_chars:
            raise ApiError(
                413,
                f"{what} is {len(text)} characters; the limit is {self.params.max_text_chars} (serve.max_text_chars)",
                "input_too_long",
            )

    def check_task_text(self, name: str, text: str) -> None:
        """Refuse a text holding the task's reserved markup characters (module doc)."""
        reserved = reserved_characters(self.tasks[name])
        at = next((i for i, char in enumerate(text) if char in reserved), None)
        if at is not None:
            raise ApiError(
                422,
                f"text holds {text[at]!r} (U+{ord(text[at]):04X}) at character {at}: task {name!r} writes its "
                f"answer with the markup characters {' '.join(reserved)}, so its input text cannot contain "
                "them; replace them (e.g. with 〈 〉 or 【 】)",
                "reserved_characters",
                "text",
            )

    def budget(self, requested: int | None, param: str = "max_new_tokens") -> int:
        """New-token budget of a free-form request, refusing more than serve.max_new_tokens_limit (422)."""
        if requested is None:
            return self.params.default_new_tokens
        if requested > self.params.max_new_tokens_limit:
            raise ApiError(
                422,
                f"{param}={requested} exceeds the limit of {self.params.max_new_tokens_limit} "
                "(serve.max_new_tokens_limit)",
                "max_tokens_exceeded",
                param,
            )
        return requested

    def encode(self, encode, budget: int) -> list[int]:
        """Prompt ids from `encode()`, refused (422) when prompt + budget exceed the context window."""
        try:
            ids = encode()
            self.engine.check_length(ids, budget)
        except PromptTooLong as e:
            raise ApiError(422, str(e), "context_length_exceeded") from None
        return ids

    # ----- admission and generation --------------------------------------------------------------------
    async def admit(self) -> None:
        """Take an admission slot (503 when none frees in time); the caller must `release()` it."""
        if self.admission is None:
            raise NotReady("the service is starting")
        try:
            await self.admission.acquire()
        except Saturated as e:
            self.metrics.rejected.labels("saturated").inc()
            raise ApiError(503, str(e), "saturated") from None

    def release(self) -> None:
        """Give back the slot taken by `admit`."""
        self.admission.release()

    def submit(self, ids: list[int], budget: int, constraint=None, on_text=None) -> Future:
        """Queue a prompt on the engine (503 while it shuts down)."""
        try:
            return self.engine.submit(ids, budget, constraint, on_text)
        except EngineStopped as e:
            raise ApiError(503, str(e), "shutting_down") from None

    async def answer(self, future: Future) -> Generation:
        """Await an engine Future for at most serve.request_timeout_s; its errors become ApiErrors."""
        timeout = self.params.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (GenerationFailed, EngineStopped, TimeoutError) as e:
            raise engine_error(e, timeout) from None

    async def generate(self, endpoint: str, encode, budget: int, constraint=None) -> Generation:
        """Encode, check the context window, hold an admission slot while generating (under `constraint`,
        if any); record token metrics."""
        ids = self.encode(encode, budget)
        await self.admit()
        try:
            generation = await self.answer(self.submit(ids, budget, constraint))
        finally:
            self.release()
        self.metrics.observe_generation(
            endpoint, generation.prompt_tokens, len(generation.token_ids), generation.batch_seconds
        )
        return generation

    async def run_task(self, name: str, body: TaskRequest) -> dict:
        """Answer one task request: prompt, greedy answer, parsed result."""
        task = self.tasks[name]
        self.check_text(body.text, "text")
        self.check_task_text(name, body.text)
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

    # ----- readiness -----------------------------------------------------------------------------------
    def readiness_problem(self) -> tuple[str, str] | None:
        """(code, message) of why the service should get no traffic now, or None when it is ready."""
        if not self.engine.ready:
            return "model_not_ready", f"model not ready: {self.engine.load_error or 'loading'}"
        problem = self.engine.stuck_problem(self.params.stuck_after_s)
        return ("engine_stuck", f"engine stuck: {problem}") if problem else None

    def refresh_model_info(self) -> None:
        """Fill the model info metric once the model is loaded (its type is known only then)."""
        self.metrics.model_ready.set(1 if self.engine.ready else 0)
        if self.engine.ready and not self._info_set:
            labels = model_info_labels(self.model_name, self.engine.model_type, self.git_commit)
            self.metrics.model_info.info(labels)
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
    metrics.watch_engine(engine, params.stuck_after_s)
    service = Service(params, tasks, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.admission = Admission(params.max_concurrency, params.queue_timeout_s)
        if not engine.ready:
            engine.load_in_background()
        engine.start()
        yield
        # run_server drained open requests already; the worker only has to notice the stop
        await asyncio.to_thread(engine.stop, max(1.0, params.shutdown_timeout_s))

    app = FastAPI(title="deepseek-sft inference service", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(
        app,
        {NotReady: lambda exc: ApiError(503, f"model not ready: {exc}", "model_not_ready", retry_after=5)},
    )
    _add_routes(app, service)
    add_openai_routes(app, service)
    known_paths = frozenset(r.path for r in app.routes if "{" not in getattr(r, "path", "{"))
    # add_middleware stacks outward: metrics (outermost) sees 401s and 413s too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=params.max_body_bytes)
    if token:
        app.add_middleware(BearerAuthMiddleware, token=token)
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    engine = service.engine

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: the model is loaded and the engine answers in time (not stuck, worker alive)."""
        problem = service.readiness_problem()
        if problem is not None:
            return error_json(503, problem[1], problem[0], headers={"Retry-After": "5"})
        return {"status": "ready", "model": service.model_name, "git_commit": service.git_commit}

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
        known = ", ".join(service.tasks) or "(none)"
        raise ApiError(404, f"unknown task {name!r}; known tasks: {known}", "unknown_task")

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
