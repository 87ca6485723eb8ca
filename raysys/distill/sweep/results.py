"""The sweep's outcome: one row per trial (its best checkpoint measured), the Pareto front of (accuracy up,
parameters down, latency down), the chosen student, and the summary files.

The rule: the smallest student (fewest parameters) whose validation accuracy is within `accuracy_gap` of the
teacher's; ties go to the more accurate, then the faster. When no trial is that close, the most accurate
one is chosen. The results directory holds Tune's own files plus `summary.csv`, `summary.md` and
`sweep_summary.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raysys.distill.sweep.trial import METRIC, epoch_rank, load_weights, trial_spec
from raysys.models import build_model, num_parameters

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("trial_id", "temperature", "alpha", "lr", "hidden_dims", "num_parameters", "best_val_accuracy",
                   "best_epoch", "epochs_run", "stopped_early", "latency_ms_per_row", "pareto", "chosen", "error")
_LAST_METRICS = ("epoch", "train_loss", "train_soft", "train_hard", "val_loss", "val_accuracy")


@dataclass
class SweepResult:
    """The outcome of `run_sweep`.

    best_config: the chosen trial's `{"temperature", "alpha", "lr", "hidden_dims"}`.
    best_val_accuracy: validation accuracy of `best_state_dict` (the best epoch of the chosen trial:
        each trial keeps its best-scoring checkpoint, so this is early stopping on validation accuracy).
    best_state_dict: the chosen student's weights, loaded from that checkpoint's safetensors file.
    student_spec: `raysys.models.model_spec` dict of the chosen student; `build_model(student_spec)` takes
        `best_state_dict`.
    trials: one dict per trial: `trial_id`, `temperature`, `alpha`, `lr`, `hidden_dims`, `num_parameters`,
        the last reported metrics (`epoch`, `val_accuracy`, `val_loss`, ...), `best_val_accuracy`,
        `best_epoch`, `epochs_run`, `stopped_early`, `latency_ms_per_row`, `pareto`, `chosen`, `error`, `path`.
    results_dir: the Tune experiment directory (under `cfg.run_dir`); `summary.csv`/`summary.md` live there.
    sweep_id: the experiment name (lineage of the registered student).
    """

    best_config: dict[str, Any]
    best_val_accuracy: float
    best_state_dict: dict[str, torch.Tensor]
    student_spec: dict[str, Any]
    trials: list[dict[str, Any]]
    results_dir: str
    best_epoch: int = 0
    best_checkpoint_path: str = ""
    teacher_val_accuracy: float = float("nan")
    scheduler: str = "fifo"
    search: str = "grid"
    sweep_id: str = ""
    selection_rule: str = ""
    pareto: list[str] = field(default_factory=list)
    teacher_num_parameters: int = 0
    soft_targets: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    max_concurrent_trials: int = 0
    summary_files: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # DP-SGD (distill.dp): `sweep_privacy`; None without it

    def summary(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-serialisable values."""
        return {
            "sweep_id": self.sweep_id, "search": self.search, "scheduler": self.scheduler,
            "best_config": dict(self.best_config), "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch, "best_checkpoint_path": self.best_checkpoint_path,
            "teacher_val_accuracy": self.teacher_val_accuracy, "teacher_num_parameters": self.teacher_num_parameters,
            "student_spec": dict(self.student_spec), "selection_rule": self.selection_rule,
            "pareto": list(self.pareto), "trials": [dict(t) for t in self.trials],
            "results_dir": self.results_dir, "soft_targets": dict(self.soft_targets),
            "wall_seconds": self.wall_seconds, "max_concurrent_trials": self.max_concurrent_trials,
            "summary_files": dict(self.summary_files), "privacy": self.privacy,
        }


@dataclass
class Candidate:
    """A trial with a checkpoint: its summary row, best checkpoint, that checkpoint's metrics, its spec."""

    row: dict[str, Any]
    checkpoint: Any
    metrics: dict[str, Any]
    spec: dict[str, Any]


