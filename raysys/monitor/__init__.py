"""Live monitoring: reference profiles, window drift tests, a calibrated online drift detector, latency
histograms, live accuracy, alerts -> retraining, the `MonitorActor` (a named, detached Ray actor) and its
`raysys_*` dashboard metrics."""

from raysys.monitor.actor import MonitorActor, get_or_create_monitor
from raysys.monitor.calibrate import calibrate_detector
from raysys.monitor.core import Monitor
from raysys.monitor.drift import WindowTester
from raysys.monitor.latency import LogHistogram
from raysys.monitor.metrics import LATENCY_BOUNDARIES_MS
from raysys.monitor.online import OnlineDetector, detector_for, score_rows
from raysys.monitor.profile import CategoricalRef, NumericRef, PredictionRef, ReferenceProfile
from raysys.monitor.refbins import bin_numeric
from raysys.monitor.stats import adjust_pvalues, jensen_shannon, latency_percentiles, psi
from raysys.monitor.window import RingBuffer, SlidingWindow

__all__ = [
    "LATENCY_BOUNDARIES_MS", "CategoricalRef", "LogHistogram", "Monitor", "MonitorActor", "NumericRef",
    "OnlineDetector", "PredictionRef", "ReferenceProfile", "RingBuffer", "SlidingWindow", "WindowTester",
    "adjust_pvalues", "bin_numeric", "calibrate_detector", "detector_for", "get_or_create_monitor",
    "jensen_shannon", "latency_percentiles", "psi", "score_rows",
]
