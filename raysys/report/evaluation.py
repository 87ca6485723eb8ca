"""Teacher and student on the test split: headline metrics, confusion matrices, reliability diagrams and
per-slice accuracy (what `raysys.evaluate.full_evaluation` stored with each registered version)."""

from __future__ import annotations

from typing import Any

import numpy as np

from raysys.report.load import ModelVersion, RunData
from raysys.report.parts import Plot, Section, note, table
from raysys.report.svg import figure, to_svg

TITLE = "Evaluation on the test split: teacher and student"
SLICES_TITLE = "Per-slice metrics (test split)"
HEADLINE = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "log_loss", "num_parameters",
            "teacher_agreement")


def parent_teacher(data: RunData) -> ModelVersion | None:
    """The teacher the production student was distilled from (its lineage), else the newest teacher."""
    parent = (data.student.lineage.get("parent_teacher") if data.student else None) or ""
    for t in data.teachers:
        if t.ref == parent:
            return t
    return data.teachers[-1] if data.teachers else None


def _models(data: RunData) -> list[tuple[str, dict[str, Any]]]:
    out = []
    teacher = parent_teacher(data)
    if teacher is not None and teacher.test:
        out.append((f"teacher {teacher.ref}", teacher.test))
    if data.student is not None and data.student.test:
        out.append((f"student {data.student.ref}", data.student.test))
    return out


def _confusion(models) -> Plot | None:
    have = [(n, m) for n, m in models if m.get("confusion_matrix")]
    if not have:
        return None
    with figure(len(have), width=3.8, height=3.4) as (fig, axes):
        for ax, (name, m) in zip(axes, have):
            cm = np.asarray(m["confusion_matrix"], dtype=np.float64)
            classes = m.get("classes") or [str(i) for i in range(len(cm))]
            share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            # pcolormesh, not imshow: vector cells (imshow would embed a PNG in the SVG)
            ax.pcolormesh(np.arange(len(cm) + 1) - 0.5, np.arange(len(cm) + 1) - 0.5, share, cmap="Blues",
                          vmin=0, vmax=1, edgecolors="white", linewidth=0.5)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            for i in range(len(cm)):
                for j in range(len(cm)):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
            ax.set_xticks(range(len(classes)), classes, rotation=30, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set(xlabel="predicted class", ylabel="true class", title=name)
            ax.grid(False)
        return Plot("confusion-matrix", "confusion matrices", to_svg(fig),
                    "Counts; the colour is the share of the true class's rows.")


def _reliability(models) -> Plot | None:
    have = [(n, m["calibration"]) for n, m in models if (m.get("calibration") or {}).get("bins")]
    if not have:
        return None
    with figure(2, width=3.8, height=3.2) as (fig, (rel, hist)):
        rel.plot([0, 1], [0, 1], ":", color="#7f7f7f", label="perfect calibration")
        width = 1.0 / max(len(have[0][1]["bins"]), 1) / (len(have) + 1)
        for k, (name, cal) in enumerate(have):
            bins = [b for b in cal["bins"] if b.get("count")]
            rel.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-o", markersize=3,
                     label=f"{name} (ECE {cal.get('ece', float('nan')):.3f})")
            hist.bar([b["lower"] + (k + 0.5) * width for b in cal["bins"]], [b["count"] for b in cal["bins"]],
                     width=width, label=name)
        rel.set(xlabel="mean confidence (top class)", ylabel="accuracy", title="reliability diagram",
                xlim=(0, 1), ylim=(0, 1))
        hist.set(xlabel="confidence (top class)", ylabel="test rows", title="confidence histogram", xlim=(0, 1))
        rel.legend(fontsize=7)
        hist.legend(fontsize=7)
        return Plot("reliability", "reliability diagrams", to_svg(fig))


def _slices(models) -> tuple[Plot | None, str]:
    have = [(n, m["slices"]["slices"]) for n, m in models if (m.get("slices") or {}).get("slices")]
    if not have:
        return None, ""
    names = [s["slice"] for s in have[-1][1]]
    with figure(1, width=6.0, height=max(2.2, 0.22 * len(names) + 1)) as (fig, (ax,)):
        h = 0.8 / len(have)
        for k, (name, rows) in enumerate(have):
            acc = {s["slice"]: s.get("accuracy") for s in rows}
            ys = np.arange(len(names)) + (k - (len(have) - 1) / 2) * h
            ax.barh(ys, [acc.get(n) or 0.0 for n in names], height=h, label=name)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="accuracy", ylabel="slice", title="accuracy per slice", xlim=(0, 1))
        ax.legend(fontsize=7)
        plot = Plot("slices", "per-slice accuracy", to_svg(fig))
    rows = have[-1][1]
    tab = table(["slice", "rows", "accuracy", "macro_f1", "worst"],
                [[s["slice"], s["num_rows"], s.get("accuracy"), s.get("macro_f1"), s.get("worst")] for s in rows],
                mark={i for i, s in enumerate(rows) if s.get("worst")}, caption=f"slices of {have[-1][0]}")
    return plot, tab


def section(data: RunData) -> Section:
    models = _models(data)
    if not models:
        return Section.unavailable("evaluation", TITLE, "no evaluated teacher or student in the registry")
    sec = Section("evaluation", TITLE)
    sec.blocks.append(table(["model", *HEADLINE], [[n, *(m.get(k) for k in HEADLINE)] for n, m in models],
                            caption="test split"))
    if len(models) < 2:
        sec.blocks.append(note(f"only {models[0][0]} was evaluated: the other model is not available"))
    for plot in (_confusion(models), _reliability(models)):
        if plot is not None:
            sec.plots.append(plot)
    return sec


def slices_section(data: RunData) -> Section:
    models = _models(data)
    if not models:
        return Section.unavailable("slices", SLICES_TITLE, "no evaluated teacher or student in the registry")
    plot, tab = _slices(models)
    if plot is None:
        return Section.unavailable("slices", SLICES_TITLE, "no slices were evaluated")
    return Section("slices", SLICES_TITLE, plots=[plot], blocks=[tab])
