"""The replica's side of monitoring: a buffer of scored rows (pure) and the link that ships it to the named
monitor actor.

Fire-and-forget: each batch appends its requests' raw inputs, probabilities and latencies to the buffer; a
background task ships it with `record.remote` (never awaited on the request path) every
`monitor.flush_interval_ms`, or sooner at `monitor.flush_rows`. Each actor call costs the replica
milliseconds of CPU (Ray's task submission and reply handling), hence the batching. A slow or dead monitor
costs dropped monitoring rows, never a slow or failed request. The one awaited call is `/v1/feedback`'s
(`feedback_verdicts`): its client is told which labels were accepted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from raysys.config import MonitorConfig
from raysys.config.monitoring import MIN_FLUSH_INTERVAL_MS
from raysys.monitor.versions import VersionFigures

log = logging.getLogger("ray.serve")

# the link's defaults are MonitorConfig's (one place to change them): ship at least this often, wake the
# flusher early at this many buffered rows, drop (and count) new rows beyond this many (monitor far behind)
_MONITOR_DEFAULTS = MonitorConfig()
MONITOR_FLUSH_INTERVAL_S = _MONITOR_DEFAULTS.flush_interval_ms / 1000
MONITOR_FLUSH_ROWS = _MONITOR_DEFAULTS.flush_rows
MONITOR_MAX_BUFFER_ROWS = _MONITOR_DEFAULTS.max_buffer_rows
MONITOR_MAX_PENDING = 16  # record calls in flight before new batches are dropped
MONITOR_RETRY_S = 5.0  # wait before re-acquiring a monitor that failed
MONITOR_REPORT_TIMEOUT_S = 10.0  # a brand-new monitor actor may still be starting its process
# a /v1/feedback id unknown at the first ask is asked about again after monitor.flush_interval_ms plus this:
# time for the other replicas' flushers to ship their buffered predictions and for the actor to log them
FEEDBACK_RECHECK_MARGIN_S = 0.5


class FeedbackUnavailable(Exception):
    """The monitor could not judge a feedback request (unreachable, or no answer in time): a 503."""


class MonitorBuffer:
    """Rows waiting to be sent to the monitor, grouped by model version. Thread-safe (requests add from
    the replica's event loop; `reconfigure` flushes from Serve's thread pool)."""

    def __init__(self, max_rows: int = MONITOR_MAX_BUFFER_ROWS):
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._parts: dict[Any, list[tuple]] = {}
        self._errors: dict[Any, int] = {}
        self._server_errors: dict[Any, int] = {}  # the 5xx among _errors (a canary gate reads these)
        self._figures = VersionFigures()  # per-version scoring passes and agreement (a canary gate reads these)
        self.rows = 0
        self.rows_dropped = 0

    def add(self, x_num_raw: np.ndarray, x_cat: np.ndarray, pred: np.ndarray | None, latency_ms: float,
            model_version: Any, *, proba: np.ndarray | None = None, request_id: str | None = None) -> bool:
        """One request's rows; see `add_many`."""
        return self.add_many([(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)]) == 1

    def add_many(self, parts: list[tuple]) -> int:
        """Requests' rows, each part `(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)`
        (pred may be None when proba is given: the monitor takes the argmax). A few array references and a
        tuple append per request under one lock per call: the request path's whole cost of monitoring.
        Returns how many parts were kept; the rest (buffer full: the monitor is far behind) are counted
        as dropped."""
        kept = 0
        with self._lock:
            for x_num_raw, x_cat, pred, latency_ms, version, proba, request_id in parts:
                n = len(x_cat)
                if self.rows + n > self.max_rows:
                    self.rows_dropped += n
                    continue
                self._parts.setdefault(version, []).append((x_num_raw, x_cat, pred, float(latency_ms), proba,
                                                            request_id))
                self.rows += n
                kept += 1
        return kept

    def add_error(self, model_version: Any, server: bool = False) -> None:
        """A failed request of `model_version`; `server`: a 5xx (the version failed), not the client's fault."""
        with self._lock:
            self._errors[model_version] = self._errors.get(model_version, 0) + 1
            if server:
                self._server_errors[model_version] = self._server_errors.get(model_version, 0) + 1

    def add_scoring(self, passes: list) -> None:
        """The `serve.scoring` pass records (GroupStats, Agreement) of one batch."""
        if passes:
            with self._lock:
                self._figures.add_passes(passes)

    def take(self) -> list[dict[str, Any]]:
        """Everything buffered, as `record` batches (one per model version); empties the buffer."""
        with self._lock:
            parts, self._parts, self.rows = self._parts, {}, 0
            errors, self._errors = self._errors, {}
            server, self._server_errors = self._server_errors, {}
            figures = self._figures.take() if self._figures else None
        out = self._batches(parts, errors, server)
        if figures:  # rides on the first batch: no extra actor call
            if not out:
                out.append({"x_num": np.zeros(0, np.float32), "x_cat": np.zeros(0, np.int64),
                            "pred": np.zeros(0, np.int64), "latency_ms": [], "model_version": next(iter(figures))})
            out[0]["version_figures"] = figures
        return out

    @staticmethod
    def _batches(parts: dict, errors: dict, server: dict) -> list[dict[str, Any]]:
        out = []
        for version, ps in parts.items():
            batch = {"x_num": np.concatenate([p[0] for p in ps]).astype(np.float32, copy=False),
                     "x_cat": np.concatenate([p[1] for p in ps]).astype(np.int64, copy=False),
                     "latency_ms": [p[3] for p in ps],
                     "model_version": version}
            if all(p[4] is not None for p in ps):
                batch["proba"] = np.concatenate([p[4] for p in ps]).astype(np.float32, copy=False)
            if any(p[2] is not None for p in ps) or "proba" not in batch:  # else the monitor takes the argmax
                batch["pred"] = np.concatenate([p[2] if p[2] is not None else p[4].argmax(1)
                                                for p in ps]).astype(np.int64, copy=False)
            if all(p[5] is not None for p in ps):
                batch["request_ids"] = [p[5] for p in ps]
                batch["rows_per_request"] = [len(p[1]) for p in ps]
            if errors.get(version):
                batch["errors"] = errors.pop(version)
            if server.get(version):
                batch["server_errors"] = server.pop(version)
            out.append(batch)
        for version, count in errors.items():  # versions with failures only
            out.append({"x_num": np.zeros(0, np.float32), "x_cat": np.zeros(0, np.int64),
                        "pred": np.zeros(0, np.int64), "latency_ms": [], "model_version": version, "errors": count})
            if server.get(version):
                out[-1]["server_errors"] = server[version]
        return out


