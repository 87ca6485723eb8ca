"""The monitor section: drift, the online detector, latency, accuracy, traffic per version and alias moves,
from the recorded monitor reports, the monitor's snapshot, its stored traffic and the registry."""

from __future__ import annotations

from raysys.report import drift, serving
from raysys.report.load import RunData
from raysys.report.parts import Section, key_values, note

TITLE = "Monitoring: drift, latency, accuracy, rollouts"
DEFAULT_WINDOW = 1000


def _window(data: RunData) -> int:
    """Rows per window of the over-time plots: the monitor's window, so a point is what one live window saw."""
    for r in reversed(data.monitor.reports):
        if isinstance(r["report"].get("window_size"), int):
            return max(10, r["report"]["window_size"])
    cfg = (data.student.config.get("monitor") if data.student else None) or {}
    return max(10, int(cfg.get("window_size") or DEFAULT_WINDOW))


def _sources(data: RunData) -> str:
    m = data.monitor
    traffic_rows = m.traffic.num_rows if m.traffic is not None else 0
    label_rows = m.labels.num_rows if m.labels is not None else 0
    return key_values({
        "monitor reports recorded": len(m.reports),
        "snapshot": (f"{m.snapshot_uri} ({m.snapshot.get('key')}, {m.snapshot.get('rows', '?')} rows seen)"
                     if m.snapshot else "not available"),
        "stored traffic rows": f"{traffic_rows} ({m.traffic_uri})" if m.traffic is not None else "not available",
        "joined labels": label_rows if m.labels is not None else "not available",
        "alias moves in the registry": len(data.alias_events),
    }, caption="what the monitor left")


def section(data: RunData) -> Section:
    m = data.monitor
    if m.empty and not data.alias_events:
        return Section.unavailable(
            "monitoring", TITLE, "no monitor reports, snapshot or stored traffic (the model was not served; "
            "`raysys demo` records them, and monitor.snapshot_uri / traffic_uri keep them)")
    sec = Section("monitoring", TITLE, blocks=[_sources(data)])
    window = _window(data)
    profile = data.student.reference_profile if data.student else None
    plots = [
        ("drift per feature", drift.drift_plot(profile, m.traffic, m.reports, window)),
        ("online detector", drift.detector_plot(m.reports, m.snapshot)),
        ("latency per version", serving.latency_plot(m.reports)),
        ("accuracy", serving.accuracy_plot(m.reports, m.labels, window)),
        ("traffic per version", serving.traffic_share_plot(m.traffic, window)),
        ("alias moves", serving.alias_plot(data.alias_events)),
    ]
    for name, plot in plots:
        if plot is None:
            sec.blocks.append(note(f"{name}: not available"))
        else:
            sec.plots.append(plot)
    if data.alias_events:
        sec.blocks.append(serving.alias_table(data.alias_events))
    return sec