def _trial_row(result, spec: dict[str, Any], num_epochs: int) -> dict[str, Any]:
    conf, metrics = result.config, result.metrics or {}
    last = {k: v for k, v in metrics.items() if k in _LAST_METRICS}
    row: dict[str, Any] = {
        "trial_id": metrics.get("trial_id") or Path(result.path).name,
        "temperature": float(conf["temperature"]), "alpha": float(conf["alpha"]), "lr": float(conf["lr"]),
        "hidden_dims": list(spec["hidden_dims"]), "num_parameters": None, **last,
        "epochs_run": int(last.get("epoch", 0)),
        "error": None if result.error is None else repr(result.error)[:500], "path": result.path,
        "best_val_accuracy": None, "best_epoch": None, "latency_ms_per_row": None,
        "pareto": False, "chosen": False, "dp_epsilon": (dp_of(metrics) or {}).get("epsilon"),
        "dp_steps": (dp_of(metrics) or {}).get("steps"),  # DP-SGD steps the trial took, all of them
    }
    row["stopped_early"] = result.error is None and row["epochs_run"] < num_epochs
    return row


def dp_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The DP-SGD accounting in a trial's reported metrics (`fit_student`'s `dp`; Tune may hand it back flattened
    as `dp/<key>`), or None."""
    if isinstance(metrics.get("dp"), dict):
        return dict(metrics["dp"])
    return {k[3:]: v for k, v in metrics.items() if k.startswith("dp/")} or None


def sweep_privacy(chosen: Candidate, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chosen student's DP-SGD accounting, None without DP-SGD. Its weights come from its best epoch, but the
    epochs it trained after that chose that epoch, so its own epsilon is the one of every step it took; and every
    trial of the sweep trained on the same rows, so the released student's guarantee is that of all trials
    composed (RDP, `raysys.trust.dp.composed_epsilon`): `epsilon`. `parts` lists each trial's (noise, rate,
    steps) for composing further (with the teacher's, `raysys.workflow.stages`)."""
    from raysys.trust.dp import composed_epsilon

    dp = dp_of(chosen.metrics)
    if not dp:
        return None
    parts = [(float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(t["dp_steps"]))
             for t in trials if t.get("dp_steps")]
    row = chosen.row
    return {**dp, "trial_epsilon": row["dp_epsilon"], "steps": row["dp_steps"], "epochs": row["epochs_run"],
            "sweep_trials": len(parts), "epsilon": composed_epsilon(parts, float(dp["delta"])), "parts": parts,
            "accountant": "rdp (opacus), every trial of the sweep composed"}


def collect_trials(grid, base_spec: dict[str, Any], val_x_num, val_x_cat, evaluation, num_epochs: int
                   ) -> tuple[list[dict[str, Any]], list[Candidate]]:
    """(one row per trial sorted by id, the trials with a checkpoint), each measured at its best checkpoint:
    parameters and per-row latency at the evaluation batch size on one thread (as a trial or replica sees it).

    Latency belongs to the architecture (the same layers cost the same whatever their weights): it is measured
    once per student spec, so the Pareto front and the choice's tie-break never turn on timing noise between
    trials of one architecture."""
    from raysys.evaluate import measure_latency, torch_threads

    trials: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    latency_of: dict[str, float] = {}
    with torch_threads(1):
        for result in grid:
            spec = trial_spec(base_spec, result.config)
            row = _trial_row(result, spec, num_epochs)
            ckpts = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
            if ckpts:
                c, m = max(ckpts, key=lambda cm: epoch_rank(cm[1]))
                row["best_val_accuracy"] = float(m[METRIC])
                row["best_epoch"] = int(m.get("epoch", 0))
                model = build_model(spec)
                model.load_state_dict(load_weights(c))
                row["num_parameters"] = num_parameters(model)
                arch = json.dumps(spec, sort_keys=True)
                if arch not in latency_of:
                    latency_of[arch] = measure_latency(
                        model, val_x_num, val_x_cat, batch_size=evaluation.latency_batch_size,
                        repeats=max(5, min(evaluation.latency_repeats, 50)), warmup=3)["per_row_in_batch_ms"]
                row["latency_ms_per_row"] = latency_of[arch]
                candidates.append(Candidate(row, c, m, spec))
            trials.append(row)
    trials.sort(key=lambda r: str(r["trial_id"]))
    return trials, candidates


