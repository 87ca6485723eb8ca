"""The served model over time: latency percentiles per version, live (labelled) and estimated accuracy,
the traffic each version took (a canary's share), and the registry's alias moves (canary, promotion,
rollback)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raysys.report.parts import Plot, table
from raysys.report.svg import figure, to_svg

PERCENTILES = ("p50", "p95", "p99")


def _report_axis(ax, reports: list[dict[str, Any]]) -> list[int]:
    xs = list(range(1, len(reports) + 1))
    ax.set_xticks(xs, [str(r.get("phase", i))[:24] for i, r in zip(xs, reports)], rotation=15, fontsize=7)
    ax.set_xlabel("monitor report")
    return xs


def latency_plot(reports: list[dict[str, Any]]) -> Plot | None:
    rep = [r for r in reports if r["report"].get("latency_by_version")]
    if not rep:
        return None
    versions = sorted({v for r in rep for v in r["report"]["latency_by_version"]}, key=str)
    with figure(1, width=6.0, height=3.0) as (fig, (ax,)):
        xs = _report_axis(ax, rep)
        for v in versions:
            for p, style in zip(PERCENTILES, ("-o", "--s", ":^")):
                ys = [(r["report"]["latency_by_version"].get(v) or {}).get(p) for r in rep]
                ax.plot(xs, [np.nan if y is None else y for y in ys], style, markersize=4, label=f"v{v} {p}")
        ax.set(ylabel="request latency (ms)", title="latency percentiles per version")
        ax.legend(fontsize=7, ncol=len(versions))
        return Plot("latency", "latency percentiles per version over time", to_svg(fig),
                    "Server-side latency the replicas reported, per model version, at each monitor report.")


def _label_windows(labels: pa.Table, window: int) -> tuple[list[int], list[float]]:
    y = labels.column("label").to_pylist()
    p = labels.column("prediction").to_pylist()
    correct = np.asarray([a == b for a, b in zip(y, p)], dtype=np.float64)
    ends = list(range(window, len(correct) + 1, window)) or [len(correct)]
    return ends, [float(correct[max(0, e - window):e].mean()) for e in ends]


def accuracy_plot(reports: list[dict[str, Any]], labels: pa.Table | None, window: int) -> Plot | None:
    rep = [r for r in reports if isinstance(r["report"].get("accuracy"), dict)]
    has_labels = labels is not None and labels.num_rows and {"label", "prediction"} <= set(labels.column_names)
    if not rep and not has_labels:
        return None
    panels = [p for p in ("reports" if rep else None, "labels" if has_labels else None) if p]
    with figure(len(panels), width=4.4, height=3.0) as (fig, axes):
        for ax, panel in zip(axes, panels):
            if panel == "reports":
                xs = _report_axis(ax, rep)
                for key, style, label in (("realised", "-o", "live (joined labels)"),
                                          ("estimated", "--s", "estimated from confidence"),
                                          ("reference", ":", "reference (test split)")):
                    ys = [r["report"]["accuracy"].get(key) for r in rep]
                    ax.plot(xs, [np.nan if y is None else y for y in ys], style, markersize=4, label=label)
                ax.set(ylabel="accuracy", title="live and estimated accuracy")
            else:
                ends, acc = _label_windows(labels, window)
                ax.plot(ends, acc, "-o", markersize=3, label=f"labelled rows, windows of {window}")
                ax.set(xlabel="joined labels", ylabel="accuracy", title="accuracy of labelled traffic")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        return Plot("accuracy", "live and estimated accuracy", to_svg(fig))


def traffic_share_plot(traffic: pa.Table | None, window: int) -> Plot | None:
    """Rows per model version over windows of the stored traffic (a canary shows as a second line)."""
    if traffic is None or not traffic.num_rows or "model_version" not in traffic.column_names:
        return None
    versions = np.asarray([str(v) for v in traffic.column("model_version").to_pylist()])
    n = len(versions)
    ends = list(range(window, n + 1, window)) or [n]
    if ends[-1] != n:
        ends.append(n)
    with figure(1, width=6.0, height=2.6) as (fig, (ax,)):
        for v in sorted(set(versions.tolist())):
            ax.plot(ends, [float((versions[max(0, e - window):e] == v).mean()) for e in ends], "-o", markersize=3,
                    label=f"v{v}")
        ax.set(xlabel="stored traffic rows", ylabel="share of rows", title="traffic per model version", ylim=(0, 1.05))
        ax.legend(fontsize=7)
        return Plot("traffic-share", "traffic per model version", to_svg(fig))


def alias_plot(events: list[dict[str, Any]]) -> Plot | None:
    if not events:
        return None
    with figure(1, width=6.0, height=2.6) as (fig, (ax,)):
        for alias in sorted({e["alias"] for e in events}):
            pts = [(i, e["version"]) for i, e in enumerate(events) if e["alias"] == alias]
            xs, ys = zip(*pts)
            ax.step(xs, ys, "-o", where="post", markersize=5, label=alias)
        ax.set_xticks(range(len(events)), [str(i + 1) for i in range(len(events))], fontsize=7)
        ax.set(xlabel="alias move (oldest first, see the table)", ylabel="model version",
               title="registry aliases: canary, promotion, rollback")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        return Plot("aliases", "alias moves", to_svg(fig))


def alias_table(events: list[dict[str, Any]]) -> str:
    rows = []
    for i, e in enumerate(events):
        what = "rollback" if e.get("rolled_back_from") is not None else ("set" if e.get("previous") is None else "move")
        rows.append([i + 1, e["updated_at"], e["alias"], e.get("previous"), e["version"], what])
    return table(["#", "time (UTC)", "alias", "from version", "to version", "kind"], rows,
                 caption="alias history (every generation the registry keeps)")
