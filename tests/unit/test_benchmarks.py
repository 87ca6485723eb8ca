"""The benchmark scripts still import: they run by hand (never in CI), so a refactor of a module they use
can break one silently (benchmarks/sweep.py imported a function benchmarks/distill.py no longer had)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import REPO

BENCH = REPO / "benchmarks"
# the user-facing scripts; the `_` helpers are imported by them (`_plain_fastapi` is a uvicorn app that
# loads a registered model from its environment at import, `_evidently_peer` runs in its own environment)
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def test_every_benchmark_script_is_listed():
    assert {"distill", "sweep", "train_scaling", "serve_load", "drift"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_has_a_main(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_import_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert callable(getattr(mod, "main", None)), f"benchmarks/{name}.py has no main()"


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_pure_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_real_tables_pure_parts(monkeypatch):
    """benchmarks/real_tables.py without Ray: table selection, a bundled table's facts, the per-table row and
    the summary over tables (median and worst student delta, latency ratio, the issue's goals)."""
    rt = _load("real_tables", monkeypatch)
    assert len(rt.TABLES) >= 6 and set(rt.parse_tables(None, quick=True)) < set(rt.parse_tables(None, quick=False))
    assert rt.parse_tables("iris, wine", quick=False) == ["iris", "wine"]
    with pytest.raises(SystemExit, match="--tables: unknown"):
        rt.parse_tables("iris,nope", quick=False)
    frame, label = rt.TABLES["iris"].load()
    assert rt.describe(frame, label) == {"rows": 150, "numeric": 4, "categorical": 0, "classes": 3,
                                         "missing_share": 0.0}
    peers = {"hgb_accuracy": 0.9, "logreg_accuracy": 0.85, "hgb_fit_s": 0.1, "logreg_fit_s": 0.1}
    lat = {"student_batch1_ms": 0.1, "hgb_batch1_ms": 1.0, "hgb_over_student": 10.0}
    rows = [rt.table_row("iris", {}, 0.95, 0.88, peers, lat, 1.0, {}, 22),
            rt.table_row("wine", {}, 0.90, 0.91, peers, {**lat, "hgb_over_student": 4.0}, 1.0, {}, 26),
            {"table": "digits", "error": "ValueError: x"}]
    assert rows[0]["teacher_minus_hgb_pts"] == 5.0 and rows[0]["student_minus_hgb_pts"] == -2.0
    s = rt.summarise(rows)
    assert s["tables_done"] == 2 and s["tables_failed"] == ["digits"]
    assert s["median_student_minus_hgb_pts"] == -0.5 and s["worst_student_minus_hgb_pts"] == -2.0
    assert s["median_latency_ratio_hgb_over_student"] == 7.0
    assert s["goals"] == {"median_student_delta_ge_-1pt": True, "no_table_below_-3pt": True,
                          "student_5x_faster_batch1": True}
    # a small table runs on several seeded splits; its figures are means over them, latency the median
    assert rt.num_splits(178, None) == rt.SMALL_TABLE_SPLITS > 1 and rt.num_splits(336_776, None) == 1
    assert rt.num_splits(178, 2) == 2
    splits = [rt.table_row("wine", {}, 0.96, s_acc, {**peers, "hgb_accuracy": h}, {**lat, "hgb_over_student": r},
                           1.0, {}, 27) for s_acc, h, r in ((0.9259, 1.0, 8.0), (1.0, 0.9630, 12.0), (0.963, 0.963, 9.0))]
    wine = rt.combine(splits)
    assert wine["splits"] == 3 and wine["test_rows"] == 81 and wine["hgb_over_student"] == 9.0
    assert wine["student_minus_hgb_pts_per_split"] == [-7.41, 3.7, 0.0]
    assert wine["student_minus_hgb_pts"] == pytest.approx((-7.41 + 3.7 + 0.0) / 3, abs=0.01)
    assert wine["student_accuracy"] == pytest.approx((0.9259 + 1.0 + 0.963) / 3, abs=1e-4)
    assert rt.combine(splits[:1])["splits"] == 1


def test_serve_load_ratios_pair_rounds_and_pick_the_best_peer(monkeypatch):
    """benchmarks/serve_load.py's figures without servers: per-round ratios (medians), the peer with the most
    throughput, the one with the least CPU per request, and the open loop's least p99."""
    sl = _load("serve_load", monkeypatch)

    def pt(rps, p99, cpu):
        return {"rps": rps, "p50_ms": p99 / 3, "p99_ms": p99, "server_cpu_ms_per_request": cpu,
                "server_cpu_cores": 1.0, "non_2xx": 0}

    rounds = [{"raysys": pt(100, 10, 0.6), "uvicorn": pt(200, 5, 0.4), "gunicorn": pt(150, 4, 0.3)},
              {"raysys": pt(120, 10, 0.6), "uvicorn": pt(200, 5, 0.4), "gunicorn": pt(100, 4, 0.3)},
              {"raysys": pt(110, 10, 0.6), "uvicorn": pt(220, 5, 0.4), "gunicorn": pt(110, 4, 0.3)}]
    lvl = sl.per_level(rounds)
    assert lvl["raysys"]["rps"] == 110 and lvl["uvicorn"]["rps"] == 200 and lvl["non_2xx"] == 0
    assert lvl["vs_uvicorn"]["throughput_ratio"] == 0.5  # median of 0.5, 0.6, 0.5
    assert lvl["vs_gunicorn"]["throughput_ratio"] == 1.0  # median of 0.667, 1.2, 1.0
    opened = {"raysys": {"p99_ms": 8.0}, "uvicorn": {"p99_ms": 4.0}, "gunicorn": {"p99_ms": 16.0}}
    h = sl.headline(lvl, opened)
    assert h["best_peer"] == "uvicorn" and h["c32_throughput_ratio_vs_best_peer"] == 0.5
    assert h["c32_p99_ratio_vs_best_peer"] == 2.0
    assert h["cpu_per_request_peer"] == "gunicorn" and h["cpu_per_request_ratio"] == 2.0
    assert h["open_loop_peer"] == "uvicorn" and h["open_loop_p99_ratio"] == 2.0


def test_soak_memory_is_flat_only_when_every_process_is(monkeypatch):
    """benchmarks/soak.py's verdict over its per-process slopes (the last half of the run): one process over the
    bound names itself and makes the whole not flat; no slope at all is no verdict of flatness."""
    soak = _load("soak", monkeypatch)
    bound = soak.FLAT_MB_PER_MIN
    mem = {"replica:1": {"slope_last_half_mb_per_min": 0.08}, "monitor:2": {"slope_last_half_mb_per_min": 0.06},
           "haproxy:3": {"slope_last_half_mb_per_min": None}}
    assert soak.memory_verdict(mem) == {"memory_flat": True, "memory_not_flat": [], "memory_flat_mb_per_min": bound}
    mem["replica:4"] = {"slope_last_half_mb_per_min": bound * 4}
    out = soak.memory_verdict(mem)
    assert out["memory_flat"] is False and out["memory_not_flat"] == ["replica:4"]
    assert soak.memory_verdict({"haproxy:3": {"slope_last_half_mb_per_min": None}})["memory_flat"] is False


def test_gpu_check_without_cuda_runs_nothing_and_says_so(monkeypatch, capsys):
    """benchmarks/gpu_check.py on a machine without CUDA: exit 0, one JSON line with cuda false (no Ray started);
    the strategies it would run per GPU count."""
    import json

    import torch

    gc = _load("gpu_check", monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "gpu_check" and out["cuda"] is False
    assert gc.plan(0) == [] and [s for s, _ in gc.plan(1)] == ["ddp", "zero1", "zero3"]
    assert {s for s, w in gc.plan(4) if w == 4} == {"ddp", "zero1", "zero2", "zero3"}


def test_sweep_rounds_log_gives_back_only_this_setups_rounds_the_last_line_winning(monkeypatch, tmp_path):
    import json

    sweep = _load("sweep", monkeypatch)
    key, other = {"num_samples": 48, "train_rows": 150_000}, {"num_samples": 12, "train_rows": 0}
    log = tmp_path / "rounds.jsonl"
    assert sweep.logged_rounds(None, key) == {} and sweep.logged_rounds(log, key) == {}

    def line(r, setup, wall):
        return json.dumps({"round": r, "setup": setup, "tuned": {"wall_s": wall}, "random": {"wall_s": 10 * wall}})

    log.write_text("\n".join([line(0, key, 1.0), line(1, other, 2.0), line(2, key, 3.0), "", line(0, key, 4.0)]) + "\n")
    got = sweep.logged_rounds(log, key)
    assert sorted(got) == [0, 2] and got[0]["tuned"]["wall_s"] == 4.0 and got[2]["random"]["wall_s"] == 30.0
    assert sorted(sweep.logged_rounds(log, other)) == [1]


def test_sweep_holdout_splits_hold_their_fraction_of_all_rows(monkeypatch):
    sweep = _load("sweep", monkeypatch)
    n = sweep.holdout_rows(150_000, 0.15)
    assert n == 32_143 and abs(n / (150_000 + 2 * n) - 0.15) < 1e-5
    assert sweep.holdout_rows(7_000, 0.15) == 1_500
    for bad in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="--holdout-fraction"):
            sweep.holdout_rows(1000, bad)