def chosen_weights(candidate: Candidate) -> dict[str, torch.Tensor]:
    state = load_weights(candidate.checkpoint)
    build_model(candidate.spec).load_state_dict(state)  # fail here, not in the registry, if the weights do not fit
    return state


def pareto_front(rows: list[dict[str, Any]], objectives: tuple[tuple[str, str], ...] = (
        ("best_val_accuracy", "max"), ("num_parameters", "min"), ("latency_ms_per_row", "min"))) -> list[int]:
    """Indices of the rows no other row dominates (at least as good on every objective, better on one)."""
    def vec(r: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(r[k]) if m == "max" else -float(r[k]) for k, m in objectives)

    vs = [vec(r) for r in rows]
    front = []
    for i, v in enumerate(vs):
        dominated = any(all(a >= b for a, b in zip(w, v)) and any(a > b for a, b in zip(w, v))
                        for j, w in enumerate(vs) if j != i)
        if not dominated:
            front.append(i)
    return front


def select_student(rows: list[dict[str, Any]], teacher_val_accuracy: float, accuracy_gap: float
                   ) -> tuple[int, str]:
    """Index of the chosen row and the rule, in words (see the module docstring)."""
    if not rows:
        raise ValueError("select_student: no candidate trials")
    floor = teacher_val_accuracy - accuracy_gap
    rule = (f"smallest student (fewest parameters) with val accuracy >= teacher val accuracy "
            f"{teacher_val_accuracy:.4f} - gap {accuracy_gap:g} = {floor:.4f}; ties: higher accuracy, then lower "
            "latency; if none qualifies: the most accurate")
    eligible = [i for i, r in enumerate(rows) if r["best_val_accuracy"] >= floor - 1e-12]
    if eligible:
        i = min(eligible, key=lambda i: (rows[i]["num_parameters"], -rows[i]["best_val_accuracy"],
                                         rows[i]["latency_ms_per_row"]))
        return i, rule
    i = max(range(len(rows)), key=lambda i: (rows[i]["best_val_accuracy"], -rows[i]["num_parameters"],
                                             -rows[i]["latency_ms_per_row"]))
    return i, rule + " (none qualified)"


def _fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return str(v)


def summary_table(trials: list[dict[str, Any]]) -> tuple[str, str]:
    """(CSV text, Markdown text) of the trials, one row each, sorted by parameters then accuracy."""
    rows = sorted(trials, key=lambda t: (t.get("num_parameters") or 0, -(t.get("best_val_accuracy") or 0.0)))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for t in rows:
        w.writerow([_fmt_cell(t.get(c)) for c in SUMMARY_COLUMNS])
    md = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for t in rows:
        cells = []
        for c in SUMMARY_COLUMNS:
            v = t.get(c)
            if c in ("pareto", "chosen", "stopped_early"):
                v = "yes" if v else ""
            cells.append(_fmt_cell(v).replace("|", "/")[:80])
        md.append("| " + " | ".join(cells) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def _write_text(directory: str, name: str, text: str) -> str:
    if "://" in directory:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(directory)
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(text.encode())
        return f"{directory}/{name}"
    p = Path(directory) / name
    p.write_text(text)
    return str(p)


def write_summaries(res: SweepResult, chosen_row: dict[str, Any]) -> None:
    """Write summary.csv, summary.md and sweep_summary.json into the results directory (`res.summary_files`)."""
    csv_text, md_text = summary_table(res.trials)
    md_head = (f"# distillation sweep {res.sweep_id}\n\nsearch `{res.search}`, scheduler `{res.scheduler}`, "
               f"{len(res.trials)} trials, teacher val accuracy {res.teacher_val_accuracy:.4f} "
               f"({res.teacher_num_parameters} parameters)\n\nselection rule: {res.selection_rule}\n\n"
               f"chosen: trial `{chosen_row['trial_id']}` {res.best_config}, val accuracy "
               f"{res.best_val_accuracy:.4f}, {chosen_row['num_parameters']} parameters\n\n")
    files = {"csv": _write_text(res.results_dir, "summary.csv", csv_text),
             "markdown": _write_text(res.results_dir, "summary.md", md_head + md_text)}
    res.summary_files = files
    files["json"] = _write_text(res.results_dir, "sweep_summary.json", json.dumps(res.summary(), indent=2, default=str))
