"""The monitor's `raysys_*` metrics on the Ray dashboard / Prometheus (`ray.util.metrics`).

Made only inside a Ray actor: metrics made in a driver or a unit test would go nowhere (or need a running
Ray). `dashboard_metrics` is what `get_or_create_monitor` hands the actor's `Monitor`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import ray

# log-spaced from 0.5 ms to 5 s: 5 buckets per decade (Ray needs explicit, positive, increasing bounds)
LATENCY_BOUNDARIES_MS = [round(float(b), 3) for b in np.logspace(math.log10(0.5), math.log10(5000.0), 21)]
PREDICTION_TAG = "_prediction"  # feature tag of the prediction-drift gauges
# a Ray Histogram.observe costs microseconds per call: a batch feeds at most this many latencies to the
# dashboard's histogram (its quantiles, so the shape is kept); counts come from raysys_requests_total and
# the exact p50/p95/p99 from the monitor's own log histogram (raysys_request_latency_quantile_ms)
MAX_HISTOGRAM_OBSERVES = 32


def histogram_sample(values: np.ndarray, k: int = MAX_HISTOGRAM_OBSERVES) -> np.ndarray:
    """At most `k` values standing for `values` in a histogram: all of them, or `k` evenly spaced order
    statistics (min and max included)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) <= k:
        return values
    return np.sort(values)[np.linspace(0, len(values) - 1, k).round().astype(int)]


def dashboard_metrics() -> DashboardMetrics | None:
    """The dashboard metrics when called inside a Ray actor, else None."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return DashboardMetrics()
    return None


class DashboardMetrics:
    """Counters per batch and alert; gauges refreshed with the window tests (`set_gauges`)."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        feat, ver = ("feature",), ("model_version",)
        self.m = {
            "psi": Gauge("raysys_drift_psi", description="PSI of a feature's window vs the reference.", tag_keys=feat),
            "js": Gauge("raysys_drift_js", description="Jensen-Shannon divergence of a feature's window.",
                        tag_keys=feat),
            "stat": Gauge("raysys_drift_statistic", description="Window test statistic (KS or chi2).", tag_keys=feat),
            "pvalue": Gauge("raysys_drift_pvalue", description="Window test p-value (adjusted).", tag_keys=feat),
            "drifted": Gauge("raysys_drift_feature_drifted", description="1 when a feature drifted.", tag_keys=feat),
            "alert": Gauge("raysys_drift_alert", description="1 while the window tests find dataset-level drift."),
            "det_score": Gauge("raysys_drift_detector_score", description="Online detector: current max chart score."),
            "det_threshold": Gauge("raysys_drift_detector_threshold",
                                   description="Online detector: alarm threshold (calibrated to the ERT)."),
            "det_alarms": Counter("raysys_drift_detector_alarms_total", description="Online detector alarms."),
            "latency": Histogram("raysys_request_latency_ms", description="Request latency (ms).",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=ver),
            "lat_q": Gauge("raysys_request_latency_quantile_ms", description="Latency p50/p95/p99 (ms).",
                           tag_keys=("model_version", "quantile")),
            "predictions": Counter("raysys_predictions_total", description="Rows predicted.", tag_keys=ver),
            "requests": Counter("raysys_requests_total", description="Requests seen.", tag_keys=ver),
            "errors": Counter("raysys_request_errors_total", description="Failed requests.", tag_keys=ver),
            "rps": Gauge("raysys_requests_per_s", description="Requests per second (last minute)."),
            "error_rate": Gauge("raysys_request_error_rate", description="Failed / all requests (last minute)."),
            "acc_real": Gauge("raysys_accuracy_realised", description="Accuracy on joined labels."),
            "acc_est": Gauge("raysys_accuracy_estimated",
                             description="Confidence-based accuracy estimate over the window."),
            "acc_est_unl": Gauge("raysys_accuracy_estimated_unlabelled",
                                 description="Confidence-based accuracy estimate of the traffic whose labels have "
                                             "not arrived."),
            "alerts": Counter("raysys_alerts_total", description="Alerts raised.", tag_keys=("kind",)),
            # status: SUCCEEDED / FAILED / STOPPED (how a submitted job ended) or SUBMIT_FAILED (no job ran)
            "retrain": Counter("raysys_retrain_jobs_total", description="Retrain jobs by how they ended.",
                               tag_keys=("status",)),
        }

    def record_batch(self, key: str, rows: int, latency: np.ndarray, errors: int, alarms: int) -> None:
        m, tags = self.m, {"model_version": key}
        if rows:
            m["predictions"].inc(rows, tags=tags)
        if len(latency):
            m["requests"].inc(len(latency), tags=tags)
            hist = m["latency"]
            for v in histogram_sample(latency).tolist():
                hist.observe(v, tags=tags)
        if errors:
            m["errors"].inc(errors, tags=tags)
        if alarms:
            m["det_alarms"].inc(alarms)

    def alert(self, kind: str) -> None:
        self.m["alerts"].inc(1, tags={"kind": kind})

    def retrain_ended(self, status: str) -> None:
        self.m["retrain"].inc(1, tags={"status": status})

    def set_gauges(self, window: dict[str, Any], acc: dict[str, Any], detector, latency_hist: dict[str, Any],
                   rates: tuple[float, float, float]) -> None:
        """Drift gauges from the window tests' result, the detector's score and threshold, latency quantiles
        per model version, throughput and accuracy."""
        self._drift(window, detector)
        m = self.m
        for ver, h in latency_hist.items():
            s = h.summary()
            for q in ("p50", "p95", "p99"):
                if s[q] is not None:
                    m["lat_q"].set(s[q], tags={"model_version": ver, "quantile": q})
        req_s, _, err_rate = rates
        m["rps"].set(req_s)
        m["error_rate"].set(err_rate)
        for name, key in (("acc_real", "realised"), ("acc_est", "estimated"), ("acc_est_unl", "estimated_unlabelled")):
            if acc[key] is not None:
                m[name].set(acc[key])

    def _drift(self, window: dict[str, Any], detector) -> None:
        m = self.m
        for name, f in window["features"].items():
            tags = {"feature": name}
            m["psi"].set(f["psi"], tags=tags)
            m["js"].set(f["js"], tags=tags)
            m["stat"].set(f["statistic"], tags=tags)
            m["pvalue"].set(f["p_adjusted"], tags=tags)
            m["drifted"].set(1.0 if f["drifted"] else 0.0, tags=tags)
        if window["prediction"].get("psi") is not None:
            m["psi"].set(window["prediction"]["psi"], tags={"feature": PREDICTION_TAG})
        m["alert"].set(1.0 if window["dataset"]["drifted"] else 0.0)
        if detector is not None:
            d = detector.describe()
            if d["max_score"] is not None:
                m["det_score"].set(d["max_score"])
            m["det_threshold"].set(detector.threshold)


class LinkMetrics:
    """A Serve replica's side of the monitor link: rows it dropped instead of shipping (buffer full, monitor
    unavailable or too far behind). Exported as a delta of the link's own running count."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.dropped = Counter("raysys_monitor_rows_dropped_total",
                               description="Traffic rows a replica dropped instead of sending to the monitor.")
        self._exported = 0

    def export(self, rows_dropped: int) -> None:
        if rows_dropped > self._exported:
            self.dropped.inc(rows_dropped - self._exported)
            self._exported = rows_dropped


def link_metrics() -> LinkMetrics | None:
    """The replica's link metrics when called inside a Ray actor (a Serve replica), else None."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return LinkMetrics()
    return None
