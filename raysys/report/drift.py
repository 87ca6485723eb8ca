"""Drift over time: PSI per feature over windows of the stored traffic (against the served version's
reference profile) and at each recorded monitor report, with the PSI alert threshold; the online
detector's statistic with its threshold and alarms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raysys.report.parts import Plot
from raysys.report.svg import distinct_styles, figure, to_svg

DEFAULT_PSI_THRESHOLD = 0.2
EPS = 1e-4  # raysys.monitor.stats.DEFAULT_EPS: the same smoothing as the monitor's PSI


def psi(ref_props, counts) -> float:
    """Population Stability Index of `counts` against `ref_props` (the monitor's formula and smoothing)."""
    ref = np.asarray(ref_props, dtype=np.float64)
    cur = np.asarray(counts, dtype=np.float64)
    if cur.sum() <= 0:
        return 0.0
    k = len(ref)
    p_cur = (cur / cur.sum() + EPS) / (1 + k * EPS)
    p_ref = (ref / ref.sum() + EPS) / (1 + k * EPS)
    return float(np.sum((p_cur - p_ref) * np.log(p_cur / p_ref)))


def _feature_counts(profile: dict[str, Any], table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """feature -> (reference proportions, bin index of every stored row), for the features the table has."""
    out = {}
    for f in profile.get("numeric") or []:
        if f["name"] in table.column_names:
            x = np.asarray(table.column(f["name"]).to_numpy(zero_copy_only=False), dtype=np.float64)
            out[f["name"]] = (np.asarray(f["ref_props"]), np.searchsorted(np.asarray(f["edges"]), x, side="right"))
    for f in profile.get("categorical") or []:
        if f["name"] in table.column_names:
            index = {c: i for i, c in enumerate(f["categories"])}
            vals = table.column(f["name"]).to_pylist()
            # a category the reference never saw has no bin: it is left out of the counts (the monitor refuses it)
            out[f["name"]] = (np.asarray(f["ref_props"]), np.asarray([index.get(str(v), -1) for v in vals]))
    return out


def traffic_psi(profile: dict[str, Any], table: pa.Table, window: int) -> dict[str, Any]:
    """PSI per feature over consecutive windows of `window` stored rows (the last may be shorter, if at
    least half full): {"ends": [row index after each window], "psi": {feature: [psi per window]}}."""
    counts = _feature_counts(profile, table)
    n = table.num_rows
    starts = [s for s in range(0, n, window) if n - s >= max(1, window // 2) or s == 0]
    out: dict[str, Any] = {"ends": [min(s + window, n) for s in starts], "psi": {}}
    for name, (ref, bins) in counts.items():
        k = len(ref)
        out["psi"][name] = [psi(ref, np.bincount(b[(b >= 0) & (b < k)], minlength=k))
                            for b in (bins[s:s + window] for s in starts)]
    return out


def _threshold(reports: list[dict[str, Any]]) -> float:
    for r in reversed(reports):
        v = r["report"].get("psi_threshold")
        if isinstance(v, int | float):
            return float(v)
    return DEFAULT_PSI_THRESHOLD


def drift_plot(profile: dict[str, Any] | None, traffic: pa.Table | None, reports: list[dict[str, Any]],
               window: int) -> Plot | None:
    """PSI per feature over the traffic's windows (left) and at each monitor report (right)."""
    series = traffic_psi(profile, traffic, window) if profile and traffic is not None and traffic.num_rows else None
    rep = [r for r in reports if r["report"].get("features")]
    if not series and not rep:
        return None
    thr = _threshold(reports)
    panels = [p for p in ("traffic" if series else None, "reports" if rep else None) if p]
    with figure(len(panels), width=4.6, height=3.2) as (fig, axes):
        for ax, panel in zip(axes, panels):
            if panel == "traffic":
                items = sorted(series["psi"].items())
                for (name, ys), style in zip(items, distinct_styles(len(items))):
                    ax.plot(series["ends"], ys, marker="o", markersize=3, label=name, **style)
                ax.set(xlabel=f"stored traffic rows (windows of {window})", ylabel="PSI vs reference",
                       title="drift per feature over stored traffic")
            else:
                names = sorted({n for r in rep for n in r["report"]["features"]})
                xs = list(range(1, len(rep) + 1))
                for name, style in zip(names, distinct_styles(len(names))):
                    ax.plot(xs, [r["report"]["features"].get(name, {}).get("psi", np.nan) for r in rep], marker="o",
                            markersize=3, label=name, **style)
                ax.set_xticks(xs, [str(r.get("phase", i))[:24] for i, r in zip(xs, rep)], rotation=15, fontsize=7)
                ax.set(xlabel="monitor report", ylabel="PSI of the live window", title="drift at each monitor report")
            ax.axhline(thr, color="#d62728", linestyle="--", linewidth=1, label=f"alert threshold {thr:g}")
            ax.set_yscale("symlog", linthresh=0.05)
            ax.set_ylim(0, max(thr, *(v for line in ax.get_lines() for v in np.nan_to_num(line.get_ydata()))) * 1.5)
            ax.legend(fontsize=6, ncol=2)
        return Plot("drift", "drift per feature over time", to_svg(fig),
                    "PSI of each feature's live distribution against the training reference; dashed: the "
                    "monitor's PSI threshold.")


def _alarms(reports: list[dict[str, Any]], snapshot: dict[str, Any] | None) -> list[dict[str, Any]]:
    events = list((snapshot or {}).get("alert_events") or [])
    for r in reports:
        events += r["report"].get("alert_events") or []
    seen, out = set(), []
    for e in events:
        d = e.get("detail") or {}
        if e.get("kind") == "online" and isinstance(d.get("row_in_stream"), int | float):
            key = (d["row_in_stream"], d.get("chart"))
            if key not in seen:
                seen.add(key)
                out.append(d)
    return sorted(out, key=lambda d: d["row_in_stream"])


def detector_plot(reports: list[dict[str, Any]], snapshot: dict[str, Any] | None) -> Plot | None:
    """The online detector: its largest chart statistic at each report and every alarm's score, against
    its threshold (set for the configured expected rows between false alarms)."""
    rep = [r for r in reports if (r["report"].get("detector") or {}).get("calibrated")]
    alarms = _alarms(reports, snapshot)
    if not rep and not alarms:
        return None
    thr = next((r["report"]["detector"].get("threshold") for r in reversed(rep)), None)
    if thr is None and alarms:
        thr = alarms[-1].get("threshold")
    with figure(1, width=6.0, height=3.0) as (fig, (ax,)):
        if alarms:
            ax.scatter([a["row_in_stream"] for a in alarms], [a.get("score", np.nan) for a in alarms], s=10,
                       color="#d62728", label="alarm (score when it fired)")
        if rep:
            ax.plot([r["report"].get("rows_seen", 0) for r in rep],
                    [r["report"]["detector"].get("max_score", np.nan) for r in rep], "-o", color="#1f77b4",
                    markersize=4, label="largest chart statistic at each report")
        if thr is not None:
            ax.axhline(thr, color="#7f7f7f", linestyle="--", linewidth=1, label=f"threshold {thr:.3g}")
        ax.set(xlabel="rows seen by the monitor", ylabel="detector statistic", title="online drift detector")
        ax.legend(fontsize=7)
        return Plot("detector", "the online detector's statistic", to_svg(fig))
