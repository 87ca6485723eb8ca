"""What a run directory holds, read into one `RunData` (no Ray; nothing here trains or serves).

A run directory is the `--root` of `raysys run` / `raysys demo`:

    <root>/registry/<model>/versions/<N>/{metrics,model_card,lineage,config,reference_profile}.json
    <root>/registry/<model>/aliases/<alias>/<generation>.json        alias moves, with their times
    <root>/runs/distill-*/sweep_summary.json                          the sweep (trials, Pareto front, chosen)
    <root>/data_quality.json (or runs/, data/)                        the data-quality check, when it ran
    <root>/monitor/reports.jsonl                                      monitor reports over time (`history`)
    monitor.snapshot_uri / monitor.traffic_uri                        the monitor's snapshot and stored traffic

Every part is optional: what is missing is `None` (or empty) and the report says "not available".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysys.report.monitor_data import MonitorData, load_monitor

log = logging.getLogger("raysys")

TEACHER_SUFFIX = "-teacher"  # raysys.workflow.stages.TEACHER_SUFFIX (the report sits below the workflow)
DATA_QUALITY_FILES = ("data_quality.json", "runs/data_quality.json", "data/data_quality.json",
                      "data/quality.json", "runs/data_check.json")


@dataclass
class ModelVersion:
    """One registered version, read from its JSON files (never its weights)."""

    name: str
    version: int
    metrics: dict[str, Any]
    card: dict[str, Any] | None = None
    card_md: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    reference_profile: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    @property
    def test(self) -> dict[str, Any]:
        return self.metrics.get("test") or {}


@dataclass
class RunData:
    root: str
    model_name: str | None = None
    teachers: list[ModelVersion] = field(default_factory=list)  # every teacher version, oldest first
    student: ModelVersion | None = None  # the production student (else the newest float student)
    students: list[ModelVersion] = field(default_factory=list)  # every version of the student model, oldest first
    registry: str | None = None
    sweep: dict[str, Any] | None = None
    data_quality: dict[str, Any] | None = None
    data_quality_path: str | None = None
    alias_events: list[dict[str, Any]] = field(default_factory=list)
    monitor: MonitorData = field(default_factory=MonitorData)
    problems: list[str] = field(default_factory=list)  # files that were there but could not be read


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        problems.append(f"{path}: {e}")
        return None


def _version(reg: Path, name: str, version: int, problems: list[str]) -> ModelVersion:
    d = reg / name / "versions" / str(version)
    md = d / "model_card.md"
    return ModelVersion(
        name=name, version=version, metrics=_read_json(d / "metrics.json", problems) or {},
        card=_read_json(d / "model_card.json", problems), card_md=md.read_text() if md.is_file() else None,
        lineage=_read_json(d / "lineage.json", problems) or {}, config=_read_json(d / "config.json", problems) or {},
        reference_profile=_read_json(d / "reference_profile.json", problems))


def _versions(reg: Path, name: str) -> list[int]:
    d = reg / name / "versions"
    if not d.is_dir():
        return []
    # a version is complete once its manifest is there (the registry writes it last)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file())


def alias_events(reg: Path, name: str, problems: list[str]) -> list[dict[str, Any]]:
    """Every recorded alias move of `name` (one generation file each), oldest first."""
    out = []
    root = reg / name / "aliases"
    if not root.is_dir():
        return out
    for alias_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for gen_file in sorted(alias_dir.glob("*.json")):
            st = _read_json(gen_file, problems)
            if not isinstance(st, dict) or "version" not in st:
                continue
            out.append({"model": name, "alias": alias_dir.name, "generation": int(st.get("generation", 0)),
                        "version": st["version"], "previous": st.get("previous"),
                        "rolled_back_from": st.get("rolled_back_from"), "updated_at": st.get("updated_at", "")})
    return sorted(out, key=lambda e: (e["updated_at"], e["alias"], e["generation"]))


def _production(reg: Path, name: str, versions: list[int], problems: list[str]) -> int | None:
    events = [e for e in alias_events(reg, name, problems) if e["alias"] == "production"]
    if events:
        return int(max(events, key=lambda e: e["generation"])["version"])
    return versions[-1] if versions else None


def _model_names(reg: Path) -> tuple[str | None, str | None]:
    """(student model name, teacher model name) found in the registry."""
    names = sorted(p.name for p in reg.iterdir() if p.is_dir()) if reg.is_dir() else []
    teachers = [n for n in names if n.endswith(TEACHER_SUFFIX)]
    students = [n for n in names if not n.endswith(TEACHER_SUFFIX)]
    student = next((n for n in students if n + TEACHER_SUFFIX in teachers), students[0] if students else None)
    teacher = student + TEACHER_SUFFIX if student and student + TEACHER_SUFFIX in teachers else \
        (teachers[0] if teachers else None)
    return student, teacher


def _sweep(root: Path, student: ModelVersion | None, problems: list[str]) -> dict[str, Any] | None:
    """The sweep the student came from (its lineage's sweep_dir), else the newest one under runs/."""
    candidates = []
    if student and student.lineage.get("sweep_dir") and "://" not in student.lineage["sweep_dir"]:
        candidates.append(Path(student.lineage["sweep_dir"]) / "sweep_summary.json")
    for runs in (root / "runs", root):
        candidates += sorted(runs.glob("distill-*/sweep_summary.json"), reverse=True)
    for c in candidates:
        got = _read_json(c, problems)
        if isinstance(got, dict) and got.get("trials"):
            return got
    return None


def _data_quality(root: Path, student: ModelVersion | None, problems: list[str]) -> tuple[dict | None, str | None]:
    for rel in DATA_QUALITY_FILES:
        got = _read_json(root / rel, problems)
        if isinstance(got, dict):
            return got, str(root / rel)
    for src in (student.lineage if student else {}, (student.card or {}) if student else {}):
        if isinstance(src.get("data_quality"), dict):
            return src["data_quality"], "registry (lineage/model card)"
    return None, None


def load_run(root: str | Path, *, registry: str | Path | None = None, snapshot_uri: str | None = None,
             traffic_uri: str | None = None) -> RunData:
    """Read everything the report shows from the run directory `root`; never raises for a missing part."""
    root = Path(root).expanduser().resolve()
    reg = Path(registry).expanduser().resolve() if registry else root / "registry"
    data = RunData(root=str(root), registry=str(reg))
    student_name, teacher_name = _model_names(reg)
    data.model_name = student_name
    if teacher_name:
        data.teachers = [_version(reg, teacher_name, v, data.problems) for v in _versions(reg, teacher_name)]
    if student_name:
        versions = _versions(reg, student_name)
        data.students = [_version(reg, student_name, v, data.problems) for v in versions]
        prod = _production(reg, student_name, versions, data.problems)
        data.student = next((s for s in data.students if s.version == prod), None)
        data.alias_events = alias_events(reg, student_name, data.problems)
    data.sweep = _sweep(root, data.student, data.problems)
    data.data_quality, data.data_quality_path = _data_quality(root, data.student, data.problems)
    mon_cfg = (data.student.config.get("monitor") if data.student else None) or {}
    data.monitor = load_monitor(root, snapshot_uri or mon_cfg.get("snapshot_uri"),
                                traffic_uri or mon_cfg.get("traffic_uri"), data.problems)
    return data
