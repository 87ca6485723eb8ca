"""Benchmark: the raysys Serve endpoint against the plain uvicorn + FastAPI app a user would write instead.

    .venv/bin/python benchmarks/serve_load.py [--quick] [--duration 8] [--concurrency 1,8,32,128]

One run, one machine, one student, one load generator:

- (a) raysys: `serve.app` deployed exactly as `raysys serve` / `make demo` deploy it (the shipped default
  config: ingress mode from `serve.ingress`, batching, replicas), on an embedded local Ray;
- (b) plain: `benchmarks/_plain_fastapi.py` under one uvicorn process, scoring each request on its own with
  the same model and the same validation code, started by this script.

The load generator is an asyncio + aiohttp client in this process: `c` workers, each sending one-row
`POST /v1/predict` requests back to back for `--duration` seconds after a warm-up. Per target and
concurrency: requests/s, p50 and p99 latency (ms) and non-2xx count; concurrency 32 is measured `--repeats`
times, alternating the targets (medians of per-round ratios). Then the monitor's cost: the raysys endpoint
with the monitor on and off (two apps deployed side by side, the same config otherwise) at concurrency 32 in
`--monitor-pairs` pairs of short points, ordered on/off, off/on, on/off, ... so that a drift in machine load
falls on both alike; the cost is the median over pairs of 1 - on/off (the pooled figure and the spread are
printed too). Each monitor point is measured for 10 s, Ray's metrics report period: every 10 s Ray's metrics
agent (DashboardAgent) spends ~1 s of a core replaying each histogram observation the replicas recorded
(Ray 2.60, `record_histogram_aggregated_batch`), halving throughput for that second on this 2-core box. A
point of 10 s holds one such burst whatever its phase; shorter points hold one or none, which swamped a ~2%
effect with +-10% noise per pair.

The student is the demo preset's default student architecture, untrained (throughput does not depend on
the weights), registered with a reference profile so that the monitor runs.

The last line printed is one JSON object with `c32_throughput_ratio` (raysys / plain), `c32_p99_ratio`
(raysys / plain) and `monitor_throughput_cost` (1 - on / off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from _common import scratch_dir  # noqa: E402

MODEL = "raysys-student"


def make_registry(root: Path, seed: int = 0):
    import torch

    from raysys.config import preset
    from raysys.data import Preprocessor, SyntheticTask
    from raysys.models import build_model, model_spec
    from raysys.monitor.profile import ReferenceProfile
    from raysys.registry import Registry

    cfg = preset("demo")
    task = SyntheticTask(cfg.data)
    schema = task.schema()
    table = task.sample(5000, [seed, 1])
    pre = Preprocessor.fit(schema, table)
    profile = ReferenceProfile.from_table(schema, table, num_bins=cfg.monitor.num_bins).to_dict()
    spec = model_spec(schema, cfg.distill.student)
    torch.manual_seed(seed)
    reg = Registry(root / "registry")
    version = reg.register(MODEL, state_dict=build_model(spec).state_dict(), model_spec=spec, schema=schema,
                           preprocessor=pre, metrics={}, config={}, lineage={"note": "serve_load benchmark"},
                           reference_profile=profile)
    reg.set_alias(MODEL, "production", version)
    rows = table.drop_columns([schema.label]).to_pylist()
    bodies = [json.dumps({"instances": [r]}).encode() for r in rows[:2000]]
    return reg, spec, bodies


# ----------------------------------------------------------------------------------------------------
# load generator
# ----------------------------------------------------------------------------------------------------


async def _load(url: str, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float) -> dict:
    import aiohttp

    from serve.apikey import auth_headers

    # the endpoint needs its key (the plain server ignores it): both get the same headers
    headers = {"content-type": "application/json", **auth_headers()}
    latencies: list[float] = []
    total = [0]
    codes: Counter = Counter()
    errors: Counter = Counter()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t_start = time.perf_counter()
        t_measure = t_start + warmup_s
        t_stop = t_measure + duration_s

        async def worker(i: int) -> None:
            k = i
            while True:
                t = time.perf_counter()
                if t >= t_stop:
                    return
                body = bodies[k % len(bodies)]
                k += concurrency
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except Exception as e:  # a refused/reset connection is a failed request, counted
                    status = None
                    errors[type(e).__name__] += 1
                done = time.perf_counter()
                total[0] += 1
                if t >= t_measure and done <= t_stop:
                    latencies.append(done - t)
                    codes[status] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    lat = np.array(latencies) * 1000
    ok = sum(v for k, v in codes.items() if k is not None and 200 <= k < 300)
    return {"concurrency": concurrency, "requests": int(len(lat)), "rps": round(ok / duration_s, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "non_2xx": int(len(lat) - ok), "errors": dict(errors), "total": total[0]}


def _cpu_s(procs) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # psutil.NoSuchProcess: a process that went away counts what it had
            pass
    return total


def load(url: str, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float,
         procs=()) -> dict:
    """One load point. With `procs` (psutil.Process of the server side), also the server CPU time per
    request over the whole point: a figure machine load barely moves, unlike requests/s."""
    cpu0, t0 = _cpu_s(procs), time.perf_counter()
    out = asyncio.run(_load(url, bodies, concurrency, duration_s, warmup_s))
    if procs:
        cpu, wall = _cpu_s(procs) - cpu0, time.perf_counter() - t0
        out["server_cpu_ms_per_request"] = round(cpu * 1000 / max(1, out.pop("total")), 3)
        out["server_cpu_cores"] = round(cpu / wall, 2)
    else:
        out.pop("total")
    return out


def server_processes(name: str | None = None, pid: int | None = None) -> list:
    """The processes serving a target: the uvicorn process (pid), or for raysys app `name` its replicas,
    HAProxy, Serve's HAProxyManager actor and the monitor actors."""
    import psutil

    if pid is not None:
        return [psutil.Process(pid)]
    out = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (f"ServeReplica:{name}:" in cmd or "haproxy" in (proc.info["name"] or "") or "ray::Monitor" in cmd
                or "ray::HAProxyManager" in cmd):
            out.append(proc)
    return out


