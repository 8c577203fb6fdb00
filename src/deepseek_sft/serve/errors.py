"""The service's one error shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`.

Every refusal (routes, validation, auth, body limit, unknown paths, internal failures) goes through `error_json`,
so an OpenAI client parses any of them (`openai.UnprocessableEntityError(...).code`, `.message`) and a script
can branch on `code` instead of matching message text.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineStopped, GenerationFailed

# OpenAI's `type` per status; anything else 4xx is the client's request, anything else 5xx the server's.
# (`code` says which, e.g. saturated, shutting_down, generation_timeout).
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the service refuses: status, the message the client sees, a machine-readable code and
    (when one request field is to blame) its name."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, retry_after: int | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        # seconds a client should wait before retrying (503: a slot frees soon, a model loads slower)
        self.retry_after = retry_after if retry_after is not None else (1 if status == 503 else None)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def printable(message: str) -> str:
    """`message` with anything UTF-8 cannot carry (a lone surrogate from a path or a field) escaped: an
    error about junk must not itself fail to encode (that was a 500 or a reset connection)."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    """The JSON body of an error response."""
    return {
        "error": {"message": printable(message), "type": error_type(status), "param": param, "code": code}
    }


def error_json(
    status: int, message: str, code: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """An error response in the one shape of the service."""
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    """A FastAPI validation error as an ApiError: 400 for unparsable JSON, 422 for a wrong shape or type."""
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return ApiError(
                400, f"request body is not valid JSON{': ' + detail if detail else ''}", "invalid_json"
            )
    parts, fields = [], []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if not loc:  # the body itself is wrong: not an object, or not sent as JSON
            return ApiError(
                422,
                'request body must be a JSON object (Content-Type: application/json), e.g. {"text": "..."}',
                "invalid_body",
            )
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        fields.append(loc)
    return ApiError(
        422, "invalid request: " + "; ".join(parts), "invalid_request", fields[0] if fields else None
    )


def http_error(request: Request, exc: StarletteHTTPException) -> ApiError:
    """Starlette's own HTTP errors (unknown path, wrong method, body too large mid-stream) as ApiErrors."""
    status, detail = exc.status_code, str(exc.detail)
    if status == 404:
        return ApiError(
            404, f"no endpoint {request.method} {request.url.path}; see /docs for the API", "not_found"
        )
    if status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} not allowed on {request.url.path}; allowed: {allowed or 'none'}"
        return ApiError(405, message, "method_not_allowed")
    if status == 413:
        return ApiError(413, detail, "body_too_large")
    return ApiError(status, detail, f"http_{status}")


def engine_error(exc: Exception, timeout_s: float) -> ApiError:
    """The client's view of what a request's engine Future resolved to (or of waiting `timeout_s` for it)."""
    if isinstance(exc, GenerationFailed):
        return ApiError(500, f"{exc}; see the service log", "generation_failed")
    if isinstance(exc, EngineStopped):
        return ApiError(503, str(exc), "shutting_down")
    if isinstance(exc, TimeoutError):
        return ApiError(
            504,
            f"no answer within {timeout_s:g} s (serve.request_timeout_s); the engine may be stuck, see /readyz",
            "generation_timeout",
        )
    return ApiError(500, f"internal error ({type(exc).__name__}); see the service log", "internal_error")


def install_error_handlers(app: FastAPI, extra: dict | None = None) -> None:
    """Route every exception to the one error shape; `extra` maps more exception types to ApiError makers."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_json(exc.status, exc.message, exc.code, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException):
        err = http_error(request, exc)
        headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"} or None
        return error_json(err.status, err.message, err.code, headers=headers)

    for exc_type, make in (extra or {}).items():

        async def handle(request: Request, exc: Exception, make=make):
            return await api_error(request, make(exc))

        app.add_exception_handler(exc_type, handle)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # The traceback goes to the log (Starlette re-raises after this), never to the client.
        message = f"internal error ({type(exc).__name__}); see the service log"
        return error_json(500, message, "internal_error")
