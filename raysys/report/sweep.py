"""The distillation sweep: validation accuracy against each swept parameter, against student size and
latency, with the Pareto front (accuracy up, parameters down, latency down) and the chosen student marked."""

from __future__ import annotations

from typing import Any

from raysys.report.load import RunData
from raysys.report.parts import Plot, Section, note, table
from raysys.report.svg import figure, to_svg

TITLE = "Distillation sweep"
PARAMS = ("temperature", "alpha", "lr", "hidden_dims")


def _ok(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if isinstance(t.get("best_val_accuracy"), int | float) and not t.get("error")]


def _size(t: dict[str, Any]) -> str:
    h = t.get("hidden_dims")
    return "x".join(str(x) for x in h) if isinstance(h, list) else str(h)


def _marked(ax, trials, x_of, *, front_line: bool) -> None:
    """Every trial as a dot, the Pareto front as rings (joined by a line), the chosen one as a star."""
    xs = [x_of(t) for t in trials]
    ys = [t["best_val_accuracy"] for t in trials]
    ax.scatter(xs, ys, s=18, color="#7f7f7f", label="trial", zorder=2)
    front = sorted((x_of(t), t["best_val_accuracy"]) for t in trials if t.get("pareto"))
    if front:
        fx, fy = zip(*front)
        ax.scatter(fx, fy, s=60, facecolors="none", edgecolors="#1f77b4", label="Pareto front", zorder=3)
        if front_line:
            ax.step(fx, fy, where="post", color="#1f77b4", linewidth=1, zorder=1)
    chosen = [t for t in trials if t.get("chosen")]
    if chosen:
        ax.scatter([x_of(t) for t in chosen], [t["best_val_accuracy"] for t in chosen], marker="*", s=160,
                   color="#d62728", label="chosen student", zorder=4)


def _tradeoffs(trials, teacher_acc: float | None) -> Plot:
    with figure(2, width=4.4) as (fig, (size, lat)):
        _marked(size, trials, lambda t: t.get("num_parameters") or 0, front_line=True)
        size.set(xlabel="student parameters", ylabel="best validation accuracy", title="accuracy vs size")
        lat_trials = [t for t in trials if isinstance(t.get("latency_ms_per_row"), int | float)]
        _marked(lat, lat_trials, lambda t: t["latency_ms_per_row"] * 1000, front_line=False)
        lat.set(xlabel="latency per row in a batch (us)", ylabel="best validation accuracy",
                title="accuracy vs latency")
        for ax in (size, lat):
            if teacher_acc is not None:
                ax.axhline(teacher_acc, color="#2ca02c", linestyle="--", linewidth=1, label="teacher")
            ax.legend(fontsize=7)
        return Plot("sweep-tradeoffs", "accuracy against size and latency", to_svg(fig),
                    "Rings: the Pareto front; star: the student chosen and registered.")


def _params(trials) -> Plot:
    swept = [p for p in PARAMS if len({repr(t.get(p)) for t in trials}) > 1] or ["temperature"]
    with figure(len(swept), width=3.2) as (fig, axes):
        for ax, p in zip(axes, swept):
            if p == "hidden_dims":
                cats = sorted({_size(t) for t in trials}, key=lambda s: (len(s), s))
                _marked(ax, trials, lambda t, c=cats: c.index(_size(t)), front_line=False)
                ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
            else:
                _marked(ax, trials, lambda t, p=p: t.get(p) if t.get(p) is not None else 0, front_line=False)
                if p == "lr":
                    ax.set_xscale("log")
            ax.set(xlabel=p, ylabel="best validation accuracy", title=f"accuracy vs {p}")
        axes[0].legend(fontsize=7)
        return Plot("sweep-params", "accuracy against the swept parameters", to_svg(fig))


def _trial_table(trials) -> str:
    cols = ("trial_id", "temperature", "alpha", "lr", "hidden_dims", "num_parameters", "best_val_accuracy",
            "best_epoch", "epochs_run", "stopped_early", "latency_ms_per_row", "pareto", "chosen")
    rows = sorted(trials, key=lambda t: (-(t.get("best_val_accuracy") or 0), str(t.get("trial_id"))))
    return table(list(cols), [[t.get(c) for c in cols] for t in rows],
                 mark={i for i, t in enumerate(rows) if t.get("chosen")}, caption="trials (best first)")


def section(data: RunData) -> Section:
    if not data.sweep:
        return Section.unavailable("sweep", TITLE, "no sweep_summary.json (the distillation stage did not run)")
    trials = _ok(data.sweep.get("trials") or [])
    if not trials:
        return Section.unavailable("sweep", TITLE, "the sweep has no finished trial")
    teacher_acc = data.sweep.get("teacher_val_accuracy")
    teacher_acc = teacher_acc if isinstance(teacher_acc, int | float) and teacher_acc == teacher_acc else None
    sec = Section("sweep", TITLE, plots=[_tradeoffs(trials, teacher_acc), _params(trials)])
    s = data.sweep
    sec.blocks.append(note(f"sweep {s.get('sweep_id', '?')}: search {s.get('search', '?')}, scheduler "
                           f"{s.get('scheduler', '?')}, {len(s.get('trials') or [])} trials; chosen "
                           f"{s.get('best_config')}. Rule: {s.get('selection_rule', '?')}"))
    sec.blocks.append(_trial_table(trials))
    return sec