def wait_http(url: str, timeout_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


# ----------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------


def start_plain(reg, port: int) -> subprocess.Popen:
    env = dict(os.environ, RAYSYS_BENCH_REGISTRY=reg.uri, RAYSYS_BENCH_MODEL=MODEL, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks._plain_fastapi:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--no-access-log"],
                            cwd=ROOT, env=env, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client concurrencies")
    p.add_argument("--repeats", type=int, default=5, help="rounds at c32 (raysys, plain)")
    p.add_argument("--monitor-pairs", type=int, default=6, help="on/off pairs for the monitor's cost")
    p.add_argument("--monitor-duration", type=float, default=10.0,
                   help="measured seconds per monitor point (a multiple of Ray's 10 s metrics period)")
    p.add_argument("--serve-cfg", default="{}", help="JSON ServeConfig overrides for the raysys app (exploration)")
    p.add_argument("--quick", action="store_true", help="--duration 3 --warmup 1 --concurrency 8,32 --repeats 2 "
                                                         "--monitor-pairs 4 --monitor-duration 2")
    p.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.concurrency, args.repeats = 3.0, 1.0, "8,32", 2
        args.monitor_pairs, args.monitor_duration = 4, 2.0
    levels = [int(c) for c in args.concurrency.split(",")]
    if 32 not in levels:
        levels.append(32)

    logging.basicConfig(level=logging.WARNING)
    import ray
    from ray import serve

    from serve.apikey import API_TOKEN_ENV
    from serve.app import build_app
    from serve.ingress import apply_ingress_env, free_port, serve_start

    tmp = scratch_dir("raysys-serve-load-")  # removed at exit
    reg, spec, bodies = make_registry(tmp)
    serve_port = args.port or free_port()
    plain_port = free_port()
    env = apply_ingress_env()  # the shipped default, as raysys.workflow.cluster.init_ray applies it
    # HAProxy binds all interfaces, so the endpoint refuses to start without a key: a scratch one for this run
    os.environ.setdefault(API_TOKEN_ENV, secrets.token_urlsafe(32))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve_start("127.0.0.1", serve_port)
    results: dict = {}
    monitor_pairs: list[dict] = []
    plain = None
    try:
        base = f"http://127.0.0.1:{serve_port}"

        def deploy(monitor: bool, name: str) -> str:
            serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor": monitor,
                                 "monitor_name": f"bench_monitor_{name}",
                                 "serve_cfg": json.loads(args.serve_cfg)}), name=name, route_prefix=f"/{name}")
            url = f"{base}/{name}"
            wait_http(f"{url}/healthz")
            load(f"{url}/v1/predict", bodies, 8, 2.0, 0.5)  # warm the replica and the monitor link
            return url

        on_url = deploy(True, "mon_on")
        off_url = deploy(False, "mon_off")
        plain = start_plain(reg, plain_port)
        plain_url = f"http://127.0.0.1:{plain_port}"
        load(f"{plain_url}/v1/predict", bodies, 8, 2.0, 0.5)
        targets = {"raysys": on_url, "plain": plain_url}
        procs = {"raysys": server_processes("mon_on"), "plain": server_processes(pid=plain.pid),
                 "raysys_monitor_off": server_processes("mon_off")}
        for c in levels:
            # targets alternate at each level, and c32 is measured `repeats` times (medians, paired ratios),
            # so that drifts in machine load hit all targets alike
            rounds = []
            for _ in range(args.repeats if c == 32 else 1):
                rnd = {name: load(f"{url}/v1/predict", bodies, c, args.duration, args.warmup, procs[name])
                       for name, url in targets.items()}
                rounds.append(rnd)
                print(json.dumps({"c": c, **{k: {m: v[m] for m in ("rps", "p50_ms", "p99_ms", "non_2xx",
                                                                      "server_cpu_ms_per_request")}
                                             for k, v in rnd.items()}}), flush=True)
            results[c] = rounds
        monitor_urls = {"raysys": on_url, "raysys_monitor_off": off_url}
        for i in range(args.monitor_pairs):
            order = list(monitor_urls) if i % 2 == 0 else list(reversed(monitor_urls))
            pair = {name: load(f"{monitor_urls[name]}/v1/predict", bodies, 32, args.monitor_duration, 1.0,
                               procs[name]) for name in order}
            monitor_pairs.append(pair)
            print(json.dumps({"monitor_pair": i, **{k: {m: v[m] for m in ("rps", "p99_ms", "non_2xx",
                                                                             "server_cpu_ms_per_request")}
                                                    for k, v in pair.items()}}), flush=True)
    finally:
        if plain is not None:
            plain.kill()
            plain.wait()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def med(rounds, name, key):
        return round(statistics.median(r[name][key] for r in rounds), 2)

    per_c = {}
    for c, rounds in results.items():
        per_c[str(c)] = {name: {key: med(rounds, name, key) for key in ("rps", "p50_ms", "p99_ms",
                                                                                  "server_cpu_ms_per_request")}
                         for name in rounds[0]}
        per_c[str(c)]["throughput_ratio"] = round(statistics.median(
            r["raysys"]["rps"] / r["plain"]["rps"] for r in rounds), 3)
    r32 = results[32]
    costs = [1 - r["raysys"]["rps"] / r["raysys_monitor_off"]["rps"] for r in monitor_pairs]
    summary = {
        "benchmark": "serve_load",
        # paired per round (same minute of machine load), then the median over rounds
        "c32_throughput_ratio": per_c["32"]["throughput_ratio"],
        "c32_p99_ratio": round(statistics.median(r["raysys"]["p99_ms"] / r["plain"]["p99_ms"] for r in r32), 3),
        "monitor_throughput_cost": round(statistics.median(costs), 4),
        "monitor": {"pairs": len(costs), "cost_per_pair": [round(c, 4) for c in costs],
                    "cost_quartiles": [round(q, 4) for q in statistics.quantiles(costs, n=4)] if len(costs) > 1 else None,
                    "pooled_cost": round(1 - sum(r["raysys"]["rps"] for r in monitor_pairs)
                                         / sum(r["raysys_monitor_off"]["rps"] for r in monitor_pairs), 4),
                    "rps_on": med(monitor_pairs, "raysys", "rps"),
                    "rps_off": med(monitor_pairs, "raysys_monitor_off", "rps"),
                    "server_cpu_ms_per_request_on": med(monitor_pairs, "raysys", "server_cpu_ms_per_request"),
                    "server_cpu_ms_per_request_off": med(monitor_pairs, "raysys_monitor_off",
                                                         "server_cpu_ms_per_request")},
        "per_concurrency": per_c,
        "non_2xx_total": sum(v["non_2xx"] for rounds in results.values() for r in rounds for v in r.values()),
        "setup": {"duration_s": args.duration, "warmup_s": args.warmup, "repeats": args.repeats,
                  "monitor_pairs": args.monitor_pairs, "monitor_duration_s": args.monitor_duration,
                  "ingress_env": env, "model_spec": {k: v for k, v in spec.items() if k != "schema"},
                  "rows_per_request": 1, "cpus": os.cpu_count(), "python": platform.python_version(),
                  "ray": ray.__version__},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
