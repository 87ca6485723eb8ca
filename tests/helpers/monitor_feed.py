"""Monitor data for a finished run without serving it: the Ray-free `Monitor` (the one the `MonitorActor`
wraps) scores the registered production student's traffic as a replica would hand it over, normal then
shifted on one feature, with delayed labels; its snapshot and stored traffic go under `<root>/monitor/`,
and each phase's report is recorded as the demo records the endpoint's `/v1/monitor` report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raysys.data import read_split
from raysys.registry import Registry
from raysys.report import record_monitor_report


def _phase(mon, loaded, table, *, shift: dict[str, float], seed: int, batch: int, start_id: int,
           label_every: int = 2) -> int:
    """Send `table`'s rows (shifted by `shift` standard deviations) in requests of one row, batched `batch`
    rows per record call; label every `label_every`-th request. Returns the next request id."""
    pre, schema = loaded.preprocessor, loaded.schema
    cols = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
    for name, sigma in shift.items():
        cols[name] = cols[name] + sigma * float(np.std(cols[name]))
    x_num, x_cat, y = pre.transform_batch(cols)
    x_raw = np.stack([np.asarray(cols[f.name], dtype=np.float32) for f in schema.numeric], 1)
    with torch.inference_mode():
        proba = torch.softmax(loaded.model(torch.as_tensor(x_num), torch.as_tensor(x_cat)), 1).numpy()
    rng = np.random.default_rng(seed)
    rid = start_id
    for lo in range(0, len(y), batch):
        hi = min(lo + batch, len(y))
        ids = [f"r{rid + i}" for i in range(hi - lo)]
        mon.record({"x_num": x_raw[lo:hi], "x_cat": x_cat[lo:hi], "proba": proba[lo:hi],
                    "latency_ms": (rng.gamma(4.0, 0.5, hi - lo) + (0.5 if shift else 0.0)).tolist(),
                    "model_version": loaded.version, "request_ids": ids})
        for i, r in enumerate(ids):
            if (rid + i) % label_every == 0:
                mon.record_feedback(r, int(y[lo + i]))
        rid += hi - lo
    return rid


def feed_monitor(root: str | Path, *, model_name: str = "raysys-student", shift_sigma: float = 1.5,
                 rows: int = 600) -> dict:
    """Two phases of traffic (normal, then shifted on the first numeric feature) through a `Monitor` of the
    production student; returns the last report."""
    from raysys.monitor.core import Monitor

    root = Path(root)
    loaded = Registry(root / "registry").load(model_name, "production")
    cfg = {**loaded.config["monitor"], "snapshot_uri": str(root / "monitor" / "snapshots"),
           "traffic_uri": str(root / "monitor" / "traffic"), "window_size": 300, "min_rows": 100,
           "min_labels": 50}
    clock = [0.0]
    mon = Monitor(loaded.reference_profile, loaded.schema.model_dump(), cfg, model_version=loaded.version,
                  clock=lambda: clock[0], snapshot_key="report-test")
    test = read_split(loaded.config["data"]["root"], "test")
    half = min(rows, test.num_rows // 2)
    feature = loaded.schema.numeric[0].name
    rid = 0
    report = {}
    for phase, shift, part in (("normal traffic", {}, test.slice(0, half)),
                               (f"traffic shifted {shift_sigma} sigma on {feature}", {feature: shift_sigma},
                                test.slice(half, half))):
        rid = _phase(mon, loaded, part, shift=shift, seed=rid, batch=20, start_id=rid)
        clock[0] += 60.0
        report = mon.report()
        record_monitor_report(root, report, phase, now=1_800_000_000.0 + clock[0])
    mon.snapshot()
    return report
