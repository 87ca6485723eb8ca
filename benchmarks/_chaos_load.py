"""The steady load of the chaos benchmark: an open-loop HTTP client (requests leave at a fixed rate whether or
not earlier ones have answered, so a stall shows up as failures and latency, not as a slower client) on its
own asyncio loop in a thread, with aiohttp.

/v1/predict is a pure function of its body, so a request that got no answer, a 502/503/504 or a response cut
after its headers is retried as any client of an idempotent API would: at most `retries` times with
exponential backoff (`retry_wait_s`, doubling, at most 2 s apart: ~16 s in all with the defaults, which
covers an ingress restart). Two more answers come from the ingress itself, never from raysys (whose errors are
JSON): a restarted HAProxy answers a plain-text 404 (`Path '...' not found`) from its default backend until
Serve has sent it the route table (Ray 2.60; ~4 s here), and a plain-text 500 (Ray's HAProxy config rewrites
its own 502/503/504, "no server available", to 500) while no replica is up; both are retried too and counted
in `ingress_not_ready`.

Every request is recorded: when it left, when it ended, its final status, how many tries it took, and whether
any try was cut after its headers (counted apart: the point past which no proxy can retry)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

RETRYABLE = {502, 503, 504}


@dataclass
class Record:
    sent: float  # time.monotonic() when the first try left
    done: float
    status: int | str  # the final HTTP status, or "no-response"
    tries: int
    cut: int  # tries whose response was cut after its headers
    not_ready: int  # tries answered by an ingress that had no routes yet


class OpenLoad:
    """`rate` requests/s of one-row predictions to `url`/v1/predict until stopped (at most `max_in_flight`
    outstanding: past that a tick is skipped and counted in `skipped`)."""

    def __init__(self, url: str, rows: list[dict], *, headers: dict | None = None, rate: float = 25.0,
                 timeout_s: float = 10.0, retries: int = 10, retry_wait_s: float = 0.25, max_in_flight: int = 1000,
                 feedback_every_s: float | None = None):
        """`feedback_every_s`: each request carries a request id, and every that many seconds the answered ids
        are labelled through /v1/feedback (the predicted class as the label), as a client with delayed
        labels does; its answers are counted in `feedback`."""
        self.url, self.rows, self.headers = f"{url}/v1/predict", rows, headers or {}
        self.feedback_url, self.feedback_every_s = f"{url}/v1/feedback", feedback_every_s
        self._to_label: list[tuple[str, str]] = []
        self.feedback: Counter = Counter()
        self.rate, self.timeout_s, self.retries, self.retry_wait_s = rate, timeout_s, retries, retry_wait_s
        self.max_in_flight = max_in_flight
        self.records: list[Record] = []
        self.skipped = 0
        self.errors: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True, name="chaos-load")

    def __enter__(self) -> OpenLoad:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s * (self.retries + 2) + 5)
        self.t1 = time.monotonic()

    async def _main(self) -> None:
        in_flight: set[asyncio.Task] = set()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        # as many connections as requests in flight: aiohttp's default pool of 100 would queue requests in the
        # client while an outage holds them in their retries, and the client's queue would count as latency
        connector = aiohttp.TCPConnector(limit=self.max_in_flight)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers, connector=connector) as session:
            labeller = asyncio.create_task(self._label(session)) if self.feedback_every_s else None
            k, start = 0, time.monotonic()
            while not self._stop.is_set():
                due = start + k / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if len(in_flight) >= self.max_in_flight:
                    self.skipped += 1
                else:
                    task = asyncio.create_task(self._one(session, self.rows[k % len(self.rows)], f"load-{k}"))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                k += 1
            if in_flight:
                await asyncio.wait(in_flight, timeout=self.timeout_s * (self.retries + 1))
            if labeller is not None:
                labeller.cancel()

    async def _label(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.feedback_every_s)
            items, self._to_label = self._to_label, []
            for i in range(0, len(items), 500):
                body = {"feedback": [{"request_id": rid, "label": y} for rid, y in items[i:i + 500]]}
                try:
                    async with session.post(self.feedback_url, json=body) as r:
                        self.feedback[str(r.status)] += 1
                        await r.read()
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.feedback[type(e).__name__] += 1

    def set_rows(self, rows: list[dict]) -> None:
        """What the next requests send (a drift scenario swaps in shifted rows)."""
        self.rows = rows

    async def _one(self, session: aiohttp.ClientSession, row: dict, request_id: str) -> None:
        sent, tries, cut, not_ready, status = time.monotonic(), 0, 0, 0, "no-response"
        while True:
            tries += 1
            retry = False
            try:
                body = {"instances": [row]}
                if self.feedback_every_s:
                    body["request_id"] = request_id
                async with session.post(self.url, json=body) as r:
                    status = r.status
                    try:
                        payload = await r.read()
                        if status == 200 and self.feedback_every_s:
                            self._to_label.append((request_id, json.loads(payload)["predictions"][0]))
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                        cut += 1
                        status, retry = "cut", True
                        self.errors[f"cut: {type(e).__name__}"] += 1
                    if status in RETRYABLE:
                        retry = True
                        self.errors[f"{status}"] += 1
                    elif status in (404, 500) and not r.content_type.endswith("json"):
                        not_ready += 1
                        retry = True
                        self.errors[f"{status} (from the ingress, not raysys)"] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                status, retry = "no-response", True
                self.errors[f"{type(e).__name__}"] += 1
            if not retry or tries > self.retries:
                break
            await asyncio.sleep(min(2.0, self.retry_wait_s * 2 ** (tries - 1)))
        with self._lock:
            self.records.append(Record(sent, time.monotonic(), status, tries, cut, not_ready))

    def between(self, t0: float, t1: float | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.sent >= t0 and (t1 is None or r.sent < t1)]

    @staticmethod
    def summary(records: list[Record]) -> dict:
        """requests_sent, requests_failed (final status not 200, by status), retried (needed more than one
        try), cut (tries cut after their headers), and the p50/p99 latency of the successful ones in ms."""
        failed = Counter(str(r.status) for r in records if r.status != 200)
        lat = sorted((r.done - r.sent) * 1e3 for r in records if r.status == 200)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

        return {"requests_sent": len(records), "requests_failed": sum(failed.values()),
                "failed_by_status": dict(failed), "retried": sum(r.tries > 1 for r in records),
                "cut_after_headers": sum(r.cut for r in records),
                "ingress_not_ready": sum(r.not_ready for r in records), "p50_ms": pct(0.5), "p99_ms": pct(0.99)}
