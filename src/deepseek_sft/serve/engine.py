"""The model behind the service: loading, prompt encoding and batched greedy generation on one worker thread.

Only the worker thread touches the model, so generation is thread-safe without locking the model; requests
from any thread are queued and the worker gathers up to `max_batch_size` of them (waiting at most
`batch_wait_ms` for company) into one batched `generate` call. The tokenizer is shared by the request
threads and the worker, so its calls go through one lock (fast tokenizers refuse concurrent mutation).

Every submitted request's Future resolves, whatever happens: a failure inside generation becomes a
`GenerationFailed` (an exception asyncio accepts: a raw StopIteration from a logits processor could not be
set on the awaiting asyncio Future, so the request waited forever and kept its admission slot), and a
shutdown fails what is still open with `EngineStopped`. `InFlight` keeps the open requests, so a stuck engine
(a request older than serve.stuck_after_s, or a dead worker) shows in /readyz and /metrics.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base_model import load_model_and_tokenizer
from ..config.data import TaskSpec
from ..config.serve import ServeParams
from ..evaluate.constrain import Constraint, echo_constraint
from ..evaluate.core import resolve_device
from ..evaluate.generate import decode_answers, eos_token_ids, generate_batched
from ..sft_data import encode_prompt
from ..tokenizer_build import ensure_chat_ready
from .inflight import InFlight, claim, resolve
from .streaming import generate_streamed

log = logging.getLogger(__name__)

_STOP = object()


class NotReady(RuntimeError):
    """The model is not loaded (yet, or loading failed)."""


class PromptTooLong(ValueError):
    """Prompt plus requested new tokens exceed the model's context window."""


class GenerationFailed(RuntimeError):
    """Generation raised; the original exception is the __cause__ (and in the service log)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down: the request was refused, or failed because shutdown could not wait."""


@dataclass(frozen=True)
class Generation:
    """One request's answer; `batch_seconds` is the wall time of the batched generate call it was part of."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    max_new_tokens: int
    batch_seconds: float
    batch_size: int

    @property
    def finish_reason(self) -> str:
        """OpenAI's wording: "stop" when EOS ended the answer, "length" when the token budget did."""
        return "length" if len(self.token_ids) >= self.max_new_tokens else "stop"


# Called from the worker thread with the decoded answer so far, after every generated token.
TextCallback = Callable[[str], None]


@dataclass
class _Request:
    ids: list[int]
    max_new_tokens: int
    constraint: Constraint | None = None
    on_text: TextCallback | None = None
    future: Future = field(default_factory=Future)


