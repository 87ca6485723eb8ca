"""Model cards (Mitchell et al., 2019): what a registered version is for, what it was trained on, how it
scores overall and per slice, what it should not be trusted with, and where it came from.

`build_model_card` returns a JSON-able dict; the registry stores it as `model_card.json` beside the
weights and renders it with `render_markdown` to `model_card.md` (`raysys registry show production`
prints that). Both files are in the version's manifest, so their sha256 is checked like the weights'.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import raysys
from raysys.registry.trustcard import governance_limitations, governance_lines
from raysys.registry.trustcard import md_table as _table

CARD_FORMAT = 1


def code_version() -> str:
    """raysys's version plus the git commit of the checkout it runs from (when there is one)."""
    version = raysys.__version__
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return f"{version}+g{out.stdout.strip()}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _r(x: Any, nd: int = 4) -> Any:
    return round(float(x), nd) if isinstance(x, (int, float)) and x is not None else x


def headline_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The figures a card leads with, from a `raysys.evaluate.full_evaluation` dict."""
    lat = m.get("latency") or {}
    out = {
        "accuracy": _r(m.get("accuracy")), "macro_precision": _r(m.get("macro_precision")),
        "macro_recall": _r(m.get("macro_recall")), "macro_f1": _r(m.get("macro_f1")),
        "log_loss": _r(m.get("log_loss")), "roc_auc_macro": _r((m.get("roc_auc") or {}).get("macro")),
        "ece": _r((m.get("calibration") or {}).get("ece")), "teacher_agreement": _r(m.get("teacher_agreement")),
        "num_parameters": m.get("num_parameters"), "num_samples": m.get("num_samples"),
    }
    if lat:
        out["latency_per_row_ms_p50"] = _r(lat["per_row_ms"]["p50"], 5)
        out["latency_per_row_ms_p99"] = _r(lat["per_row_ms"]["p99"], 5)
        out["latency_per_batch_ms_p50"] = _r(lat["per_batch_ms"]["p50"], 5)
        out["latency_per_batch_ms_p99"] = _r(lat["per_batch_ms"]["p99"], 5)
        out["latency_batch_size"] = lat["per_batch_ms"]["batch_size"]
    return {k: v for k, v in out.items() if v is not None}


def build_model_card(*, name: str, kind: str, schema: dict[str, Any] | Any, data_fingerprint: str,
                     metrics: dict[str, Any], training_config: dict[str, Any] | None = None,
                     distillation: dict[str, Any] | None = None, teacher_metrics: dict[str, Any] | None = None,
                     lineage: dict[str, Any] | None = None, quantization: str | None = None,
                     intended_use: str | None = None, limitations: list[str] | None = None,
                     data_root: str | None = None, data_quality: dict[str, Any] | None = None,
                     governance: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model card as a dict. `metrics` is the test split's `full_evaluation`; `teacher_metrics` the
    teacher's (for retention); `distillation` the sweep's summary (best config, rule, trials, ...);
    `data_quality` the data quality report's summary (`raysys.data.quality.card_summary`); `governance` the
    trust figures, checks and NIST AI RMF view (`raysys.trust.governance_section`)."""
    if hasattr(schema, "model_dump"):
        schema = json.loads(schema.model_dump_json())
    head = headline_metrics(metrics)
    compare: dict[str, Any] = {}
    if teacher_metrics:
        t_acc = teacher_metrics.get("accuracy")
        compare = {"teacher_accuracy": _r(t_acc), "teacher_num_parameters": teacher_metrics.get("num_parameters")}
        if t_acc:
            compare["retention"] = _r(metrics["accuracy"] / t_acc)
        if teacher_metrics.get("num_parameters") and metrics.get("num_parameters"):
            compare["param_ratio"] = _r(metrics["num_parameters"] / teacher_metrics["num_parameters"], 5)
        t_lat = (teacher_metrics.get("latency") or {}).get("per_row_ms", {}).get("p50")
        s_lat = (metrics.get("latency") or {}).get("per_row_ms", {}).get("p50")
        if t_lat and s_lat:
            compare["latency_speedup_per_row_p50"] = _r(t_lat / s_lat, 3)
    slices = metrics.get("slices") or {}
    lims = list(limitations or [])
    worst = slices.get("worst")
    if worst:
        lims.append(f"Weakest slice: {worst['slice']} (accuracy {worst['accuracy']:.3f} on {worst['num_rows']} test "
                    f"rows, overall {metrics['accuracy']:.3f}).")
    ece = (metrics.get("calibration") or {}).get("ece")
    if ece is not None and ece > 0.05:
        lims.append(f"Probabilities are not well calibrated (ECE {ece:.3f}); do not read them as frequencies.")
    lims.append("Scores rows like the training data only: the schema's features, categories and classes. "
                "Inputs drifting from the training distribution (see the monitor's PSI report) void these figures.")
    for f in (data_quality or {}).get("findings") or []:
        lims.append(f"Data quality {f['level']}: {f['check']}: {f['message']}.")
    lims += governance_limitations(governance)
    if quantization:
        lims.append(f"Weights are quantized ({quantization}) at load time; figures are for the quantized model.")
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "kind": kind,
        "intended_use": intended_use or (
            f"Tabular classification into {schema.get('classes')} from the features below, served behind the "
            "raysys HTTP endpoint. A distilled student: a small, fast stand-in for the teacher it was "
            "trained from."),
        "data": {"fingerprint": data_fingerprint, "root": data_root, "schema": schema,
                 "num_test_rows": metrics.get("num_samples"), "quality": data_quality},
        "training": training_config or {},
        "distillation": distillation or {},
        "quantization": quantization,
        "metrics": {"test": head, "compared_to_teacher": compare,
                    "per_class": metrics.get("per_class"), "confusion_matrix": metrics.get("confusion_matrix"),
                    "roc_auc": metrics.get("roc_auc"),
                    "calibration": {k: v for k, v in (metrics.get("calibration") or {}).items()}},
        "slices": slices,
        "limitations": lims,
        "lineage": {"code_version": code_version(), **(lineage or {})},
    }
    if governance:
        card["governance"] = governance
    return card


