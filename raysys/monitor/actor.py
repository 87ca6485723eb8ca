"""The monitor: a plain `Monitor` class (unit-testable without Ray) and `MonitorActor`, its Ray actor.

Serving replicas send `record(batch)` fire-and-forget to one named, detached actor
(`get_or_create_monitor`). Per batch the monitor

- appends the rows to a sliding window (raw numeric values, category indices, predicted classes and
  probabilities) on which `report()` runs the window tests (PSI, Jensen-Shannon, KS against the binned
  reference CDF, chi-squared; BH or Bonferroni across features; a dataset-level decision);
- feeds every row to the online detector (`raysys.monitor.online`), whose threshold was calibrated at
  registration to `monitor.ert` rows between false alarms;
- adds latencies to a log-bucket histogram per model version, and counts requests, rows and errors;
- logs predictions by request_id so `record_feedback(request_id, label)` can join delayed labels; the joined
  labels give the realised accuracy and re-fit, online, the confidence map behind the accuracy estimate of
  the traffic still waiting for its labels (`raysys.monitor.accuracy`).

A confirmed drift (an online alarm, or the window tests' dataset-level decision) or an accuracy drop
records an alert and, with `monitor.on_drift: retrain`, submits `jobs/retrain.py` through the Ray Jobs
API (one in flight, with a cooldown). With `monitor.snapshot_uri` set the state is snapshotted to storage
and restored when the actor restarts; with `monitor.traffic_uri` recent traffic is written as rotated
Parquet, and the joined labels beside it (`<traffic_uri>/labels`: request_id, row, label), which is what
the retrain job trains and judges the candidate on. Inside Ray the actor exports `raysys_*` metrics to the
Ray dashboard / Prometheus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from raysys.config import MonitorConfig
from raysys.data.schema import DatasetSchema
from raysys.monitor.accuracy import AccuracyTracker, OnlineRecalibration, PredictionLog
from raysys.monitor.drift import RingBuffer, WindowTester, latency_percentiles
from raysys.monitor.latency import LogHistogram
from raysys.monitor.online import detector_for, is_current, score_rows, threshold_for_ert
from raysys.monitor.profile import ReferenceProfile

log = logging.getLogger("raysys")

# log-spaced from 0.5 ms to 5 s: 5 buckets per decade (Ray needs explicit, positive, increasing bounds)
LATENCY_BOUNDARIES_MS = [round(float(b), 3) for b in np.logspace(math.log10(0.5), math.log10(5000.0), 21)]
RATE_WINDOW_S = 60.0
GAUGE_INTERVAL_S = 5.0  # window tests, gauges and snapshots run at most this often from `record`
PREDICTION_TAG = "_prediction"  # feature tag of the prediction-drift gauges
MAX_ALERTS = 200
# a Ray Histogram.observe costs microseconds per call: a batch feeds at most this many latencies to the
# dashboard's histogram (its quantiles, so the shape is kept); counts come from raysys_requests_total and
# the exact p50/p95/p99 from the monitor's own log histogram (raysys_request_latency_quantile_ms)
MAX_HISTOGRAM_OBSERVES = 32
SNAPSHOT_PREDICTION_LOG = 20_000  # request ids kept in a snapshot (the rest are re-learnt from traffic)


def histogram_sample(values: np.ndarray, k: int = MAX_HISTOGRAM_OBSERVES) -> np.ndarray:
    """At most `k` values standing for `values` in a histogram: all of them, or `k` evenly spaced order
    statistics (min and max included)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) <= k:
        return values
    return np.sort(values)[np.linspace(0, len(values) - 1, k).round().astype(int)]