class Engine:
    """A loaded model + tokenizer and the batching worker that runs greedy generation."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        num_threads: int | None = None,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        on_batch=None,
    ):
        self.model_dir = Path(model_dir)
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.device = resolve_device(device)
        self.num_threads = num_threads
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.on_batch = on_batch  # callback(batch_size, seconds), e.g. a Prometheus histogram
        self.model = None
        self.tokenizer = None
        self.load_error: str | None = None
        self._load_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self.in_flight = InFlight()
        self._closing = False

    @classmethod
    def from_params(
        cls, section: ServeParams, model_dir: str | os.PathLike | None = None, on_batch=None
    ) -> Engine:
        """An engine configured by the `serve:` params section (`model_dir` overrides serve.model_dir)."""
        return cls(
            model_dir or section.model_dir,
            trust_remote_code=section.trust_remote_code,
            dtype=section.dtype,
            attn_implementation=section.attn_implementation,
            device=section.device,
            num_threads=section.num_threads,
            max_batch_size=section.max_batch_size,
            batch_wait_ms=section.batch_wait_ms,
            on_batch=on_batch,
        )

    # ----- loading -------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the model and tokenizer are loaded."""
        return self.model is not None

    @property
    def model_type(self) -> str:
        """config.model_type of the loaded model ("" before loading)."""
        return getattr(getattr(self.model, "config", None), "model_type", "") or ""

    @property
    def context_window(self) -> int | None:
        """Longest sequence (prompt + answer) the model takes, when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def load(self) -> None:
        """Load model and tokenizer (idempotent; thread-safe); failures are kept in `load_error` and raised."""
        with self._load_lock:
            if self.ready:
                return
            if not (self.model_dir / "config.json").is_file():
                self.load_error = (
                    f"{self.model_dir}: no config.json; expected a model directory saved by save_pretrained"
                )
                raise FileNotFoundError(self.load_error)
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            started = time.perf_counter()
            try:
                model, tokenizer = load_model_and_tokenizer(
                    self.model_dir, self.trust_remote_code, self.dtype, self.attn_implementation
                )
            except Exception as e:
                self.load_error = f"{self.model_dir}: could not load the model: {type(e).__name__}: {e}"
                raise
            added = ensure_chat_ready(tokenizer)
            if added:
                log.warning(
                    "%s: tokenizer lacked %s; using the project defaults", self.model_dir, ", ".join(added)
                )
            self.tokenizer = tokenizer
            self.model = model.to(self.device).eval()
            self.load_error = None
            log.info(
                "loaded %s (%s, %s) in %.1f s",
                self.model_dir,
                self.model_type,
                self.device,
                time.perf_counter() - started,
            )

    def load_in_background(self) -> threading.Thread:
        """Start loading on a daemon thread (the service answers /healthz meanwhile)."""

        def run():
            try:
                self.load()
            except Exception:
                log.exception("model loading failed")

        thread = threading.Thread(target=run, name="dsft-load", daemon=True)
        thread.start()
        return thread

    # ----- encoding ------------------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading")

    def encode_task(self, task: TaskSpec, text: str) -> list[int]:
        """Prompt ids of `task` on `text`, exactly as training and evaluation build them."""
        self._require_ready()
        with self._tok_lock:
            return list(encode_prompt(self.tokenizer, task, text))

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone (no special tokens)."""
        self._require_ready()
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def task_constraint(self, task: TaskSpec, text: str) -> Constraint | None:
        """The decoding constraint of `task`'s answer on `text` (inline or tagged extraction), as evaluation uses it."""
        self._require_ready()
        with self._tok_lock:
            return echo_constraint(task, self.tokenizer, text, eos_token_ids(self.model, self.tokenizer))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a chat conversation through the tokenizer's chat template (generation prompt added)."""
        self._require_ready()
        with self._tok_lock:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def encode_raw(self, prompt: str) -> list[int]:
        """Prompt ids of raw text, with the tokenizer's usual special tokens (BOS)."""
        self._require_ready()
        with self._tok_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def check_length(self, ids: list[int], max_new_tokens: int) -> None:
        """Raise PromptTooLong if prompt + answer would not fit the context window."""
        window = self.context_window
        if window is not None and len(ids) + max_new_tokens > window:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"context window of {window} tokens"
            )

    def decode(self, token_ids: list[int]) -> str:
        """Text of answer tokens (special tokens removed), as responses carry it."""
        with self._tok_lock:
            return decode_answers(self.tokenizer, [token_ids])[0]

    # ----- generation ----------------------------------------------------------------------------------
    @property
    def worker_alive(self) -> bool:
        """True while the batching worker thread runs."""
        return self._worker is not None and self._worker.is_alive()

    def stuck_problem(self, stuck_after_s: float) -> str | None:
        """Why the engine cannot answer in time (dead worker, requests older than `stuck_after_s`), or None."""
        if not self.worker_alive:
            return "the generation worker is not running"
        ages = self.in_flight.ages()
        stuck = [age for age in ages if age > stuck_after_s]
        if stuck:
            return (
                f"{len(stuck)} request(s) in the engine for more than {stuck_after_s:g} s "
                f"(serve.stuck_after_s; oldest {max(stuck):.1f} s)"
            )
        return None

    def start(self) -> None:
        """Start the batching worker thread (idempotent)."""
        self._closing = False
        if not self.worker_alive:
            self._worker = threading.Thread(target=self._run, name="dsft-generate", daemon=True)
            self._worker.start()

    def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to `timeout_s` for the open ones, then fail the rest with
        EngineStopped; return how many were failed (a shutdown answers everything, and in bounded time)."""
        self._closing = True
        if self.in_flight.wait_empty(timeout_s):
            return 0
        failed = self.in_flight.fail_all(
            lambda: EngineStopped(f"the service is shutting down; not answered within {timeout_s:g} s")
        )
        log.warning("shutdown: %d request(s) failed after waiting %.1f s", failed, timeout_s)
        return failed

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish what is queued (up to `timeout`), stop it, and fail whatever is still open."""
        self._closing = True
        if self.worker_alive:
            self._queue.put(_STOP)
            self._worker.join(timeout)
        self._worker = None
        self.in_flight.fail_all(lambda: EngineStopped("the service stopped before answering"))

    def submit(
        self,
        ids: list[int],
        max_new_tokens: int,
        constraint: Constraint | None = None,
        on_text: TextCallback | None = None,
    ) -> Future:
        """Queue one prompt (its answer restricted by `constraint`, if any; `on_text` streams it); the
        Future resolves to a Generation, or to GenerationFailed / EngineStopped."""
        self._require_ready()
        if self._closing:
            raise EngineStopped("the service is shutting down")
        if not self.worker_alive:
            raise NotReady("the generation worker is not running")
        request = _Request(list(ids), int(max_new_tokens), constraint, on_text)
        self.in_flight.add(request.future)
        self._queue.put(request)
        return request.future

    def generate(self, ids: list[int], max_new_tokens: int, timeout: float | None = None) -> Generation:
        """Blocking convenience around `submit`."""
        return self.submit(ids, max_new_tokens).result(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._gather([first])
            try:
                self._run_batch(batch)
            except Exception as e:  # a bug here must not kill the worker: the batch's requests get it
                log.exception("batching failed for %d request(s)", len(batch))
                for request in batch:
                    resolve(request.future, error=_failure(e))

    def _run_batch(self, batch: list[_Request]) -> None:
        # Requests cancelled or failed while queued (client gone, shutdown) are dropped before they cost compute.
        live = [r for r in batch if claim(r.future)]
        groups: dict[tuple[int, bool], list[_Request]] = defaultdict(list)
        for request in live:  # streamed requests generate apart: their batch reports every step
            groups[request.max_new_tokens, request.on_text is not None].append(request)
        for (budget, streamed), group in sorted(groups.items()):
            self._generate_group(group, budget, streamed)

    def _gather(self, batch: list[_Request]) -> tuple[list[_Request], bool]:
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _generate_group(self, group: list[_Request], budget: int, streamed: bool = False) -> None:
        started = time.perf_counter()
        try:
            if streamed:
                callbacks = [self._streamer(r) for r in group]
                answers = generate_streamed(
                    self.model, self.tokenizer, [r.ids for r in group], budget, callbacks
                )
            else:
                answers = generate_batched(
                    self.model,
                    self.tokenizer,
                    [r.ids for r in group],
                    budget,
                    len(group),
                    constraints=[r.constraint for r in group],
                )
            with self._tok_lock:
                texts = decode_answers(self.tokenizer, answers)
        except Exception as e:  # one bad batch must not kill the worker: its requests get the error
            log.exception("generation failed for a batch of %d", len(group))
            for request in group:
                resolve(request.future, error=_failure(e))
            return
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            try:
                self.on_batch(len(group), seconds)
            except Exception:  # a metrics callback must not keep the answers from their requests
                log.exception("on_batch callback failed")
        for request, answer, text in zip(group, answers, texts, strict=True):
            resolve(request.future, Generation(answer, text, len(request.ids), budget, seconds, len(group)))

    def _streamer(self, request: _Request):
        def emit(tokens: list[int]) -> None:
            try:
                request.on_text(self.decode(tokens))
            except Exception:  # a consumer gone away (closed event loop) must not stop the batch
                log.debug("streaming callback failed", exc_info=True)

        return emit


def _failure(error: Exception) -> GenerationFailed:
    """The error a request's Future gets when generation raised `error`."""
    failed = GenerationFailed(f"generation failed: {type(error).__name__}: {error}".rstrip(": "))
    failed.__cause__ = error
    return failed