def _quality_lines(q: dict[str, Any] | None) -> list[str]:
    """The card's data quality section: status, findings, every check's value, the report's path."""
    if not q:
        return []
    lines = ["## Data quality", "", f"- status: **{q.get('status')}** (report `{q.get('report')}`)"]
    if q.get("findings"):
        lines += [""] + _table(["check", "level", "value", "threshold", "finding"],
                               [[f["check"], f["level"], f["value"], f["threshold"], f["message"]]
                                for f in q["findings"]])
    values = q.get("values") or {}
    if values:
        lines += ["", "Checks run (value per check):", ""] + _table(["check", "value"], [[k, v] for k, v in values.items()])
    return lines + [""]


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, sections in a fixed order."""
    lines = [f"# Model card: {card.get('name')}" + (f" ({card['kind']})" if card.get("kind") else ""), ""]
    lines += ["## Intended use", "", str(card.get("intended_use", "")), ""]
    m = card.get("metrics") or {}
    test = m.get("test") or {}
    if test:
        lines += ["## Metrics (test split)", ""] + _table(["metric", "value"], [[k, test[k]] for k in sorted(test)])
        lines.append("")
    comp = m.get("compared_to_teacher") or {}
    if comp:
        lines += ["### Compared to the teacher", ""] + _table(["figure", "value"], [[k, comp[k]] for k in sorted(comp)])
        lines.append("")
    pc = m.get("per_class") or {}
    classes = ((card.get("data") or {}).get("schema") or {}).get("classes") or []
    if pc.get("f1"):
        names = classes if len(classes) == len(pc["f1"]) else list(range(len(pc["f1"])))
        auc = (m.get("roc_auc") or {}).get("per_class") or [None] * len(names)
        lines += ["### Per class", ""] + _table(
            ["class", "precision", "recall", "f1", "roc_auc", "support"],
            [[n, p, r, f, a, s] for n, p, r, f, a, s in zip(names, pc["precision"], pc["recall"], pc["f1"], auc,
                                                             pc["support"])])
        lines.append("")
    cm = m.get("confusion_matrix")
    if cm:
        names = classes if len(classes) == len(cm) else list(range(len(cm)))
        lines += ["### Confusion matrix (rows: true class)", ""] + _table(
            ["true \\ predicted", *map(str, names)], [[n, *row] for n, row in zip(names, cm)])
        lines.append("")
    cal = m.get("calibration") or {}
    if cal.get("bins"):
        lines += [f"### Calibration (ECE {cal.get('ece', 0):.4f}, MCE {cal.get('mce', 0):.4f})", ""] + _table(
            ["confidence bin", "rows", "mean confidence", "accuracy"],
            [[f"{b['lower']:.2f}-{b['upper']:.2f}", b["count"], b["confidence"], b["accuracy"]]
             for b in cal["bins"] if b["count"]])
        lines.append("")
    sl = card.get("slices") or {}
    if sl.get("slices"):
        lines += ["## Slices", ""] + _table(
            ["slice", "rows", "accuracy", "macro_f1", "worst"],
            [[s["slice"], s["num_rows"], s["accuracy"], s["macro_f1"], "WORST" if s.get("worst") else ""]
             for s in sl["slices"]])
        lines.append("")
    lines += governance_lines(card.get("governance"))
    lines += ["## Limitations", ""] + [f"- {x}" for x in card.get("limitations") or []] + [""]
    data = card.get("data") or {}
    schema = data.get("schema") or {}
    lines += ["## Data", "", f"- fingerprint: `{data.get('fingerprint')}`", f"- root: `{data.get('root')}`",
              f"- label: `{schema.get('label')}`, classes: {schema.get('classes')}"]
    for f in schema.get("features") or []:
        extra = f" categories {f['categories']}" if f.get("categories") else ""
        lines.append(f"- feature `{f['name']}`: {f['kind']}{extra}")
    lines.append("")
    lines += _quality_lines(data.get("quality"))
    dist = card.get("distillation") or {}
    if dist:
        lines += ["## Distillation", ""]
        for k in ("sweep_id", "search", "scheduler", "best_config", "best_val_accuracy", "teacher_val_accuracy",
                  "selection_rule", "pareto", "num_trials", "soft_targets", "results_dir"):
            if k in dist:
                lines.append(f"- {k}: `{json.dumps(dist[k], default=str)}`")
        lines.append("")
    if card.get("quantization"):
        lines += ["## Quantization", "", f"`{card['quantization']}`: post-training dynamic int8 of every Linear "
                  "layer (torch.ao.quantization.quantize_dynamic); re-applied on load from the float weights.", ""]
    if card.get("training"):
        lines += ["## Training and distillation config", "", "```json",
                  json.dumps(card["training"], indent=2, default=str), "```", ""]
    lines += ["## Lineage", ""] + [f"- {k}: `{v}`" for k, v in (card.get("lineage") or {}).items()] + [""]
    return "\n".join(lines)
