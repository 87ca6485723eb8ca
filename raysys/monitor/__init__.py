"""Live monitoring: reference profiles, PSI drift over a sliding window, latency and throughput, the
`MonitorActor` (a named, detached Ray actor) and its `raysys_*` dashboard metrics."""

from raysys.monitor.actor import LATENCY_BOUNDARIES_MS, Monitor, MonitorActor, get_or_create_monitor
from raysys.monitor.drift import RingBuffer, SlidingWindow, bin_numeric, latency_percentiles, psi
from raysys.monitor.profile import CategoricalRef, NumericRef, ReferenceProfile

__all__ = [
    "LATENCY_BOUNDARIES_MS", "CategoricalRef", "Monitor", "MonitorActor", "NumericRef", "ReferenceProfile",
    "RingBuffer", "SlidingWindow", "bin_numeric", "get_or_create_monitor", "latency_percentiles", "psi",
]
