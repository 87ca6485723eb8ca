"""Shared by the Serve integration tests: a temp registry with two versions of a small untrained model,
the session's Serve HTTP port, polling, a background HTTP load that records every response, and the HTTP
calls the monitor and retrain tests make (predict with request ids, feedback, the monitor report)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import requests
import torch

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.monitor.profile import ReferenceProfile
from raysys.registry import Registry
from serve.contract import DEFAULT_MONITOR_NAMESPACE
from serve.ingress import free_port

MODEL = "student"
TIMEOUT_S = 120  # generous: a 2-core box running other suites beside this one


def make_registry(root):
    """v1 (production) and v2 of a small TabularMLP, with a reference profile so the monitor runs.
    Returns (registry, schema, rows without the label)."""
    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=3, num_classes=3, seed=11)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(1000, [11, 1])
    pre = Preprocessor.fit(schema, table)
    profile = ReferenceProfile.from_table(schema, table, num_bins=10).to_dict()
    reg = Registry(root / "registry")
    spec = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    for seed in (1, 2):
        torch.manual_seed(seed)
        reg.register(MODEL, state_dict=build_model(spec).state_dict(), model_spec=spec, schema=schema,
                     preprocessor=pre, metrics={"accuracy": 0.1 * seed}, config={"seed": seed},
                     lineage={"note": f"untrained, seed {seed}"}, reference_profile=profile)
    reg.set_alias(MODEL, "production", 1)
    rows = table.drop_columns([schema.label]).to_pylist()
    return reg, schema, rows


def serve_http_port(request) -> int:
    """Serve's HTTP port in this session (cluster-wide: the first test to start Serve picks it)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        return int(client.http_config.port)
    try:
        port = request.getfixturevalue("serve_port")
    except Exception:
        port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def poll(fn, timeout_s=TIMEOUT_S, interval_s=0.25, what="condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value {last!r}")


class Load:
    """`workers` threads posting one-row predictions back to back (each with its own keep-alive session)
    until stopped; every response (status, model version, time) or connection error is recorded."""

    def __init__(self, url: str, rows: list[dict], workers: int = 4, headers: dict | None = None):
        self.url, self.rows, self.headers = url, rows, headers or {}
        # (time, status | None (no response) | "cut" (response started, body cut), version)
        self.results: list[tuple[float, int | str | None, int | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, workers), daemon=True) for i in range(workers)]

    def _run(self, i: int, step: int) -> None:
        k = i
        with requests.Session() as s:
            while not self._stop.is_set():
                row = self.rows[k % len(self.rows)]
                k += step
                try:
                    r = s.post(f"{self.url}/v1/predict", json={"instances": [row]}, headers=self.headers, timeout=30)
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    rec = (time.monotonic(), r.status_code, version)
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except requests.exceptions.ChunkedEncodingError as e:
                    # the status line and headers came, the body was cut: the replica died mid-response,
                    # after the point where any proxy could still retry the request
                    rec = (time.monotonic(), "cut", None)
                    self.errors.append(f"{type(e).__name__}: {e}")
                except requests.RequestException as e:
                    rec = (time.monotonic(), None, None)
                    self.errors.append(f"{type(e).__name__}: {e}")
                with self._lock:
                    self.results.append(rec)

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self.t1 = time.monotonic()

    def since(self, t: float) -> list[tuple[float, int | None, int | None]]:
        with self._lock:
            return [r for r in self.results if r[0] >= t]

    def wait_for(self, n: int, timeout_s: float = TIMEOUT_S) -> None:
        """Until `n` more responses have come back."""
        start = len(self.results)
        poll(lambda: len(self.results) >= start + n, timeout_s, 0.05, f"{n} responses under load")

    def summary(self) -> dict:
        statuses = Counter(r[1] for r in self.results)
        return {"requests": len(self.results), "statuses": dict(statuses),
                "versions": dict(Counter(r[2] for r in self.results if r[2] is not None)),
                "rate_per_s": len(self.results) / max(1e-9, self.t1 - self.t0), "errors": self.errors[:5]}

    def worst_rate(self, window_s: float = 2.0) -> float:
        """The lowest request rate over any `window_s` window of the run (the load must never stall)."""
        times = sorted(r[0] for r in self.results)
        if self.t1 - self.t0 < window_s:
            return len(times) / max(1e-9, self.t1 - self.t0)
        worst, j = float("inf"), 0
        start = self.t0
        while start + window_s <= self.t1:
            while j < len(times) and times[j] < start:
                j += 1
            k = j
            while k < len(times) and times[k] < start + window_s:
                k += 1
            worst = min(worst, (k - j) / window_s)
            start += window_s / 2
        return worst


def kill_monitor(name: str) -> None:
    """Remove a test's monitor actor for good (no restart), if it is still there."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=DEFAULT_MONITOR_NAMESPACE), no_restart=True)
    except ValueError:
        pass


def monitor_report(s: requests.Session, url: str) -> dict | None:
    r = s.get(f"{url}/v1/monitor", timeout=30)
    return r.json() if r.status_code == 200 else None  # 503 while the monitor actor starts


def predict_rows(s: requests.Session, url: str, rows: list[dict], prefix: str, size: int = 100
                 ) -> tuple[list[str], list[str]]:
    """POST the rows `size` at a time, each request with its own request_id; returns the ids and the
    predicted class of every row."""
    ids, preds = [], []
    for i in range(0, len(rows), size):
        rid = f"{prefix}-{i // size}"
        r = s.post(f"{url}/v1/predict", json={"instances": rows[i:i + size], "request_id": rid}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == rid
        ids.append(rid)
        preds.extend(r.json()["predictions"])
    return ids, preds


def send_feedback(s: requests.Session, url: str, ids: list[str], labels: list[int], size: int = 100) -> None:
    items = [{"request_id": rid, "label": labels[k * size:(k + 1) * size]} for k, rid in enumerate(ids)]
    r = s.post(f"{url}/v1/feedback", json={"feedback": items}, timeout=60)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == len(items)


def register_failing_version(reg) -> int:
    """A version that loads (sha256, strict weights) but fails at forward for most inputs: its model spec
    says every categorical feature has 1 category, so a row with a category index >= 1 indexes past its
    embedding table (IndexError), as a candidate trained on another schema would. Returns its number."""
    v2 = reg.load(MODEL, 2)
    spec = dict(v2.model_spec, cardinalities=[1] * len(v2.schema.categorical))
    torch.manual_seed(3)
    return reg.register(MODEL, state_dict=build_model(spec).state_dict(), model_spec=spec, schema=v2.schema,
                        preprocessor=v2.preprocessor, metrics={"accuracy": 0.9}, config={"seed": 3},
                        lineage={"note": "fails at forward"}, reference_profile=v2.reference_profile)


def routed_to_candidate(request_id: str, percent: float) -> bool:
    """Whether the endpoint routes `request_id` to the candidate at `percent`% (its hash, as serve.scoring)."""
    from serve.scoring import route_version

    return route_version(request_id, False, True, percent)  # type: ignore[arg-type]
