"""`Monitor`: streaming drift, latency, throughput and accuracy of one served model, as a plain class
(unit-testable without Ray; `raysys.monitor.actor` runs it as a named, detached Ray actor).

Serving replicas send `record(batch)`. Per batch the monitor

- appends the rows to a sliding window (`LiveWindow`) on which the window tests run (`WindowTester`: KS,
  chi-squared, PSI, Jensen-Shannon; BH or Bonferroni across features; a dataset-level decision);
- feeds every row to the online detector (`raysys.monitor.online`), whose threshold was calibrated at
  registration to `monitor.ert` rows between false alarms;
- counts requests, rows, errors and latencies per model version (`RequestCounters`);
- logs predictions by request_id so delayed labels can join them (`feedback_verdicts` for `/v1/feedback`,
  which refuses ids it never logged, `record_feedback` for fire-and-forget callers); the joined
  labels give the realised accuracy and re-fit, online, the confidence map behind the accuracy estimate of
  the traffic still waiting for its labels (`raysys.monitor.accuracy`).

A confirmed drift (an online alarm, or the window tests' dataset-level decision) or an accuracy drop
records an alert and, with `monitor.on_drift: retrain`, submits the retrain job (one in flight, with a
cooldown); with `monitor.retrain_when: accuracy_drop` a drift alert only records, and the job is submitted
when the accuracy is lost: realised from labels, or estimated from the window's confidences (an
`estimated_accuracy` alert), so drift the model takes in its stride is reported but never retrained on.
With `monitor.snapshot_uri` the state is snapshotted to storage and restored when the monitor restarts;
with `monitor.traffic_uri` recent traffic and its joined labels are written as rotated Parquet
(`RecentTraffic`), which is what the retrain job trains and judges the candidate on; the raw values of features
the schema marks `sensitive` are never written there (hashed with the deployment's secret salt, or dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from raysys.config import MonitorConfig
from raysys.data.schema import DatasetSchema
from raysys.monitor.accuracy import AccuracyTracker, OnlineRecalibration, PredictionLog, confidence_estimate
from raysys.monitor.batch import RecordBatch, parse_batch, request_rows, text_request_ids
from raysys.monitor.calibrate import threshold_for_ert
from raysys.monitor.drift import WindowTester
from raysys.monitor.latency import RequestCounters
from raysys.monitor.online import detector_for, is_current, score_rows
from raysys.monitor.profile import ReferenceProfile
from raysys.monitor.store import RecentTraffic, SnapshotStore
from raysys.monitor.trigger import RetrainTrigger, held_back
from raysys.monitor.versions import VersionFigures
from raysys.monitor.window import LiveWindow

log = logging.getLogger("raysys")

GAUGE_INTERVAL_S = 5.0  # window tests, gauges and snapshots run at most this often from `record`
MAX_ALERTS = 200
SNAPSHOT_PREDICTION_LOG = 20_000  # request ids kept in a snapshot (the rest are re-learnt from traffic)


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
        metrics: called once, on first use, for the dashboard metrics sink (`metrics.dashboard_metrics`
            inside the Ray actor); None or a None result: no metrics.
    """

    def __init__(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                 monitor_cfg: dict | MonitorConfig | None = None, model_version: str | int | None = None,
                 clock: Callable[[], float] = time.monotonic, snapshot_key: str = "raysys_monitor",
                 retrain_submit: Callable | None = None, retrain_status: Callable | None = None,
                 metrics: Callable[[], Any] | None = None):
        if isinstance(monitor_cfg, MonitorConfig):
            self.cfg = monitor_cfg
        else:
            self.cfg = MonitorConfig.model_validate(monitor_cfg or {})
        self._clock = clock
        self._metrics_factory = metrics
        self._metrics: Any = None
        self._metrics_checked = False
        self._last_tick = -math.inf
        self._last_snapshot = clock()
        self.snapshot_key = snapshot_key
        self.retrain = RetrainTrigger(enabled=self.cfg.on_drift == "retrain", cooldown_s=self.cfg.retrain_cooldown_s,
                                      args=list(self.cfg.retrain_args), address=self.cfg.retrain_address,
                                      resources=dict(self.cfg.retrain_resources),
                                      submit=retrain_submit, status=retrain_status,
                                      metadata={"raysys_monitor": snapshot_key}, on_end=self._retrain_ended)
        self.store = SnapshotStore(self.cfg.snapshot_uri, snapshot_key) if self.cfg.snapshot_uri else None
        self.recent = RecentTraffic(self.cfg, clock) if self.cfg.traffic_uri else None
        self.restored = False
        self.set_profile(profile, schema, model_version)
        if self.store is not None:
            self.restored = self._restore()

    def _retrain_ended(self, status: str) -> None:
        metrics = self._dashboard()
        if metrics is not None:
            metrics.retrain_ended(status)

    @property
    def traffic(self):
        """The recent-traffic writer (None without `monitor.traffic_uri`)."""
        return self.recent.traffic if self.recent is not None else None

    # ----- the reference -----
    def set_profile(self, profile: dict | ReferenceProfile, schema: dict | DatasetSchema | None = None,
                    model_version: str | int | None = None) -> None:
        """Compare against a new reference (a new model version); clears the windows and counters."""
        prof = ReferenceProfile.from_dict(profile)
        # without a schema, features that were sensitive stay so: a profile alone never un-protects a column
        sensitive = self.recent.sensitive & set(prof.feature_names) if self.recent is not None else frozenset()
        if schema is not None:
            schema_obj = schema if isinstance(schema, DatasetSchema) else DatasetSchema.model_validate(schema)
            prof.check_schema(schema_obj)
            sensitive = frozenset(f.name for f in schema_obj.features if f.sensitive)
        self.profile = prof
        if self.recent is not None:  # the schema says which raw values must never be stored
            self.recent.sensitive = sensitive
        self.profile_hash = hashlib.sha256(json.dumps(prof.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        self.model_version = None if model_version is None else str(model_version)
        self.num_classes = len(prof.classes) or None
        self._cat_bins = np.array([c.num_bins for c in prof.categorical], dtype=np.int64)
        self.tester = WindowTester(prof)
        self.window = LiveWindow(self.cfg.window_size, len(prof.numeric), len(prof.categorical), self.num_classes)
        self.counts = RequestCounters(self.cfg.latency_window, self._clock)
        self._arm_detector(prof)
        self.reset()

    def _arm_detector(self, prof: ReferenceProfile) -> None:
        """The online detector at the threshold for `monitor.ert`, when the profile was calibrated for it."""
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

    def reset(self) -> None:
        """Forget all live traffic (windows, detector, latencies, counters, labels, alerts); keep the reference."""
        self.window.clear()
        self.counts.reset()
        if self.detector is not None:
            self.detector.reset()
            self.detector.alarms = self.detector.rows = 0
        self.pred_log = PredictionLog(self.cfg.prediction_log_size)
        self.accuracy = AccuracyTracker(self.cfg.feedback_window)
        self.figures = VersionFigures()
        self.recal = OnlineRecalibration(self.cfg.feedback_window, self.cfg.recalibration_prior_rows,
                                         self.cfg.recalibration_bins)
        self.alert_events: list[dict[str, Any]] = []
        self._window_alerting = False
        self._accuracy_alerting = False
        self._estimate_alerting = False
        self._last_tick = -math.inf

    def _dashboard(self) -> Any:
        if not self._metrics_checked:
            self._metrics_checked = True
            self._metrics = self._metrics_factory() if self._metrics_factory is not None else None
        return self._metrics

    # ----- record -----
    def record(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add a batch: x_num float [n, n_num] raw, x_cat int [n, n_cat], pred int [n] (optional), proba
        float [n, K] (optional), latency_ms list (one per request), model_version (optional; defaults to
        the profile's), request_ids (optional, one per request), rows_per_request (optional, one per
        request; default one row each), errors (optional: requests that failed), server_errors (optional:
        how many of those were 5xx, the version's fault). Returns the alarms."""
        batch = text_request_ids(batch)
        b = parse_batch(batch, n_num=len(self.profile.numeric), cat_bins=self._cat_bins,
                        num_classes=self.num_classes, model_version=self.model_version)
        alarms = self._add_rows(b) if b.n else []
        per_request = self._log_requests(batch, b)
        errors = int(batch.get("errors") or 0)
        now = self._clock()
        self.counts.add_requests(b.key, b.latency, b.n, errors, now, int(batch.get("server_errors") or 0))
        if batch.get("version_figures"):
            self.figures.merge(batch["version_figures"])
        if self.recent is not None and b.n:
            self.recent.add_rows(self.profile, b, batch.get("request_ids"), per_request)
        metrics = self._dashboard()
        if metrics is not None:
            metrics.record_batch(b.key, b.n, b.latency, errors, len(alarms))
        # window tests, gauges, accuracy alerts and snapshots every few seconds, not per batch
        if now - self._last_tick >= GAUGE_INTERVAL_S:
            self._refresh()
        self._maybe_snapshot(now)
        return {"alarms": alarms}

    def _add_rows(self, b: RecordBatch) -> list[dict[str, Any]]:
        """Window and count the rows, and run them through the online detector; returns its alarms."""
        self.window.add(b.x_num, b.x_cat, b.pred, b.proba)
        self.counts.add_rows(b.key, b.n)
        if self.detector is None:
            return []
        alarms = self.detector.update(score_rows(self.profile, b.x_num, b.x_cat, b.proba))
        for a in alarms:
            a["row_in_stream"] = self.counts.rows - b.n + a["row"]
            self._alert("online", f"online detector alarm on {a['chart']} (run length {a['run_length']})",
                        features=a["features"], detail=a)
        return alarms

    def _log_requests(self, batch: dict[str, Any], b: RecordBatch) -> list[int] | None:
        """Log each request's predictions for its delayed label; returns the rows per request (None: no ids)."""
        per = request_rows(batch, b.n)
        if per is None:
            return None
        bounds = np.cumsum([0] + per)
        preds = b.pred.tolist()
        # the registration-time P(right) of each row, kept until its label comes: labelled, it re-fits the
        # confidence map; unlabelled, it is what the estimate for traffic without labels averages. Only rows
        # of the profile's own model (a canary's rows would need the candidate's map)
        pr = self.profile.prediction
        q0 = None
        if b.proba is not None and pr is not None and (self.model_version is None or b.key == self.model_version):
            q0 = pr.correct_probability(b.proba).tolist()
        for rid, lo, hi in zip(batch["request_ids"], bounds[:-1], bounds[1:]):
            self.pred_log.add(str(rid), b.key, tuple(preds[lo:hi]), None if q0 is None else tuple(q0[lo:hi]))
        return per

    # ----- feedback -----
    def record_feedback(self, request_id: str, label: Any) -> dict[str, Any]:
        """A delayed label for a logged request: a class name or index (a list of them for a request of
        several rows). Returns whether it matched a logged prediction and whether that was correct. An
        invalid label (ValueError) leaves the prediction logged, so a corrected label can still join."""
        entry = self.pred_log.get(str(request_id))
        if entry is None:
            self.accuracy.unmatched += 1
            return {"request_id": request_id, "matched": False}
        return self._join(str(request_id), label, entry)

    def _join(self, request_id: str, label: Any, entry: tuple) -> dict[str, Any]:
        """Join a label to its logged prediction (validated first: ValueError leaves the log alone)."""
        version, preds, q0 = entry
        labels = label if isinstance(label, (list, tuple)) else [label]
        if len(labels) != len(preds):
            raise ValueError(f"feedback: request {request_id} had {len(preds)} rows, got {len(labels)} labels")
        idx = [self._class_index(lab) for lab in labels]
        self.pred_log.pop(request_id)
        correct = [p == y for p, y in zip(preds, idx)]
        self.accuracy.add(version, correct)
        if q0 is not None:
            self.recal.add(q0, correct)
        if self.recent is not None:
            self.recent.add_labels(request_id, preds, idx, version)
        return {"request_id": request_id, "matched": True, "correct": correct}

    def _class_index(self, label: Any) -> int:
        classes = self.profile.classes
        if isinstance(label, str):
            if label not in classes:
                raise ValueError(f"feedback.label: unknown class {label!r}; classes are {classes}")
            return classes.index(label)
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(classes):
            return int(label)
        raise ValueError(f"feedback.label: must be a class name or index, got {label!r}")

    def record_feedback_batch(self, items: list[tuple[str, Any]]) -> dict[str, int]:
        """Labels sent fire-and-forget (nobody sees an exception): an invalid item (unknown class, wrong
        number of labels) is counted (`accuracy.invalid_labels`) and logged, an unknown id is counted
        (`accuracy.unmatched_labels`), and the rest of the batch still joins. `/v1/feedback` itself asks
        `feedback_verdicts` and answers the client."""
        matched = invalid = 0
        for rid, label in items:
            try:
                matched += bool(self.record_feedback(rid, label)["matched"])
            except ValueError as e:
                invalid += 1
                self.accuracy.invalid += 1
                if invalid == 1:
                    log.warning("raysys monitor: invalid feedback for request %s: %s", rid, e)
        self._labels_written()
        return {"received": len(items), "matched": matched, "invalid": invalid}

    def feedback_verdicts(self, items: list[tuple[str, Any]], final: bool = True) -> list[dict[str, Any]]:
        """`/v1/feedback`'s join, answered per item: {"verdict": "accepted" | "unknown_request_id" |
        "invalid_label", "message": ...}. Accepted labels join at once; an invalid one is counted
        (`accuracy.invalid_labels`). An id with no logged prediction is left alone unless `final`: its
        prediction may still sit in another replica's buffer, so the replica asks again after a flush
        interval, and only that final ask refuses it and counts it, once (`accuracy.refused_unknown_ids`)."""
        out: list[dict[str, Any]] = []
        for rid, label in items:
            entry = self.pred_log.get(str(rid))
            if entry is None:
                self.accuracy.refused += int(final)
                out.append({"verdict": "unknown_request_id", "message": "no prediction with this request id is "
                            "waiting for a label: never answered by this endpoint, already labelled, or older than "
                            f"the latest monitor.prediction_log_size={self.cfg.prediction_log_size} requests"})
                continue
            try:
                self._join(str(rid), label, entry)
                out.append({"verdict": "accepted"})
            except ValueError as e:
                self.accuracy.invalid += 1
                out.append({"verdict": "invalid_label", "message": str(e).split(": ", 1)[-1]})
        self._labels_written()
        return out

    def _labels_written(self) -> None:
        if self.recent is not None:
            self.recent.write_labels(self.profile.classes)
        self._flush_recent()

    def _flush_recent(self, force: bool = False) -> None:
        """Write buffered traffic and labels to storage every `traffic_flush_interval_s` (or now, `force`)."""
        if self.recent is not None:
            self.recent.flush(self.profile.classes, force=force)

    # ----- alerts -----
    def _alert(self, kind: str, message: str, *, features: list[str] | None = None,
               detail: dict[str, Any] | None = None) -> dict[str, Any]:
        event = {"id": uuid.uuid4().hex[:12], "kind": kind, "message": message, "time": time.time(),
                 "model_version": self.model_version, "rows_seen": self.counts.rows, "features": features or [],
                 "detail": detail or {}}
        retrain_args = ["--reason", f"{kind}: {message}"]
        if self.model_version is not None:
            retrain_args += ["--served-version", self.model_version]
        if self.recent is not None and self.retrain.enabled:
            self._flush_recent(force=True)  # what the job reads: everything up to the alert
            retrain_args += ["--traffic-uri", self.recent.traffic.root, "--labels-uri", self.recent.labels.root]
        event["retrain"] = held_back(kind, self.cfg) or self.retrain.maybe_submit(message, retrain_args)
        self.alert_events.append(event)
        del self.alert_events[:-MAX_ALERTS]
        metrics = self._dashboard()
        if metrics is not None:
            metrics.alert(kind)
        log.warning("raysys monitor: %s alert: %s", kind, message)
        return event

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
        est = acc.get("estimated")
        est_low = (self.cfg.retrain_when == "accuracy_drop" and ref is not None and est is not None
                   and acc.get("estimated_rows", 0) >= self.cfg.min_rows and est < ref - self.cfg.accuracy_drop)
        if est_low and not self._estimate_alerting:
            self._alert("estimated_accuracy", f"estimated accuracy {est:.3f} (confidence-based, "
                                              f"{acc['estimated_rows']} rows) is below the reference {ref:.3f} "
                                              f"- {self.cfg.accuracy_drop}")
        self._estimate_alerting = bool(est_low)

    # ----- the periodic work: window tests, alerts, gauges, storage -----
    def _maybe_snapshot(self, now: float) -> None:
        """On its own clock: a report() refreshes the window tests (and so `_last_tick`), never the snapshot's
        due time, so a dashboard polling /v1/monitor cannot starve the snapshots."""
        if self.store is not None and now - self._last_snapshot >= self.cfg.snapshot_interval_s:
            self.snapshot()

    def _refresh(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the window tests and the accuracy estimate, raise their alerts, refresh the dashboard gauges
        and write recent traffic when due; returns (window, accuracy)."""
        self._last_tick = self._clock()
        window = self._window()
        acc = self._accuracy()
        self._check_alerts(window, acc)
        metrics = self._dashboard()
        if metrics is not None:
            metrics.set_gauges(window, acc, self.detector, self.counts.latency_hist, self.counts.rates())
        self._flush_recent()
        return window, acc

    def _window(self) -> dict[str, Any]:
        w = self.window
        rows = len(w)
        armed = rows >= self.cfg.min_rows
        pred = w.pred.buf[:rows, 0]
        proba = w.proba.buf[:rows]
        has_proba = ~np.isnan(proba[:, 0]) if rows else np.zeros(0, dtype=bool)
        out = self.tester.test(w.num.buf[:rows], w.cat.buf[:rows],
                               proba=proba[has_proba] if has_proba.any() else None, pred=pred[pred >= 0],
                               alpha=self.cfg.alpha, method=self.cfg.multiple_testing, armed=armed)
        for f in out["features"].values():
            f["psi_high"] = bool(armed and f["psi"] > self.cfg.psi_threshold)
        out["window_rows"] = rows
        out["armed"] = armed
        out["alerts"] = [name for name, f in out["features"].items() if f["drifted"]]
        return out

    def _accuracy(self) -> dict[str, Any]:
        out = self.accuracy.summary()
        pr = self.profile.prediction
        out["reference"] = pr.accuracy if pr is not None else None
        proba = self.window.proba.buf[:len(self.window)].astype(np.float64)
        out.update(confidence_estimate(pr, proba, self.recal, self.pred_log, self.cfg.window_size))
        return out

    # ----- report -----
    def report(self) -> dict[str, Any]:
        """JSON-able summary; also refreshes the dashboard gauges and checks the alert rules."""
        window, acc = self._refresh()
        req_s, rows_s, err_rate = self.counts.rates()
        detector = dict(self.detector_info)
        if self.detector is not None:
            detector.update(self.detector.describe())
        detector["recent_alarms"] = [e["detail"] for e in self.alert_events if e["kind"] == "online"][-5:]
        c = self.counts
        return {
            "model_version": self.model_version, "profile_hash": self.profile_hash,
            "rows_seen": c.rows, "requests_seen": c.requests, "errors_seen": c.errors,
            "window_rows": window["window_rows"], "window_size": self.cfg.window_size, "min_rows": self.cfg.min_rows,
            "psi_threshold": self.cfg.psi_threshold, "num_bins": self.profile.num_bins, "armed": window["armed"],
            "features": window["features"], "dataset": window["dataset"], "alerts": window["alerts"],
            "drift_detected": bool(window["alerts"]) or bool(self.detector and self.detector.alarms),
            "prediction": window["prediction"],
            "detector": detector,
            "predictions_by_version": dict(c.predictions_by_version),
            "latency_ms": c.latency_summary(),
            "latency_by_version": {v: h.summary() for v, h in c.latency_hist.items()},
            "requests_per_s": req_s, "rows_per_s": rows_s, "error_rate": err_rate,
            "errors_by_version": dict(c.errors_by_version),
            "server_errors_by_version": dict(c.server_errors_by_version),
            "version_figures": self.figures.summary(),
            "accuracy": acc,
            "alert_events": list(self.alert_events[-20:]),
            "retrain": self.retrain.summary(),
            "traffic": self.recent.stats() if self.recent else None,
            "labels": self.recent.labels.stats() if self.recent else None,
            "snapshot": {"uri": self.store.dir if self.store else None, "restored": self.restored},
            "uptime_s": self._clock() - c.started,
            "metrics_enabled": self._dashboard() is not None,
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
            **self.counts.state(),
            "detector": self.detector.state() if self.detector is not None else None,
            "accuracy": self.accuracy.state(), "recalibration": self.recal.state(),
            "version_figures": self.figures.state(),
            "pred_log": self.pred_log.state()[-SNAPSHOT_PREDICTION_LOG:],
            "alert_events": self.alert_events, "window_alerting": self._window_alerting,
            "retrain": self.retrain.state(),
        }
        arrays = {**self.window.arrays(), "latencies": self.counts.latencies.values()}
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
        self.window.load(arrays)
        self.counts.load_state(st, arrays["latencies"])
        if self.detector is not None and st.get("detector"):
            self.detector.load_state(st["detector"])
        self.accuracy.load_state(st["accuracy"])
        self.figures.load_state(st.get("version_figures") or {})
        self.recal.load_state(st.get("recalibration", []))
        self.pred_log.load_state(st["pred_log"])
        self.alert_events = list(st.get("alert_events", []))
        self._window_alerting = bool(st.get("window_alerting", False))
        self.retrain.load_state(st.get("retrain") or {})
        log.info("raysys monitor: restored %d window rows, %d rows seen from %s", len(self.window),
                 self.counts.rows, self.store.dir)
        return True
