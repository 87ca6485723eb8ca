"""The monitor's side of a run: its reports over time, its last snapshot, and the traffic (+ joined labels) it
stored. Read with pyarrow and numpy only (importing `raysys.monitor` would start Ray's import chain).

    <root>/monitor/reports.jsonl   one `/v1/monitor` report per line, `{"time", "phase", "report"}`, appended by
                                   `record_monitor_report` (the demo after each traffic phase)
    <snapshot_uri>/<key>/state.json   the monitor's snapshot (monitor.snapshot_uri; default <root>/monitor/snapshots)
    <traffic_uri>/part-*.parquet      stored traffic: ts, model_version, features, prediction, confidence
    <traffic_uri>/labels/part-*.parquet   joined feedback: ts, label, prediction, model_version
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

REPORTS_FILE = "monitor/reports.jsonl"


@dataclass
class MonitorData:
    reports: list[dict[str, Any]] = field(default_factory=list)  # {"time", "phase", "report"}, oldest first
    snapshot: dict[str, Any] | None = None
    snapshot_uri: str | None = None
    traffic: pa.Table | None = None
    labels: pa.Table | None = None
    traffic_uri: str | None = None

    @property
    def empty(self) -> bool:
        return not self.reports and self.snapshot is None and self.traffic is None


def record_monitor_report(root: str | Path, report: dict[str, Any], phase: str,
                          now: float | None = None) -> Path:
    """Append one monitor report (what `GET /v1/monitor` returned) to `<root>/monitor/reports.jsonl`."""
    path = Path(root) / REPORTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time() if now is None else now, "phase": phase, "report": report},
                      sort_keys=True, default=str)
    with path.open("a") as f:
        f.write(line + "\n")
    return path


def _reports(root: Path, problems: list[str]) -> list[dict[str, Any]]:
    path = root / REPORTS_FILE
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{i + 1}: {e}")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("report"), dict):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time") or 0)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def _listing(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    return sorted(fs.get_file_info(sel), key=lambda i: i.path)


def _snapshot(uri: str, problems: list[str]) -> dict[str, Any] | None:
    """The newest `state.json` under `uri` (one directory per monitor key)."""
    try:
        fs, root = _fs(uri)
        states = []
        for info in _listing(fs, root):
            if info.type != pafs.FileType.Directory:
                continue
            try:
                with fs.open_input_stream(f"{info.path}/state.json") as f:
                    st = json.loads(f.read())
            except (FileNotFoundError, OSError, ValueError):
                continue
            states.append({**st, "key": info.base_name})
        return max(states, key=lambda s: s.get("time") or 0) if states else None
    except (OSError, ValueError) as e:
        problems.append(f"monitor snapshot {uri}: {e}")
        return None


def _parquet_dir(uri: str, problems: list[str]) -> pa.Table | None:
    """Every `*.parquet` directly under `uri`, concatenated and sorted by `ts`; None when there is none."""
    try:
        fs, root = _fs(uri)
        files = [i.path for i in _listing(fs, root) if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
        tables = [pq.read_table(p, filesystem=fs) for p in files]
    except (OSError, ValueError, pa.ArrowException) as e:
        problems.append(f"stored traffic {uri}: {e}")
        return None
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    if "ts" in table.column_names:
        table = table.sort_by("ts")
    return table


def load_monitor(root: Path, snapshot_uri: str | None, traffic_uri: str | None,
                 problems: list[str]) -> MonitorData:
    """The monitor's reports, snapshot and traffic; the default places under `<root>/monitor/` are looked at
    when the config names none."""
    snap = snapshot_uri or (str(root / "monitor" / "snapshots") if (root / "monitor" / "snapshots").is_dir() else None)
    traffic = traffic_uri or (str(root / "monitor" / "traffic") if (root / "monitor" / "traffic").is_dir() else None)
    out = MonitorData(reports=_reports(root, problems), snapshot_uri=snap, traffic_uri=traffic)
    if snap:
        out.snapshot = _snapshot(snap, problems)
    if traffic:
        out.traffic = _parquet_dir(traffic, problems)
        out.labels = _parquet_dir(f"{traffic.rstrip('/')}/labels", problems)
    return out
