"""The requests the engine holds (queued or generating), so a stuck engine shows and a shutdown can end them.

Every submitted request is registered until its Future resolves. A request older than `serve.stuck_after_s`
counts as stuck (the /readyz probe, the `dsft_engine_stuck_requests` gauge and its alert watch that), and a
shutdown that cannot wait any longer fails what is left instead of hanging on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError


def resolve(future: Future, result=None, error: BaseException | None = None) -> bool:
    """Set `future`'s result (or `error`) unless it is already done; False when it was (a shutdown or a
    timeout got there first, and the late answer is dropped)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


def claim(future: Future) -> bool:
    """Mark a queued `future` running; False when it was cancelled or already resolved meanwhile."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # resolved while queued (failed by a shutdown)
        return False


class InFlight:
    """Futures of submitted requests with their submission time, until they resolve (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._since: dict[Future, float] = {}

    def add(self, future: Future) -> None:
        """Register `future` now; it leaves the registry by itself when it resolves."""
        with self._lock:
            self._since[future] = time.monotonic()
        future.add_done_callback(self._remove)  # runs at once if the future is already done

    def _remove(self, future: Future) -> None:
        with self._lock:
            self._since.pop(future, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._since)

    def ages(self) -> list[float]:
        """Seconds since each registered request was submitted."""
        now = time.monotonic()
        with self._lock:
            return [now - since for since in self._since.values()]

    def older_than(self, seconds: float) -> int:
        """How many registered requests were submitted more than `seconds` ago."""
        return sum(age > seconds for age in self.ages())

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until every registered request resolved (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while len(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def fail_all(self, make_error: Callable[[], BaseException]) -> int:
        """Resolve every registered request with a fresh `make_error()`; return how many were still open."""
        with self._lock:
            futures = list(self._since)
        return sum(resolve(f, error=make_error()) for f in futures)
