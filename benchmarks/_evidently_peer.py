"""The Evidently peer of benchmarks/drift.py: Evidently's default data-drift evaluation
(`Report([DataDriftPreset()]).run(current, reference)`) on the same frames, run in its own virtualenv.

Evidently is not a raysys dependency and must not become one: it pins pandas/plotly/nltk/litestar and more,
and an unpinned install pulls pandas 3, which Evidently 0.7.23 cannot import
(`pandas.core.dtypes.common.infer_dtype_from_object` is gone). So it lives in `.venv-evidently/` (gitignored),
created once by `ensure_evidently_python()`, and drift.py talks to it through Parquet files and one JSON line:

    from benchmarks._evidently_peer import run_evidently
    res = run_evidently(ref_columns, [cur_columns, ...], repeats=1)   # dict, or None (reason printed)

Modes of this file:
    <evidently venv>/bin/python benchmarks/_evidently_peer.py --reference ref.parquet --current cur.parquet \
        [--current cur2.parquet ...] [--repeats N]     # prints ONE JSON line (the peer)
    .venv/bin/python benchmarks/_evidently_peer.py --selftest   # 50 N(0,1) features: speed, false flags, vs raysys

What is timed: `Report([DataDriftPreset()]).run(cur_df, ref_df)` with Evidently's defaults (include_tests
off, as in `Report`'s default; turning tests on made a run 2-3x slower here), i.e. computing the drift result
and the widgets `run()` always builds; not HTML rendering, not Parquet reading. One untimed warm-up run comes
first (imports, lazy registries). Per-column verdicts are Evidently's own `drift_detected` of each column's
`ValueDrift`, recorded by wrapping the function it calls (the wrapper only stores the verdict); the
dataset-level verdict is `DriftedColumnsCount`'s share >= `drift_share` (0.5), Evidently's definition.
Defaults worth knowing: with more than 1,000 reference rows a numeric column is tested with the normed
Wasserstein distance at 0.1 (a fixed distance, so a small window flags unshifted columns), else KS at p 0.05;
there is no multiple-testing correction across columns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVIDENTLY_VERSION = "0.7.23"
# pandas<3: Evidently 0.7.23 imports a pandas-internal name that pandas 3 removed.
EVIDENTLY_REQUIREMENTS = [f"evidently=={EVIDENTLY_VERSION}", "pandas>=2.2,<3", "pyarrow"]
_MARKER = ".raysys-evidently-ok"


def _venv_python(d: Path) -> Path:
    return d / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_evidently_python(dir: Path = Path(".venv-evidently"), *, timeout_s: int = 900) -> Path | None:  # noqa: A002
    """Creates (once) a separate virtualenv with Evidently and returns its python, or None with the reason
    printed (offline, no venv/ensurepip, pip failure). A relative `dir` is taken from the repository root.
    The install takes ~45 s here; later calls only check a marker file naming the pinned requirements."""
    d = dir if dir.is_absolute() else REPO / dir
    py = _venv_python(d)
    marker = d / _MARKER
    want = " ".join(EVIDENTLY_REQUIREMENTS)
    if py.exists() and marker.exists() and marker.read_text().strip() == want:
        return py
    t0 = time.perf_counter()
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, capture_output=True, text=True,
                           timeout=120)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *EVIDENTLY_REQUIREMENTS], check=True, capture_output=True, text=True, timeout=timeout_s)
        check = subprocess.run([str(py), "-c", "import evidently, pyarrow; print(evidently.__version__)"],
                               check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as e:
        tail = "\n".join(((e.stderr or "") + (e.stdout or "")).strip().splitlines()[-5:])
        print(f"evidently peer: could not set up {d} ({' '.join(map(str, e.cmd[:4]))} ... exited {e.returncode}; "
              f"offline?): {tail}", file=sys.stderr)
        return None
    except (subprocess.TimeoutExpired, OSError) as e:
        print(f"evidently peer: could not set up {d}: {e}", file=sys.stderr)
        return None
    version = check.stdout.strip()
    if version != EVIDENTLY_VERSION:
        print(f"evidently peer: {d} has evidently {version}, expected {EVIDENTLY_VERSION}", file=sys.stderr)
        return None
    marker.write_text(want + "\n")
    print(f"evidently peer: installed evidently {version} into {d} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return py


def _write_parquet(cols: dict, path: Path) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {str(k): np.asarray(v) for k, v in cols.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1 or any(a.ndim != 1 for a in arrays.values()):
        raise ValueError("run_evidently: every column must be a 1-D array and all of the same length")
    pq.write_table(pa.table(arrays), path)
    return lengths.pop()


def run_evidently(ref: dict, currents: list[dict], repeats: int = 1, *,
                  venv_dir: Path = Path(".venv-evidently"), timeout_s: int = 1800) -> dict | None:
    """Runs Evidently's DataDriftPreset over every column of `ref` (name -> 1-D array) against each frame in
    `currents` (same names), `repeats` timed evaluations per current frame, in the Evidently venv. Returns the
    peer's JSON (see `_peer_main`): `seconds_median`/`seconds_min` per evaluation and, per current frame,
    `drifted` (column -> bool), `num_drifted`, `share_drifted`, `dataset_drift`; or None with the reason
    printed when Evidently cannot be installed or the run fails."""
    py = ensure_evidently_python(venv_dir)
    if py is None:
        return None
    with tempfile.TemporaryDirectory(prefix="raysys-evidently-") as tmp:
        tmp = Path(tmp)
        _write_parquet(ref, tmp / "ref.parquet")
        args = [str(py), str(Path(__file__).resolve()), "--reference", str(tmp / "ref.parquet"),
                "--repeats", str(int(repeats))]
        for i, cur in enumerate(currents):
            _write_parquet(cur, tmp / f"cur{i}.parquet")
            args += ["--current", str(tmp / f"cur{i}.parquet")]
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"evidently peer: timed out after {timeout_s} s", file=sys.stderr)
            return None
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if p.returncode != 0 or not lines:
        tail = "\n".join(p.stderr.strip().splitlines()[-8:])
        print(f"evidently peer: exited {p.returncode}: {tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


# ------------------------------------------------------------------ the peer (runs in the Evidently venv)
def _peer_main(reference: str, currents: list[str], repeats: int) -> dict:
    import warnings

    import numpy as np
    import pandas as pd

    warnings.filterwarnings("ignore")
    import evidently
    from evidently import Report
    from evidently.metrics import column_statistics
    from evidently.presets import DataDriftPreset

    # Record each column's own verdict (drift_detected) from the call ValueDrift makes; nothing else changes.
    seen: dict[str, dict] = {}
    inner = column_statistics.get_one_column_drift

    def recording(*a, **kw):
        drift = inner(*a, **kw)
        seen[kw["column_name"]] = {
            "drifted": bool(drift.drift_detected), "score": float(drift.drift_score),
            "method": drift.stattest_name, "threshold": drift.stattest_threshold}
        return drift

    column_statistics.get_one_column_drift = recording

    ref = pd.read_parquet(reference)
    curs = [pd.read_parquet(c) for c in currents]

    def evaluate(cur):
        seen.clear()
        t0 = time.perf_counter()
        snap = Report([DataDriftPreset()]).run(cur, ref)
        return time.perf_counter() - t0, snap

    warm_s, _ = evaluate(curs[0])
    times: list[float] = []
    out_curs = []
    for path, cur in zip(currents, curs):
        per = []
        for _ in range(max(1, repeats)):
            s, snap = evaluate(cur)
            per.append(s)
        times += per
        d = snap.dict()
        count = next(m["value"] for m in d["metrics"] if m["config"]["type"].endswith("DriftedColumnsCount"))
        drift_share = next(m["config"].get("drift_share", 0.5) for m in d["metrics"]
                           if m["config"]["type"].endswith("DriftedColumnsCount"))
        cols = [c for c in ref.columns if c in seen]
        methods: dict[str, int] = {}
        for c in cols:
            key = f"{seen[c]['method']} @ {seen[c]['threshold']}"
            methods[key] = methods.get(key, 0) + 1
        num = sum(seen[c]["drifted"] for c in cols)
        out_curs.append({
            "path": os.path.basename(path), "rows": len(cur), "seconds": [round(x, 4) for x in per],
            "num_drifted": num, "share_drifted": num / max(1, len(cols)),
            # Evidently's own count (DriftedColumnsCount), computed separately; must equal num_drifted
            "evidently_count": int(count["count"]),
            "dataset_drift": bool(float(count["share"]) >= drift_share),
            "drifted": {c: seen[c]["drifted"] for c in cols},
            "scores": {c: round(seen[c]["score"], 5) for c in cols},
            "methods": methods,
        })
    return {
        "peer": "evidently", "evidently_version": evidently.__version__, "pandas_version": pd.__version__,
        "numpy_version": np.__version__, "call": "Report([DataDriftPreset()]).run(current, reference)",
        "reference_rows": len(ref), "columns": len(ref.columns), "repeats": repeats,
        "evaluations": len(times), "warmup_s": round(warm_s, 4),
        "seconds_median": float(np.median(times)), "seconds_min": float(np.min(times)),
        "seconds_max": float(np.max(times)), "loadavg": list(os.getloadavg()), "currents": out_curs,
    }


# ------------------------------------------------------------------ self-test (runs in the project venv)
def _selftest(repeats: int, windows: int) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from raysys.data.schema import DatasetSchema, FeatureSpec
    from raysys.monitor.drift import WindowTester
    from raysys.monitor.profile import ReferenceProfile

    n_feat, n_ref, shifted = 50, 10_000, 7
    names = [f"x{j}" for j in range(n_feat)]
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((n_feat, 4))  # a fixed "model": pred = argmax of a projection, as drift.py passes pred
    x_ref = rng.standard_normal((n_ref, n_feat))
    cases: dict[str, list[np.ndarray]] = {
        "none_1000": [rng.standard_normal((1000, n_feat)) for _ in range(windows)],
        "none_100": [rng.standard_normal((100, n_feat)) for _ in range(windows)],
        "sigma05_1of50_1000": [],
    }
    for _ in range(windows):
        w = rng.standard_normal((1000, n_feat))
        w[:, shifted] += 0.5
        cases["sigma05_1of50_1000"].append(w)

    t0 = time.perf_counter()
    py = ensure_evidently_python()
    install_s = time.perf_counter() - t0
    if py is None:
        return {"error": "evidently could not be installed (see stderr)"}

    # raysys, the way drift.py's measure_eval calls it
    schema = DatasetSchema(features=[FeatureSpec(name=n, kind="numeric") for n in names], label="y",
                           classes=["a", "b", "c", "d"])
    prof = ReferenceProfile.from_arrays(schema, x_ref, np.zeros((n_ref, 0), np.int64), pred=(x_ref @ proj).argmax(1))
    tester = WindowTester(prof)
    ours: dict[str, dict] = {}
    for name, ws in cases.items():
        ms, flags, ds = [], [], []
        tester.test(ws[0], np.zeros((len(ws[0]), 0), np.int64), pred=(ws[0] @ proj).argmax(1))  # warm-up
        for w in ws:
            xc, pr = np.zeros((len(w), 0), np.int64), (w @ proj).argmax(1)
            for _ in range(20):
                t = time.perf_counter()
                res = tester.test(w, xc, pred=pr, alpha=0.01, method="bh")
                ms.append((time.perf_counter() - t) * 1000)
            flags.append([res["features"][n]["drifted"] for n in names])
            ds.append(any(flags[-1]))
        ours[name] = {"eval_ms_median": float(np.median(ms)), "flags": flags, "dataset_drift": ds}

    load_before = os.getloadavg()
    ev: dict[str, dict] = {}
    for name, ws in cases.items():
        r = run_evidently({n: x_ref[:, j] for j, n in enumerate(names)},
                          [{n: w[:, j] for j, n in enumerate(names)} for w in ws], repeats=repeats)
        if r is None:
            return {"error": f"evidently run failed on {name} (see stderr)"}
        ev[name] = r
    load_after = os.getloadavg()

    def rates(flag_rows: list[list[bool]], skip: int | None) -> list[float]:
        keep = [j for j in range(n_feat) if j != skip]
        return [round(sum(f[j] for j in keep) / len(keep), 3) for f in flag_rows]

    out: dict = {"evidently_version": next(iter(ev.values()))["evidently_version"],
                 "install_or_check_s": round(install_s, 1), "features": n_feat, "reference_rows": n_ref,
                 "windows_per_case": windows, "evidently_repeats": repeats,
                 "loadavg_before_evidently": [round(x, 2) for x in load_before],
                 "loadavg_after_evidently": [round(x, 2) for x in load_after], "cases": {}}
    for name in cases:
        e, o = ev[name], ours[name]
        skip = shifted if name.startswith("sigma") else None
        e_flags = [[c["drifted"][n] for n in names] for c in e["currents"]]
        case = {
            "evidently_s_median": round(e["seconds_median"], 3), "evidently_s_min": round(e["seconds_min"], 3),
            "evidently_warmup_s": e["warmup_s"],
            "raysys_eval_ms_median": round(o["eval_ms_median"], 3),
            "speedup_vs_evidently": round(e["seconds_median"] * 1000 / o["eval_ms_median"], 1),
            "evidently_false_flag_rate": rates(e_flags, skip),
            "evidently_dataset_drift": [c["dataset_drift"] for c in e["currents"]],
            "evidently_count_matches": all(c["evidently_count"] == c["num_drifted"] for c in e["currents"]),
            "evidently_methods": e["currents"][0]["methods"],
            "raysys_false_flag_rate": rates(o["flags"], skip),
            "raysys_dataset_drift": o["dataset_drift"],
        }
        if skip is not None:
            case["evidently_flags_shifted_column"] = [f[skip] for f in e_flags]
            case["raysys_flags_shifted_column"] = [f[skip] for f in o["flags"]]
        out["cases"][name] = case
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", help="reference Parquet (peer mode, inside the Evidently venv)")
    ap.add_argument("--current", action="append", default=[], help="current-window Parquet; repeatable")
    ap.add_argument("--repeats", type=int, default=1, help="timed evaluations per current file")
    ap.add_argument("--selftest", action="store_true", help="run from the project venv: speed and false flags")
    ap.add_argument("--windows", type=int, default=5, help="self-test windows per case")
    args = ap.parse_args(argv)
    if args.selftest:
        print(json.dumps(_selftest(args.repeats, args.windows)))
        return 0
    if not args.reference or not args.current:
        ap.error("peer mode needs --reference and at least one --current (or use --selftest)")
    print(json.dumps(_peer_main(args.reference, args.current, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
