"""The demo's client of the HTTP endpoint: request rows (normal or shifted), sending them, reading the
monitor's report back, and a short text summary of that report. Requests carry the endpoint's API key where
`serve.apikey.client_api_key` finds one ($RAYSYS_API_TOKEN, $RAYSYS_API_TOKEN_FILE, ~/.raysys/api_key)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")


def traffic_rows(cfg: PipelineConfig, n: int, *, seed: int, drift: dict[str, float] | None = None) -> list[dict]:
    """`n` request rows. Synthetic data: fresh rows from the generator, covariate-shifted by `drift`
    ({feature: shift in standard deviations}) through `DriftSpec`. Your own data: rows of the test split,
    with the same shift applied to the named numeric columns."""
    from raysys.data import DatasetSchema, DriftSpec, Preprocessor, SyntheticTask, read_split

    if cfg.data.source == "synthetic":
        table = SyntheticTask(cfg.data).sample(n, [cfg.data.seed, 100 + seed],
                                               DriftSpec(covariate=drift or {}))
        rows = table.drop_columns(["label"]).to_pylist()
        return rows
    schema = DatasetSchema.load(cfg.data.root)
    test = read_split(cfg.data.root, "test")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, test.num_rows, n)
    rows = test.take(idx).drop_columns([schema.label]).to_pylist()
    if drift:
        pre = Preprocessor.fit_split(schema, cfg.data.root)
        names = [f.name for f in schema.numeric]
        for feat, shift in drift.items():
            if feat not in names:
                raise ValueError(f"drift: {feat!r} is not a numeric feature; choose from {names}")
            std = float(pre.std[names.index(feat)])
            for r in rows:
                r[feat] = float(r[feat]) + shift * std
    return rows


def send_traffic(url: str, rows: list[dict], *, batch_size: int = 20, timeout_s: float = 30.0) -> dict:
    """POST `rows` to `<url>/v1/predict` in batches; return counts of responses by status and latencies."""
    import requests

    from serve.apikey import auth_headers

    statuses: dict[int, int] = {}
    latencies = []
    with requests.Session() as s:
        s.headers.update(auth_headers())
        for i in range(0, len(rows), batch_size):
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/predict", json={"instances": rows[i:i + batch_size]}, timeout=timeout_s)
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    lat = np.asarray(latencies)
    return {"requests": len(latencies), "rows": len(rows), "statuses": statuses,
            "client_p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "client_p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def wait_for_monitor(url: str, min_rows: int, timeout_s: float = 30.0) -> dict:
    """Poll `/v1/monitor` until it has seen `min_rows` rows (reporting is fire-and-forget, so it lags)."""
    import requests

    from serve.apikey import auth_headers

    headers = auth_headers()
    deadline = time.monotonic() + timeout_s
    report: dict = {}
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/v1/monitor", headers=headers, timeout=10)
        if r.status_code == 200:
            report = r.json()
            if report.get("rows_seen", 0) >= min_rows:
                return report
        time.sleep(0.25)
    raise TimeoutError(f"monitor saw {report.get('rows_seen', 0)} of {min_rows} rows after {timeout_s}s")


def drift_feature(cfg: PipelineConfig) -> str:
    """The feature the demo shifts: the first numeric feature of the schema."""
    from raysys.data import DatasetSchema

    return DatasetSchema.load(cfg.data.root).numeric[0].name


def _report_cell(name: str, st: dict) -> str:
    return f"  {name:<12} PSI {st.get('psi', float('nan')):7.3f}  {'DRIFT' if st.get('drifted') else 'ok':<5}"


REPORT_CELL_WIDTH = len(_report_cell("", {}))  # one feature's cell in format_report (a short name's)


def format_report(report: dict, columns: int = 1, *, flagged_only: bool = False) -> str:
    """A short human-readable drift/latency summary of a monitor report (`columns` features per line;
    `flagged_only`: list only the drifted features, and the others in one line with their largest PSI)."""
    lines = [f"rows seen {report.get('rows_seen')}  window {report.get('window_rows')}  "
             f"model v{report.get('model_version')}"]
    lat = report.get("latency_ms") or {}
    if lat:
        lines.append("latency ms  " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()
                                                if k.startswith("p") and v is not None))
    feats = report.get("features") or {}
    if flagged_only:
        calm = {name: st for name, st in feats.items() if not st.get("drifted")}
        feats = {name: st for name, st in feats.items() if st.get("drifted")}
        if calm:
            top = max(calm, key=lambda name: calm[name].get("psi") or 0.0)
            lines.append(f"  {len(calm)} {'other ' if feats else ''}feature(s) ok, largest PSI "
                         f"{calm[top].get('psi') or 0.0:.3f} ({top})")
    cells = [_report_cell(name, st) for name, st in feats.items()]
    for i in range(0, len(cells), max(1, columns)):
        lines.append("".join(cells[i:i + max(1, columns)]).rstrip())
    alerts = report.get("alerts") or []
    lines.append(f"alerts: {', '.join(a if isinstance(a, str) else a.get('feature', str(a)) for a in alerts) or 'none'}")
    return "\n".join(lines)


def exercise_endpoint(cfg: PipelineConfig, url: str, *, shift_sigma: float = 1.5) -> dict:
    """Send a window of normal traffic, then a window shifted on one feature, reading the monitor after
    each; also one bad request to show the 422. Returns both reports and the traffic counts."""
    import requests

    from serve.apikey import auth_headers

    headers = auth_headers()
    n = cfg.monitor.window_size
    feat = drift_feature(cfg)
    out: dict[str, Any] = {"drift_feature": feat, "shift_sigma": shift_sigma}
    bad = traffic_rows(cfg, 1, seed=7)
    bad[0]["no_such_feature"] = 1.0
    r = requests.post(f"{url}/v1/predict", json={"instances": bad}, headers=headers, timeout=30)
    out["bad_request"] = {"status": r.status_code, "body": r.json() if r.content else None}

    before = requests.get(f"{url}/v1/monitor", headers=headers, timeout=10).json().get("rows_seen", 0)
    out["normal_traffic"] = send_traffic(url, traffic_rows(cfg, n, seed=1))
    out["normal_report"] = wait_for_monitor(url, before + n)
    log.info("[traffic] %d normal rows sent, alerts: %s", n, out["normal_report"].get("alerts"))
    out["drift_traffic"] = send_traffic(url, traffic_rows(cfg, n, seed=2, drift={feat: shift_sigma}))
    out["drift_report"] = wait_for_monitor(url, before + 2 * n)
    log.info("[traffic] %d rows shifted by %.1f sigma on %s sent, alerts: %s", n, shift_sigma, feat,
             out["drift_report"].get("alerts"))
    return out
