"""Training curves per epoch, one line per teacher run (labelled with its parallel strategy): loss,
validation accuracy, samples/s and per-rank memory (params + grads + optimizer state, as each rank holds it)."""

from __future__ import annotations

from typing import Any

from raysys.report.load import ModelVersion, RunData
from raysys.report.parts import Plot, Section, note, table
from raysys.report.svg import figure, to_svg

TITLE = "Training curves (teacher, per epoch)"


def _label(t: ModelVersion, epochs: list[dict[str, Any]]) -> str:
    last = epochs[-1]
    return f"v{t.version} {last.get('strategy', '?')} x{last.get('world_size', '?')}"


def _runs(data: RunData) -> list[tuple[str, list[dict[str, Any]]]]:
    out = []
    for t in data.teachers:
        epochs = [e for e in t.metrics.get("epochs") or [] if isinstance(e, dict) and "epoch" in e]
        if epochs:
            out.append((_label(t, epochs), sorted(epochs, key=lambda e: e["epoch"])))
    return out


def _series(ax, runs, key: str, *, style: str = "-o", suffix: str = "") -> bool:
    drawn = False
    for label, epochs in runs:
        pts = [(e["epoch"], e[key]) for e in epochs if isinstance(e.get(key), int | float)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, markersize=3, label=label + suffix)
            drawn = True
    return drawn


def _curves(runs) -> Plot:
    with figure(3, width=3.6) as (fig, (loss, acc, speed)):
        _series(loss, runs, "train_loss", suffix=" train")
        _series(loss, runs, "val_loss", style="--s", suffix=" validation")
        loss.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="loss")
        _series(acc, runs, "val_accuracy")
        acc.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
        _series(speed, runs, "samples_per_s")
        speed.set(xlabel="epoch", ylabel="samples/s (all ranks)", title="throughput")
        speed.set_yscale("log")
        for ax in (loss, acc, speed):
            ax.legend(fontsize=7)
        return Plot("training-curves", "loss, validation accuracy and samples/s per epoch", to_svg(fig),
                    "The first epoch's samples/s includes start-up (workers, data pipeline).")


def _memory(runs) -> Plot | None:
    rows = [(label, e["epoch"], rank, b) for label, epochs in runs for e in epochs
            for rank, b in enumerate(e.get("mem_per_rank_total_bytes") or [])]
    if not rows:
        return None
    with figure(1, width=5.0) as (fig, (ax,)):
        for label, epochs in runs:
            ranks = max((len(e.get("mem_per_rank_total_bytes") or []) for e in epochs), default=0)
            for r in range(ranks):
                pts = [(e["epoch"], e["mem_per_rank_total_bytes"][r] / 2**20) for e in epochs
                       if len(e.get("mem_per_rank_total_bytes") or []) > r]
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "-o", markersize=3, label=f"{label} rank {r}")
        ax.set(xlabel="epoch", ylabel="MiB per rank (params+grads+optimizer)", title="per-rank training state")
        ax.legend(fontsize=7)
        return Plot("training-memory", "per-rank memory", to_svg(fig),
                    "Bytes of parameters, gradients and optimizer state each rank holds (sharding shows here).")


def _last_epoch_table(runs) -> str:
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s", "mem_max_total_bytes", "resumes")
    return table(["run", *keys], [[label, *(epochs[-1].get(k) for k in keys)] for label, epochs in runs],
                 caption="last epoch of each teacher run")


def section(data: RunData) -> Section:
    if not data.teachers:
        return Section.unavailable("training", TITLE, "no teacher in the registry (the teacher stage did not run)")
    runs = _runs(data)
    if not runs:
        return Section.unavailable("training", TITLE, "the teacher versions carry no per-epoch metrics")
    sec = Section("training", TITLE, plots=[_curves(runs)])
    mem = _memory(runs)
    if mem is not None:
        sec.plots.append(mem)
    else:
        sec.blocks.append(note("per-rank memory: not available (not reported by these runs)"))
    sec.blocks.append(_last_epoch_table(runs))
    return sec