MIN_FLUSH_INTERVAL_S = MIN_FLUSH_INTERVAL_MS / 1000


class MonitorLink:
    """The replica's side of monitoring: acquires the named monitor actor, ships buffered rows with
    `record.remote` (never awaited on the request path), keeps at most `max_pending` calls in flight,
    and backs off for `retry_s` when the actor fails. `make_handle()` returns the actor handle (raising
    when it cannot)."""

    def __init__(self, make_handle, *, interval_s: float = MONITOR_FLUSH_INTERVAL_S,
                 flush_rows: int = MONITOR_FLUSH_ROWS, max_pending: int = MONITOR_MAX_PENDING,
                 retry_s: float = MONITOR_RETRY_S, buffer: MonitorBuffer | None = None):
        if not interval_s >= MIN_FLUSH_INTERVAL_S:  # also NaN
            raise ValueError(f"monitor link: interval_s={interval_s!r} must be >= {MIN_FLUSH_INTERVAL_S} s (the "
                             "flusher waits this long between flushes; 0 would busy-loop the replica's event loop); "
                             f"set monitor.flush_interval_ms >= {MIN_FLUSH_INTERVAL_MS}")
        self._make_handle = make_handle
        self.interval_s = interval_s
        self.flush_rows = flush_rows
        self.max_pending = max_pending
        self.retry_s = retry_s
        self.buffer = buffer or MonitorBuffer()
        self.handle = None
        self.last_error: str | None = None
        self._next_try = 0.0
        self._pending: deque = deque()
        self.rows_sent = 0
        self._metrics: Any = None  # raysys_monitor_rows_dropped_total, made on the first flush inside a replica
        self._metrics_checked = False
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()

    # -- handle --
    def acquire(self):
        with self._lock:
            if self.handle is not None:
                return self.handle
            if time.monotonic() < self._next_try:
                return None
            try:
                self.handle = self._make_handle()
                self.last_error = None
            except Exception as e:  # the monitor must never break serving
                self._fail(f"cannot reach the monitor actor: {type(e).__name__}: {e}")
            return self.handle

    def _fail(self, message: str) -> None:
        if self.last_error != message:
            log.warning("raysys monitor: %s (retrying in %.0fs; requests are unaffected)", message, self.retry_s)
        self.last_error = message
        self.handle = None
        self._next_try = time.monotonic() + self.retry_s

    def mark_failed(self, message: str) -> None:
        with self._lock:
            self._fail(message)

    # -- request path --
    def add(self, x_num_raw, x_cat, pred, latency_ms, model_version, *, proba=None, request_id=None) -> None:
        self.add_many([(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)])

    def add_many(self, parts: list[tuple]) -> None:
        self.buffer.add_many(parts)
        if self.buffer.rows >= self.flush_rows and self._wake is not None:
            self._wake.set()

    def add_error(self, model_version, server: bool = False) -> None:
        self.buffer.add_error(model_version, server)

    def add_scoring(self, passes: list) -> None:
        self.buffer.add_scoring(passes)

    async def feedback_verdicts(self, items: list[tuple[str, Any]], *, final: bool) -> list[dict[str, Any]]:
        """The actor's verdict on each label (`Monitor.feedback_verdicts`), awaited: the client's answer
        depends on it. This replica's buffered rows go out first (Ray runs one caller's calls to an actor
        in order, so the predictions these labels refer to are logged before they are looked up).
        FeedbackUnavailable when the monitor cannot be reached or does not answer in time."""
        self.flush()
        handle = self.acquire()
        if handle is None:
            raise FeedbackUnavailable(f"monitor unavailable: {self.last_error}")
        try:
            ref = handle.feedback_verdicts.remote(items, final)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), MONITOR_REPORT_TIMEOUT_S)
        except TimeoutError:
            raise FeedbackUnavailable(f"monitor did not answer within {MONITOR_REPORT_TIMEOUT_S:.0f}s") from None
        except Exception as e:
            self.mark_failed(f"feedback_verdicts failed: {type(e).__name__}: {e}")
            raise FeedbackUnavailable(f"monitor unavailable: {type(e).__name__}") from None

    def ensure_started(self) -> None:
        """Start the flusher on the running event loop (first request); a no-op afterwards."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.prune()
                self.flush()
            except Exception as e:  # keep flushing whatever happens
                log.warning("raysys monitor: flush failed: %s", e)

    # -- shipping --
    def flush(self) -> int:
        """Send everything buffered (fire-and-forget). Returns the rows sent; drops them when the monitor
        is unavailable or too far behind."""
        try:
            return self._flush()
        finally:
            self._export_dropped()

    def _export_dropped(self) -> None:
        if not self._metrics_checked:
            self._metrics_checked = True
            try:
                from raysys.monitor.metrics import link_metrics

                self._metrics = link_metrics()
            except Exception as e:  # metrics are a view: never let them break the link
                log.warning("raysys monitor: no dropped-rows metric: %s", e)
        if self._metrics is not None:
            self._metrics.export(self.buffer.rows_dropped)

    def _flush(self) -> int:
        batches = self.buffer.take()
        if not batches:
            return 0
        handle = self.acquire()
        sent = 0
        for batch in batches:
            n = len(batch["x_cat"])
            if handle is None or len(self._pending) >= self.max_pending:
                self.buffer.rows_dropped += n
                continue
            try:
                ref = handle.record.remote(batch)
            except Exception as e:
                self.mark_failed(f"record failed: {type(e).__name__}: {e}")
                self.buffer.rows_dropped += n
                handle = None
                continue
            if ref is not None:
                self._pending.append(ref)
            sent += n
        self.rows_sent += sent
        return sent

    async def prune(self) -> None:
        """Forget finished record calls; a failed one (dead actor) triggers a re-acquire after back-off.
        Awaiting the refs also marks their errors as handled, so Ray does not log each one."""
        if not self._pending:
            return
        import ray

        refs = [r for r in self._pending if isinstance(r, ray.ObjectRef)]
        self._pending = deque(r for r in self._pending if isinstance(r, ray.ObjectRef))
        if not refs:
            return
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=0)
        self._pending = deque(not_ready)
        results = await asyncio.gather(*ready, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.mark_failed(f"record failed: {type(errors[-1]).__name__}: {str(errors[-1])[:200]}")

    # -- the actor's other calls --
    async def report(self, handle) -> dict[str, Any]:
        """The actor's report (TimeoutError after MONITOR_REPORT_TIMEOUT_S)."""
        ref = handle.report.remote()
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), MONITOR_REPORT_TIMEOUT_S)

    def set_profile(self, profile: dict[str, Any], schema: dict[str, Any], model_version: Any) -> None:
        """Point the actor at another model version; this replica's rows of the old one go out first."""
        self.flush()
        handle = self.acquire()
        if handle is None:
            return
        try:
            handle.set_profile.remote(profile, schema, model_version)
        except Exception as e:
            self.mark_failed(f"set_profile failed: {type(e).__name__}: {e}")

    def stats(self) -> dict[str, Any]:
        return {"connected": self.handle is not None, "rows_sent": self.rows_sent,
                "rows_buffered": self.buffer.rows, "rows_dropped": self.buffer.rows_dropped,
                "calls_in_flight": len(self._pending), "last_error": self.last_error}