class Monitor:
    """Streaming drift, latency, throughput and accuracy statistics for one served model.

    Args:
        profile: ReferenceProfile.to_dict() of the model (or the profile itself).
        schema: DatasetSchema dict (or object) of the model; None to take feature names from the profile.
        monitor_cfg: MonitorConfig fields (dict or object); None for the defaults.
        model_version: the version the profile belongs to (reported, and the default metric tag).
        clock: seconds, monotonic; injectable for tests.
        snapshot_key: name of this monitor's snapshot under `monitor.snapshot_uri` (the actor's name).
        retrain_submit / retrain_status: injectable Jobs API calls (tests); default JobSubmissionClient.
    """

    def __init__(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                 monitor_cfg: dict | MonitorConfig | None = None, model_version: str | int | None = None,
                 clock: Callable[[], float] = time.monotonic, snapshot_key: str = "raysys_monitor",
                 retrain_submit: Callable | None = None, retrain_status: Callable | None = None):
        from raysys.monitor.retrain import RetrainTrigger, labels_uri

        if isinstance(monitor_cfg, MonitorConfig):
            self.cfg = monitor_cfg
        else:
            self.cfg = MonitorConfig.model_validate(monitor_cfg or {})
        self._clock = clock
        self._metrics: dict[str, Any] | None = None
        self._metrics_checked = False
        self._last_tick = -math.inf
        self._last_snapshot = clock()
        self.snapshot_key = snapshot_key
        self.retrain = RetrainTrigger(enabled=self.cfg.on_drift == "retrain", cooldown_s=self.cfg.retrain_cooldown_s,
                                      args=list(self.cfg.retrain_args), address=self.cfg.retrain_address,
                                      submit=retrain_submit, status=retrain_status,
                                      metadata={"raysys_monitor": snapshot_key})
        self.store = None
        if self.cfg.snapshot_uri:
            from raysys.monitor.store import SnapshotStore

            self.store = SnapshotStore(self.cfg.snapshot_uri, snapshot_key)
        self.traffic = None
        self.label_writer = None  # joined feedback labels, beside the traffic (same rotation, same PII rules)
        self._pending_labels: list[tuple] = []
        self._last_flush = clock()
        if self.cfg.traffic_uri:
            from raysys.monitor.store import TrafficWriter

            opts = dict(rows_per_file=self.cfg.traffic_rows_per_file, max_files=self.cfg.traffic_max_files,
                        drop_columns=self.cfg.traffic_drop_columns, hash_columns=self.cfg.traffic_hash_columns)
            self.traffic = TrafficWriter(self.cfg.traffic_uri, **opts)
            self.label_writer = TrafficWriter(labels_uri(self.traffic.root), **opts)
        self.restored = False
        self.set_profile(profile, schema, model_version)
        if self.store is not None:
            self.restored = self._restore()

    # ----- setup -----
    def set_profile(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                    model_version: str | int | None = None) -> None:
        """Compare against a new reference (a new model version); clears the windows and counters."""
        prof = ReferenceProfile.from_dict(profile)
        if schema is not None:
            schema_obj = schema if isinstance(schema, DatasetSchema) else DatasetSchema.model_validate(schema)
            prof.check_schema(schema_obj)
        self.profile = prof
        self.profile_hash = hashlib.sha256(json.dumps(prof.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        self.model_version = None if model_version is None else str(model_version)
        self.num_classes = len(prof.classes) or None
        self._n_num = len(prof.numeric)
        self._n_cat = len(prof.categorical)
        self._cat_bins = np.array([c.num_bins for c in prof.categorical], dtype=np.int64)
        self.tester = WindowTester(prof)
        W = self.cfg.window_size
        self.win_num = RingBuffer(W, self._n_num, dtype=np.float64)
        self.win_cat = RingBuffer(W, self._n_cat, dtype=np.int64)
        self.win_pred = RingBuffer(W, 1, dtype=np.int64)
        self.win_proba = RingBuffer(W, max(self.num_classes or 0, 1), dtype=np.float32)
        self.latencies = RingBuffer(self.cfg.latency_window, 1, dtype=np.float64)
        self.detector = None
        self.detector_info: dict[str, Any] = {"calibrated": False}
        if prof.detector and not is_current(prof.detector):
            log.warning("monitor: the reference profile's online detector was calibrated by an older raysys; "
                        "online detection is off until the profile is recalibrated (re-register the model)")
            self.detector_info = {"calibrated": False, "why": "calibrated for an older detector; recalibrate"}
        elif prof.detector:
            threshold, extrapolated = threshold_for_ert(prof.detector, self.cfg.ert)
            self.detector = detector_for(prof, threshold)
            self.detector_info = {"calibrated": True, "ert": self.cfg.ert, "threshold": threshold,
                                  "extrapolated": extrapolated, "calibrated_ert": prof.detector.get("ert"),
                                  "calibration": prof.detector.get("calibration")}
        self.reset()

    def reset(self) -> None:
        """Forget all live traffic (windows, detector, latencies, counters, labels, alerts); keep the reference."""
        for ring in (self.win_num, self.win_cat, self.win_pred, self.win_proba, self.latencies):
            ring.clear()
        if self.detector is not None:
            self.detector.reset()
            self.detector.alarms = self.detector.rows = 0
        self.rows_seen = 0
        self.requests_seen = 0
        self.errors_seen = 0
        self.predictions_by_version: dict[str, int] = {}
        self.latency_hist: dict[str, LogHistogram] = {}
        self.errors_by_version: dict[str, int] = {}
        self._rate: deque[list[float]] = deque()  # [second, requests, rows, errors], one entry per second
        self.pred_log = PredictionLog(self.cfg.prediction_log_size)
        self.accuracy = AccuracyTracker(self.cfg.feedback_window)
        self.recal = OnlineRecalibration(self.cfg.feedback_window, self.cfg.recalibration_prior_rows,
                                         self.cfg.recalibration_bins)
        self.alert_events: list[dict[str, Any]] = []
        self._window_alerting = False
        self._accuracy_alerting = False
        self._started = self._clock()
        self._last_tick = -math.inf
        self._last_window: dict[str, Any] | None = None

    # ----- metrics (only inside a Ray actor) -----
    def _ray_metrics(self) -> dict[str, Any] | None:
        if not self._metrics_checked:
            self._metrics_checked = True
            # created lazily, in the actor process: metrics made in a driver or in a unit test would go
            # nowhere (or need a running Ray)
            if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
                from ray.util.metrics import Counter, Gauge, Histogram

                feat, ver = ("feature",), ("model_version",)
                self._metrics = {
                    "psi": Gauge("raysys_drift_psi", description="PSI of a feature's window vs the reference.",
                                 tag_keys=feat),
                    "js": Gauge("raysys_drift_js", description="Jensen-Shannon divergence of a feature's window.",
                                tag_keys=feat),
                    "stat": Gauge("raysys_drift_statistic", description="Window test statistic (KS or chi2).",
                                  tag_keys=feat),
                    "pvalue": Gauge("raysys_drift_pvalue", description="Window test p-value (adjusted).",
                                    tag_keys=feat),
                    "drifted": Gauge("raysys_drift_feature_drifted", description="1 when a feature drifted.",
                                     tag_keys=feat),
                    "alert": Gauge("raysys_drift_alert",
                                   description="1 while the window tests find dataset-level drift."),
                    "det_score": Gauge("raysys_drift_detector_score",
                                       description="Online detector: current max chart score."),
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
                                         description="Confidence-based accuracy estimate of the traffic whose "
                                                     "labels have not arrived."),
                    "alerts": Counter("raysys_alerts_total", description="Alerts raised.", tag_keys=("kind",)),
                }
        return self._metrics

    # ----- record -----
    def record(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add a batch: x_num float [n, n_num] raw, x_cat int [n, n_cat], pred int [n] (optional), proba
        float [n, K] (optional), latency_ms list (one per request), model_version (optional; defaults to
        the profile's), request_ids (optional, one per request), rows_per_request (optional, one per
        request; default one row each), errors (optional: requests that failed). Returns the alarms."""
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
        key = version if version is not None else "unknown"
        pred = batch.get("pred")
        proba = batch.get("proba")
        if proba is not None:
            proba = np.asarray(proba, dtype=np.float64)
            if proba.shape != (n, self.num_classes or 0):
                raise ValueError(f"monitor.record: proba must be [n, {self.num_classes}], got {proba.shape}")
            if pred is None:
                pred = proba.argmax(1)
        if pred is not None:
            pred = np.asarray(pred, dtype=np.int64).ravel()
            if len(pred) != n:
                raise ValueError(f"monitor.record: pred has {len(pred)} entries for {n} rows")
            k = self.num_classes or 0
            pred = np.where((pred >= 0) & (pred < k), pred, -1)
        else:
            pred = np.full(n, -1, dtype=np.int64)
        alarms: list[dict[str, Any]] = []
        if n:
            self.win_num.add(x_num)
            self.win_cat.add(x_cat)
            self.win_pred.add(pred.reshape(-1, 1))
            self.win_proba.add(proba.astype(np.float32) if proba is not None
                               else np.full((n, self.win_proba.buf.shape[1]), np.nan, dtype=np.float32))
            self.rows_seen += n
            self.predictions_by_version[key] = self.predictions_by_version.get(key, 0) + n
            if self.detector is not None:
                alarms = self.detector.update(score_rows(self.profile, x_num, x_cat, proba))
                for a in alarms:
                    a["row_in_stream"] = self.rows_seen - n + a["row"]
                    self._alert("online", f"online detector alarm on {a['chart']} (run length {a['run_length']})",
                                features=a["features"], detail=a)
        self._log_requests(batch, pred, n, key, proba)
        self.latencies.add(latency.reshape(-1, 1))
        self.latency_hist.setdefault(key, LogHistogram()).add(latency)
        self.requests_seen += len(latency)
        errors = int(batch.get("errors") or 0)
        if errors:
            self.errors_seen += errors
            self.errors_by_version[key] = self.errors_by_version.get(key, 0) + errors
        now = self._clock()
        sec = math.floor(now)
        if self._rate and self._rate[-1][0] == sec:
            self._rate[-1][1] += len(latency)
            self._rate[-1][2] += n
            self._rate[-1][3] += errors
        else:
            self._rate.append([sec, len(latency), n, errors])
        if self.traffic is not None and n:
            self._write_traffic(batch, x_num, x_cat, pred, proba, key)
        metrics = self._ray_metrics()
        if metrics is not None:
            tags = {"model_version": key}
            if n:
                metrics["predictions"].inc(n, tags=tags)
            if len(latency):
                metrics["requests"].inc(len(latency), tags=tags)
                hist = metrics["latency"]
                for v in histogram_sample(latency).tolist():
                    hist.observe(v, tags=tags)
            if errors:
                metrics["errors"].inc(errors, tags=tags)
            if alarms:
                metrics["det_alarms"].inc(len(alarms))
        # window tests, gauges, accuracy alerts and snapshots every few seconds, not per batch
        if now - self._last_tick >= GAUGE_INTERVAL_S:
            self._tick()
        return {"alarms": alarms}

    def _log_requests(self, batch: dict[str, Any], pred: np.ndarray, n: int, key: str,
                      proba: np.ndarray | None) -> None:
        ids = batch.get("request_ids")
        if not ids:
            return
        per = batch.get("rows_per_request")
        per = [1] * len(ids) if per is None else [int(r) for r in per]
        if len(per) != len(ids) or sum(per) != n:
            raise ValueError(f"monitor.record: rows_per_request must give one count per request id summing to {n}")
        bounds = np.cumsum([0] + per)
        preds = pred.tolist()
        # the registration-time P(right) of each row, kept until its label comes: labelled, it re-fits the
        # confidence map; unlabelled, it is what the estimate for traffic without labels averages. Only rows
        # of the profile's own model (a canary's rows would need the candidate's map)
        pr = self.profile.prediction
        q0 = None
        if proba is not None and pr is not None and (self.model_version is None or key == self.model_version):
            q0 = pr.correct_probability(proba).tolist()
        for rid, lo, hi in zip(ids, bounds[:-1], bounds[1:]):
            self.pred_log.add(str(rid), key, tuple(preds[lo:hi]), None if q0 is None else tuple(q0[lo:hi]))

    def _write_traffic(self, batch, x_num, x_cat, pred, proba, key) -> None:
        prof = self.profile
        n = len(x_num)
        cols: dict[str, Any] = {"ts": np.full(n, time.time()), "model_version": [key] * n}
        ids = batch.get("request_ids")
        if ids:
            per = batch.get("rows_per_request") or [1] * len(ids)
            cols["request_id"] = [str(r) for r, k in zip(ids, per) for _ in range(int(k))]
            cols["row"] = np.asarray([i for k in per for i in range(int(k))], dtype=np.int64)  # joins labels
        for j, f in enumerate(prof.numeric):
            cols[f.name] = x_num[:, j]
        for j, f in enumerate(prof.categorical):
            cols[f.name] = np.asarray(f.categories, dtype=object)[x_cat[:, j]].tolist()
        cls = np.asarray(list(prof.classes) + [None], dtype=object)
        cols["prediction"] = cls[pred].tolist()
        if proba is not None:
            cols["confidence"] = proba.max(1)
        self.traffic.add(cols)

    # ----- feedback -----
    def record_feedback(self, request_id: str, label: Any) -> dict[str, Any]:
        """A delayed label for a logged request: a class name or index (a list of them for a request of
        several rows). Returns whether it matched a logged prediction and whether that was correct."""
        entry = self.pred_log.pop(str(request_id))
        if entry is None:
            self.accuracy.unmatched += 1
            return {"request_id": request_id, "matched": False}
        version, preds, q0 = entry
        labels = label if isinstance(label, (list, tuple)) else [label]
        if len(labels) != len(preds):
            raise ValueError(f"feedback: request {request_id} had {len(preds)} rows, got {len(labels)} labels")
        idx = []
        for lab in labels:
            if isinstance(lab, str):
                if lab not in self.profile.classes:
                    raise ValueError(f"feedback.label: unknown class {lab!r}; classes are {self.profile.classes}")
                idx.append(self.profile.classes.index(lab))
            elif isinstance(lab, (int, np.integer)) and not isinstance(lab, bool) and 0 <= lab < len(self.profile.classes):
                idx.append(int(lab))
            else:
                raise ValueError(f"feedback.label: must be a class name or index, got {lab!r}")
        correct = [p == y for p, y in zip(preds, idx)]
        self.accuracy.add(version, correct)
        if q0 is not None:
            self.recal.add(q0, correct)
        if self.label_writer is not None:
            now = time.time()
            self._pending_labels.extend((now, str(request_id), i, y, p, version)
                                        for i, (p, y) in enumerate(zip(preds, idx)))
        return {"request_id": request_id, "matched": True, "correct": correct}

    def record_feedback_batch(self, items: list[tuple[str, Any]]) -> dict[str, int]:
        """Labels from `/v1/feedback` (sent fire-and-forget, so nobody sees an exception): an invalid item
        (unknown class, wrong number of labels) is counted (`accuracy.invalid_labels`) and logged, and the
        rest of the batch still joins."""
        matched = invalid = 0
        for rid, label in items:
            try:
                matched += bool(self.record_feedback(rid, label)["matched"])
            except ValueError as e:
                invalid += 1
                self.accuracy.invalid += 1
                if invalid == 1:
                    log.warning("raysys monitor: invalid feedback for request %s: %s", rid, e)
        self._write_labels()
        self._flush_recent()
        return {"received": len(items), "matched": matched, "invalid": invalid}

    # ----- recent traffic and labels on storage -----
    def _write_labels(self) -> None:
        """Hand the labels joined since the last call to the labels writer (one table per call)."""
        if self.label_writer is None or not self._pending_labels:
            return
        rows, self._pending_labels = self._pending_labels, []
        cls = np.asarray(self.profile.classes, dtype=object)
        ts, rid, row, label, pred, version = zip(*rows)
        try:  # the writer writes a file when it has rows_per_file rows: storage trouble must not lose the join
            self.label_writer.add({
                "ts": np.asarray(ts), "request_id": list(rid), "row": np.asarray(row, dtype=np.int64),
                "label": cls[np.asarray(label, dtype=np.int64)].tolist(),
                "prediction": [cls[p] if 0 <= p < len(cls) else None for p in pred],
                "model_version": [str(v) for v in version]})
        except Exception as e:
            log.warning("raysys monitor: writing joined labels failed: %s", e)

    def _flush_recent(self, force: bool = False) -> None:
        """Write buffered traffic and labels to storage every `traffic_flush_interval_s` (or now, `force`), so
        a retrain job finds them; storage trouble is logged, never raised into ingest."""
        if self.traffic is None or (not force and self._clock() - self._last_flush < self.cfg.traffic_flush_interval_s):
            return
        self._last_flush = self._clock()
        try:
            self._write_labels()
            self.traffic.flush()
            self.label_writer.flush()
        except Exception as e:
            log.warning("raysys monitor: writing recent traffic/labels failed: %s", e)

    # ----- alerts -----
    def _alert(self, kind: str, message: str, *, features: list[str] | None = None,
               detail: dict[str, Any] | None = None) -> dict[str, Any]:
        event = {"id": uuid.uuid4().hex[:12], "kind": kind, "message": message, "time": time.time(),
                 "model_version": self.model_version, "rows_seen": self.rows_seen, "features": features or [],
                 "detail": detail or {}}
        retrain_args = ["--reason", f"{kind}: {message}"]
        if self.model_version is not None:
            retrain_args += ["--served-version", self.model_version]
        if self.traffic is not None and self.retrain.enabled:
            self._flush_recent(force=True)  # what the job reads: everything up to the alert
            retrain_args += ["--traffic-uri", self.traffic.root, "--labels-uri", self.label_writer.root]
        event["retrain"] = self.retrain.maybe_submit(message, retrain_args)
        self.alert_events.append(event)
        del self.alert_events[:-MAX_ALERTS]
        metrics = self._ray_metrics()
        if metrics is not None:
            metrics["alerts"].inc(1, tags={"kind": kind})
        log.warning("raysys monitor: %s alert: %s", kind, message)
        return event

    def _tick(self) -> None:
        self._last_tick = self._clock()
        window = self._window()
        acc = self._accuracy()
        self._check_alerts(window, acc)
        self._update_gauges(window, acc)
        self._flush_recent()
        if self.store is not None and self._clock() - self._last_snapshot >= self.cfg.snapshot_interval_s:
            self.snapshot()

    def _check_alerts(self, window: dict[str, Any], acc: dict[str, Any]) -> None:
        drifted = bool(window["dataset"]["drifted"])
        if drifted and not self._window_alerting:
            names = [k for k, f in window["features"].items() if f["drifted"]]
            self._alert("window", f"window tests: {len(names)} drifted feature(s) "
                                  f"(dataset p {window['dataset']['p_value']:.2g})", features=names)
        self._window_alerting = drifted
        ref = acc.get("reference")
        realised = acc.get("realised")
        low = (ref is not None and realised is not None and acc["labelled_in_window"] >= self.cfg.min_labels
               and realised < ref - self.cfg.accuracy_drop)
        if low and not self._accuracy_alerting:
            self._alert("accuracy", f"realised accuracy {realised:.3f} is below the reference {ref:.3f} "
                                    f"- {self.cfg.accuracy_drop}")
        self._accuracy_alerting = bool(low)

    # ----- report -----
    def _window(self) -> dict[str, Any]:
        rows = len(self.win_num)
        armed = rows >= self.cfg.min_rows
        pred = self.win_pred.buf[:rows, 0]
        proba = self.win_proba.buf[:rows]
        has_proba = ~np.isnan(proba[:, 0]) if rows else np.zeros(0, dtype=bool)
        out = self.tester.test(self.win_num.buf[:rows], self.win_cat.buf[:rows],
                               proba=proba[has_proba] if has_proba.any() else None, pred=pred[pred >= 0],
                               alpha=self.cfg.alpha, method=self.cfg.multiple_testing, armed=armed)
        for f in out["features"].values():
            f["psi_high"] = bool(armed and f["psi"] > self.cfg.psi_threshold)
        out["window_rows"] = rows
        out["armed"] = armed
        out["alerts"] = [name for name, f in out["features"].items() if f["drifted"]]
        self._last_window = out
        return out

    def _accuracy(self) -> dict[str, Any]:
        out = self.accuracy.summary()
        pr = self.profile.prediction
        out["reference"] = pr.accuracy if pr is not None else None
        rows = len(self.win_proba)
        proba = self.win_proba.buf[:rows].astype(np.float64)
        ok = ~np.isnan(proba[:, 0]) if rows else np.zeros(0, dtype=bool)
        fit = self.recal.fit() if pr is not None else None
        est = est0 = est_unl = None
        unlabelled = np.zeros(0)
        if pr is not None:
            if ok.any():
                q0 = pr.correct_probability(proba[ok])
                est0 = float(q0.mean())
                est = float(fit.apply(q0).mean()) if fit is not None else est0
            unlabelled = self.pred_log.recent_q0(self.cfg.window_size)
            if len(unlabelled):
                est_unl = float((fit.apply(unlabelled) if fit is not None else unlabelled).mean())
        out["estimated"] = est  # over the window's rows, labelled or not
        out["estimated_rows"] = int(ok.sum())
        out["estimated_unlabelled"] = est_unl  # over the latest window_size rows still waiting for labels
        out["unlabelled_rows"] = int(len(unlabelled))
        out["estimated_registration_map"] = est0  # the same window through the registration-time map alone
        labelled = fit.rows if fit is not None else 0
        out["recalibration"] = {"labelled_rows": labelled, "prior_rows": self.recal.prior_rows,
                                "weight": fit.weight if fit is not None else 0.0,
                                "bins": int(len(fit.delta)) if fit is not None else 0}
        if pr is None:
            out["method_estimated"] = "n/a (the reference profile has no held-out predictions)"
        else:
            method = (f"CBPE-style mean P(top class right): temperature {pr.temperature:.3f}"
                      + (", then the held-out isotonic confidence map" if pr.confidence_map is not None else ""))
            if fit is None:
                method += "; no labels joined yet, so the registration-time map alone"
            else:
                method += (f"; re-fitted online on {labelled} labelled rows ({len(fit.delta)} confidence bins, "
                           f"weight {fit.weight:.3f} = n / (n + {self.recal.prior_rows:g}))")
            out["method_estimated"] = method
        return out

    def _update_gauges(self, window: dict[str, Any], acc: dict[str, Any]) -> None:
        metrics = self._ray_metrics()
        if metrics is None:
            return
        for name, f in window["features"].items():
            tags = {"feature": name}
            metrics["psi"].set(f["psi"], tags=tags)
            metrics["js"].set(f["js"], tags=tags)
            metrics["stat"].set(f["statistic"], tags=tags)
            metrics["pvalue"].set(f["p_adjusted"], tags=tags)
            metrics["drifted"].set(1.0 if f["drifted"] else 0.0, tags=tags)
        if window["prediction"].get("psi") is not None:
            metrics["psi"].set(window["prediction"]["psi"], tags={"feature": PREDICTION_TAG})
        metrics["alert"].set(1.0 if window["dataset"]["drifted"] else 0.0)
        if self.detector is not None:
            d = self.detector.describe()
            if d["max_score"] is not None:
                metrics["det_score"].set(d["max_score"])
            metrics["det_threshold"].set(self.detector.threshold)
        for ver, h in self.latency_hist.items():
            s = h.summary()
            for q in ("p50", "p95", "p99"):
                if s[q] is not None:
                    metrics["lat_q"].set(s[q], tags={"model_version": ver, "quantile": q})
        req_s, _, err_rate = self._throughput()
        metrics["rps"].set(req_s)
        metrics["error_rate"].set(err_rate)
        if acc["realised"] is not None:
            metrics["acc_real"].set(acc["realised"])
        if acc["estimated"] is not None:
            metrics["acc_est"].set(acc["estimated"])
        if acc["estimated_unlabelled"] is not None:
            metrics["acc_est_unl"].set(acc["estimated_unlabelled"])

    def _throughput(self) -> tuple[float, float, float]:
        now = self._clock()
        cutoff = math.floor(now) - RATE_WINDOW_S
        while self._rate and self._rate[0][0] <= cutoff:
            self._rate.popleft()
        # over the last minute, or since (re)start when that is shorter
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        requests = sum(e[1] for e in self._rate)
        rows = sum(e[2] for e in self._rate)
        errors = sum(e[3] for e in self._rate)
        return requests / span, rows / span, errors / (requests + errors) if requests + errors else 0.0

    def report(self) -> dict[str, Any]:
        """JSON-able summary; also refreshes the dashboard gauges and checks the alert rules."""
        self._last_tick = self._clock()
        window = self._window()
        acc = self._accuracy()
        self._check_alerts(window, acc)
        self._update_gauges(window, acc)
        self._flush_recent()
        req_s, rows_s, err_rate = self._throughput()
        lat = latency_percentiles(self.latencies.buf[:len(self.latencies), 0])
        lat["count"] = len(self.latencies)
        detector = dict(self.detector_info)
        if self.detector is not None:
            detector.update(self.detector.describe())
        detector["recent_alarms"] = [e["detail"] for e in self.alert_events if e["kind"] == "online"][-5:]
        return {
            "model_version": self.model_version,
            "profile_hash": self.profile_hash,
            "rows_seen": self.rows_seen,
            "requests_seen": self.requests_seen,
            "errors_seen": self.errors_seen,
            "window_rows": window["window_rows"],
            "window_size": self.cfg.window_size,
            "min_rows": self.cfg.min_rows,
            "psi_threshold": self.cfg.psi_threshold,
            "num_bins": self.profile.num_bins,
            "armed": window["armed"],
            "features": window["features"],
            "dataset": window["dataset"],
            "alerts": window["alerts"],
            "drift_detected": bool(window["alerts"]) or bool(self.detector and self.detector.alarms),
            "prediction": window["prediction"],
            "detector": detector,
            "predictions_by_version": dict(self.predictions_by_version),
            "latency_ms": lat,
            "latency_by_version": {v: h.summary() for v, h in self.latency_hist.items()},
            "requests_per_s": req_s,
            "rows_per_s": rows_s,
            "error_rate": err_rate,
            "errors_by_version": dict(self.errors_by_version),
            "accuracy": acc,
            "alert_events": list(self.alert_events[-20:]),
            "retrain": self.retrain.summary(),
            "traffic": self.traffic.stats() if self.traffic else None,
            "labels": self.label_writer.stats() if self.label_writer else None,
            "snapshot": {"uri": self.store.dir if self.store else None, "restored": self.restored},
            "uptime_s": self._clock() - self._started,
            "metrics_enabled": self._ray_metrics() is not None,
        }

    def ping(self) -> bool:
        return True

    # ----- snapshots -----
    def snapshot(self) -> bool:
        """Write the live state (windows, detector, counters, labels, alerts) to `monitor.snapshot_uri`."""
        if self.store is None:
            return False
        self._last_snapshot = self._clock()
        state = {
            "model_version": self.model_version, "profile_hash": self.profile_hash, "time": time.time(),
            "rows_seen": self.rows_seen, "requests_seen": self.requests_seen, "errors_seen": self.errors_seen,
            "predictions_by_version": self.predictions_by_version, "errors_by_version": self.errors_by_version,
            "latency_hist": {v: h.counts.tolist() for v, h in self.latency_hist.items()},
            "detector": self.detector.state() if self.detector is not None else None,
            "accuracy": self.accuracy.state(), "recalibration": self.recal.state(),
            "pred_log": self.pred_log.state()[-SNAPSHOT_PREDICTION_LOG:],
            "alert_events": self.alert_events, "window_alerting": self._window_alerting,
            "retrain": self.retrain.state(),
        }
        arrays = {"win_num": self.win_num.values(), "win_cat": self.win_cat.values(),
                  "win_pred": self.win_pred.values(), "win_proba": self.win_proba.values(),
                  "latencies": self.latencies.values()}
        try:
            self.store.save(state, arrays)
            self._flush_recent(force=True)
            return True
        except Exception as e:  # storage trouble must not break ingest
            log.warning("raysys monitor: snapshot failed: %s", e)
            return False

    def _restore(self) -> bool:
        got = self.store.load()
        if got is None:
            return False
        st, arrays = got
        if st.get("model_version") != self.model_version or st.get("profile_hash") != self.profile_hash:
            log.info("raysys monitor: snapshot is for another model version/profile; starting empty")
            return False
        self.win_num.add(arrays["win_num"])
        self.win_cat.add(arrays["win_cat"])
        self.win_pred.add(arrays["win_pred"])
        self.win_proba.add(arrays["win_proba"])
        self.latencies.add(arrays["latencies"])
        self.rows_seen, self.requests_seen = int(st["rows_seen"]), int(st["requests_seen"])
        self.errors_seen = int(st.get("errors_seen", 0))
        self.predictions_by_version = dict(st["predictions_by_version"])
        self.errors_by_version = dict(st.get("errors_by_version", {}))
        self.latency_hist = {v: LogHistogram(c) for v, c in st["latency_hist"].items()}
        if self.detector is not None and st.get("detector"):
            self.detector.load_state(st["detector"])
        self.accuracy.load_state(st["accuracy"])
        self.recal.load_state(st.get("recalibration", []))
        self.pred_log.load_state(st["pred_log"])
        self.alert_events = list(st.get("alert_events", []))
        self._window_alerting = bool(st.get("window_alerting", False))
        self.retrain.load_state(st.get("retrain") or {})
        log.info("raysys monitor: restored %d window rows, %d rows seen from %s", len(self.win_num),
                 self.rows_seen, self.store.dir)
        return True


# num_cpus=0: the monitor must never take a CPU that training or serving needs; max_restarts=-1: a
# crashed monitor comes back (restored from its snapshot when monitor.snapshot_uri is set)
MonitorActor = ray.remote(num_cpus=0, max_restarts=-1)(Monitor)


def get_or_create_monitor(name: str = "raysys_monitor", namespace: str = "raysys", **init_kwargs):
    """The named, detached monitor actor: created on first call, the same handle afterwards.

    `init_kwargs` (profile, schema, monitor_cfg, model_version) are used only when the actor is
    created; call `handle.set_profile.remote(...)` to point an existing monitor at a new model version.
    Detached: it outlives the job that made it; end it with `ray.kill(handle)`.
    """
    init_kwargs.setdefault("snapshot_key", f"{namespace}-{name}")
    return MonitorActor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                                max_restarts=-1, num_cpus=0).remote(**init_kwargs)
