"""The monitor: a plain `Monitor` class (unit-testable without Ray) and `MonitorActor`, its Ray actor.

Serving replicas send `record(batch)` fire-and-forget to one named, detached actor
(`get_or_create_monitor`); `report()` returns a JSON dict with per-feature PSI over a sliding window,
prediction drift against the reference class priors, latency percentiles, throughput and alerts.
Inside Ray the actor also exports `raysys_*` metrics to the Ray dashboard / Prometheus.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raysys.config import MonitorConfig
from raysys.data.schema import DatasetSchema
from raysys.monitor.drift import RingBuffer, SlidingWindow, bin_numeric, latency_percentiles, psi
from raysys.monitor.profile import ReferenceProfile

# log-spaced from 0.5 ms to 5 s: 5 buckets per decade (Ray needs explicit, positive, increasing bounds)
LATENCY_BOUNDARIES_MS = [round(float(b), 3) for b in np.logspace(math.log10(0.5), math.log10(5000.0), 21)]
RATE_WINDOW_S = 60.0
GAUGE_INTERVAL_S = 5.0
PREDICTION_TAG = "_prediction"  # feature tag of the prediction-drift PSI gauge


class Monitor:
    """Streaming drift, latency and throughput statistics for one served model.

    Args:
        profile: ReferenceProfile.to_dict() of the model's training split (or the profile itself).
        schema: DatasetSchema dict (or object) of the model; None to take feature names from the profile.
        monitor_cfg: MonitorConfig fields (dict or object); None for the defaults.
        model_version: the version the profile belongs to (reported, and the default metric tag).
        clock: seconds, monotonic; injectable for tests.
    """

    def __init__(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                 monitor_cfg: dict | MonitorConfig | None = None, model_version: str | int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if isinstance(monitor_cfg, MonitorConfig):
            self.cfg = monitor_cfg
        else:
            self.cfg = MonitorConfig.model_validate(monitor_cfg or {})
        self._clock = clock
        self._metrics: dict[str, Any] | None = None
        self._metrics_checked = False
        self._last_gauge_t = -math.inf
        self.set_profile(profile, schema, model_version)

    # ----- setup -----
    def set_profile(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                    model_version: str | int | None = None) -> None:
        """Compare against a new reference (a new model version); clears the windows and counters."""
        prof = ReferenceProfile.from_dict(profile)
        if schema is not None:
            schema_obj = schema if isinstance(schema, DatasetSchema) else DatasetSchema.model_validate(schema)
            prof.check_schema(schema_obj)
        self.profile = prof
        self.model_version = None if model_version is None else str(model_version)
        self.num_classes = len(prof.classes) if prof.classes else None
        self._n_num = len(prof.numeric)
        self._n_cat = len(prof.categorical)
        self._cat_bins = np.array([c.num_bins for c in prof.categorical], dtype=np.int64)
        # window columns: numeric bins, category indices, then the predicted class (num_classes = missing)
        cols = prof.bin_counts + ([self.num_classes] if self.num_classes else [])
        self.window = SlidingWindow(cols, self.cfg.window_size)
        self.latencies = RingBuffer(self.cfg.latency_window, 1, dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        """Forget all live traffic (windows, latencies, counters); keep the reference."""
        self.window.clear()
        self.latencies.clear()
        self.rows_seen = 0
        self.requests_seen = 0
        self.predictions_by_version: dict[str, int] = {}
        self._rate: deque[list[float]] = deque()  # [second, requests, rows], one entry per second
        self._started = self._clock()
        self._last_gauge_t = -math.inf

    # ----- metrics (only inside a Ray actor) -----
    def _ray_metrics(self) -> dict[str, Any] | None:
        if not self._metrics_checked:
            self._metrics_checked = True
            # created lazily, in the actor process: metrics made in a driver or in a unit test would go
            # nowhere (or need a running Ray)
            if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
                from ray.util.metrics import Counter, Gauge, Histogram

                self._metrics = {
                    "psi": Gauge("raysys_drift_psi", description="PSI of a feature's live window vs the reference.",
                                 tag_keys=("feature",)),
                    "alert": Gauge("raysys_drift_alert",
                                   description="1 while at least one feature's PSI is above the threshold."),
                    "latency": Histogram("raysys_request_latency_ms", description="Request latency (ms).",
                                         boundaries=LATENCY_BOUNDARIES_MS),
                    "predictions": Counter("raysys_predictions_total", description="Rows predicted.",
                                           tag_keys=("model_version",)),
                }
        return self._metrics

    # ----- record -----
    def record(self, batch: dict[str, Any]) -> None:
        """Add a batch: x_num float [n, n_num] raw, x_cat int [n, n_cat], pred int [n] (optional),
        latency_ms list (one per request), model_version (optional; defaults to the profile's)."""
        x_num = np.asarray(batch["x_num"], dtype=np.float64)
        x_cat = np.asarray(batch["x_cat"], dtype=np.int64)
        n = len(x_num)
        if x_num.ndim == 1 and n == 0:
            x_num = x_num.reshape(0, self._n_num)
        if x_cat.ndim == 1 and len(x_cat) == 0:
            x_cat = x_cat.reshape(0, self._n_cat)
        if x_num.shape != (n, self._n_num) or x_cat.shape != (n, self._n_cat):
            raise ValueError(f"monitor.record: expected x_num [n, {self._n_num}] and x_cat [n, {self._n_cat}], "
                             f"got {x_num.shape} and {x_cat.shape}")
        if n and self._n_cat and ((x_cat < 0).any() or (x_cat >= self._cat_bins).any()):
            raise ValueError("monitor.record: category index outside the profile's categories")
        latency = batch.get("latency_ms")
        latency = np.asarray([] if latency is None else latency, dtype=np.float64).ravel()
        version = batch.get("model_version")
        version = self.model_version if version is None else str(version)
        if n:
            codes = np.empty((n, self.window.ring.buf.shape[1]), dtype=np.int32)
            codes[:, :self._n_num] = bin_numeric(self.profile, x_num)
            codes[:, self._n_num:self._n_num + self._n_cat] = x_cat
            if self.num_classes:
                pred = batch.get("pred")
                if pred is None:
                    codes[:, -1] = self.num_classes  # "no prediction": left out of the counts
                else:
                    pred = np.asarray(pred, dtype=np.int64).ravel()
                    if len(pred) != n:
                        raise ValueError(f"monitor.record: pred has {len(pred)} entries for {n} rows")
                    codes[:, -1] = np.where((pred >= 0) & (pred < self.num_classes), pred, self.num_classes)
            self.window.add(codes)
            self.rows_seen += n
            key = version if version is not None else "unknown"
            self.predictions_by_version[key] = self.predictions_by_version.get(key, 0) + n
        self.latencies.add(latency.reshape(-1, 1))
        self.requests_seen += len(latency)
        now = self._clock()
        sec = math.floor(now)
        if self._rate and self._rate[-1][0] == sec:
            self._rate[-1][1] += len(latency)
            self._rate[-1][2] += n
        else:
            self._rate.append([sec, len(latency), n])
        metrics = self._ray_metrics()
        if metrics is not None:
            if n:
                metrics["predictions"].inc(n, tags={"model_version": version or "unknown"})
            hist = metrics["latency"]
            for v in latency.tolist():
                hist.observe(v)
            # drift gauges are refreshed every few seconds, not per batch, to keep record cheap
            if now - self._last_gauge_t >= GAUGE_INTERVAL_S:
                self._update_gauges(self._drift())

    # ----- report -----
    def _drift(self) -> dict[str, Any]:
        counts = self.window.all_counts()
        rows = len(self.window)
        armed = rows >= self.cfg.min_rows
        features: dict[str, dict[str, Any]] = {}
        refs = [(f, "numeric") for f in self.profile.numeric] + [(f, "categorical") for f in self.profile.categorical]
        for j, (ref, kind) in enumerate(refs):
            value = psi(ref.ref_props, counts[j])
            features[ref.name] = {"kind": kind, "psi": value, "drifted": bool(armed and value > self.cfg.psi_threshold)}
        prediction: dict[str, Any] = {"classes": list(self.profile.classes), "psi": None, "drifted": False,
                                      "current": None, "reference": None, "rows": 0}
        if self.num_classes:
            pc = counts[-1]
            total = int(pc.sum())
            prediction["rows"] = total
            prediction["current"] = (pc / total).tolist() if total else None
            if self.profile.class_priors is not None:
                prediction["reference"] = self.profile.class_priors.tolist()
                if total:
                    value = psi(self.profile.class_priors, pc)
                    prediction["psi"] = value
                    prediction["drifted"] = bool(total >= self.cfg.min_rows and value > self.cfg.psi_threshold)
        alerts = [name for name, f in features.items() if f["drifted"]]
        return {"window_rows": rows, "features": features, "prediction": prediction, "alerts": alerts}

    def _update_gauges(self, drift: dict[str, Any]) -> None:
        metrics = self._ray_metrics()
        self._last_gauge_t = self._clock()
        if metrics is None:
            return
        for name, f in drift["features"].items():
            metrics["psi"].set(f["psi"], tags={"feature": name})
        if drift["prediction"]["psi"] is not None:
            metrics["psi"].set(drift["prediction"]["psi"], tags={"feature": PREDICTION_TAG})
        metrics["alert"].set(1.0 if drift["alerts"] else 0.0)

    def _throughput(self) -> tuple[float, float]:
        now = self._clock()
        cutoff = math.floor(now) - RATE_WINDOW_S
        while self._rate and self._rate[0][0] <= cutoff:
            self._rate.popleft()
        # over the last minute, or since (re)start when that is shorter
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        requests = sum(e[1] for e in self._rate)
        rows = sum(e[2] for e in self._rate)
        return requests / span, rows / span

    def report(self) -> dict[str, Any]:
        """JSON-able summary; also refreshes the dashboard gauges."""
        drift = self._drift()
        self._update_gauges(drift)
        req_s, rows_s = self._throughput()
        lat = latency_percentiles(self.latencies.buf[:len(self.latencies), 0])
        lat["count"] = len(self.latencies)
        return {
            "model_version": self.model_version,
            "rows_seen": self.rows_seen,
            "requests_seen": self.requests_seen,
            "window_rows": drift["window_rows"],
            "window_size": self.cfg.window_size,
            "min_rows": self.cfg.min_rows,
            "psi_threshold": self.cfg.psi_threshold,
            "num_bins": self.profile.num_bins,
            "armed": drift["window_rows"] >= self.cfg.min_rows,
            "features": drift["features"],
            "alerts": drift["alerts"],
            "drift_detected": bool(drift["alerts"]),
            "prediction": drift["prediction"],
            "predictions_by_version": dict(self.predictions_by_version),
            "latency_ms": lat,
            "requests_per_s": req_s,
            "rows_per_s": rows_s,
            "uptime_s": self._clock() - self._started,
            "metrics_enabled": self._ray_metrics() is not None,
        }

    def ping(self) -> bool:
        return True


# num_cpus=0: the monitor must never take a CPU that training or serving needs; max_restarts=-1: a
# crashed monitor comes back (empty) instead of breaking every replica's fire-and-forget calls
MonitorActor = ray.remote(num_cpus=0, max_restarts=-1)(Monitor)


def get_or_create_monitor(name: str = "raysys_monitor", namespace: str = "raysys", **init_kwargs):
    """The named, detached monitor actor: created on first call, the same handle afterwards.

    `init_kwargs` (profile, schema, monitor_cfg, model_version) are used only when the actor is
    created; call `handle.set_profile.remote(...)` to point an existing monitor at a new model version.
    Detached: it outlives the job that made it; end it with `ray.kill(handle)`.
    """
    return MonitorActor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                                max_restarts=-1, num_cpus=0).remote(**init_kwargs)
