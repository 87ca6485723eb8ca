"""Benchmark: the raysys Serve endpoint against the servers a user would run instead, driven by independent
load generators, with the server CPU each request costs.

    .venv/bin/python benchmarks/serve_load.py [--quick] [--duration 10] [--concurrency 8,32,128]
        [--peers uvicorn,gunicorn,litserve] [--layouts shared,split]

Needs `wrk` and `hey` (`apt-get install wrk hey`) and the peers' packages (`pip install -e .[bench]`); says so
and exits when one is missing. One run, one machine, one student, every server scoring with the same validation
and scoring code (`serve.parsing`, `serve.scoring`) and one torch thread a process:

- raysys: `serve.app` as `raysys serve` deploys it (the shipped config: HAProxy ingress, batching, 2 replicas, the
  monitor on), on an embedded local Ray;
- uvicorn: benchmarks/_plain_fastapi.py, one process, one request at a time;
- gunicorn: the same app, gunicorn with as many uvicorn workers as the endpoint has replicas;
- litserve: LitServe (benchmarks/_litserve_peer.py), batched (64 rows, 5 ms), as many inference workers.

Closed loop: `wrk` (C), c connections for `--duration` s per point after an unmeasured `--warmup`; requests/s of
2xx answers, p50/p99; c32 measured `--repeats` rounds with the targets in a rotating order (medians of the per-round
ratios). Open loop: `hey` at a fixed offered rate of 70% of the best peer's c32 throughput, p99. Server CPU per
request: the CPU time of every server-side process over the point (for raysys the whole local Ray: replicas,
HAProxy, the monitor, Serve's controller, the raylet, GCS and the dashboard agent; for a peer its process tree) /
requests answered. Layouts: `shared` (servers and load generator on all cores, as on one machine) and `split`
(servers on core 0, the load generator on core 1, `taskset`). Then the monitor's cost: the endpoint with the
monitor on and off (a second app, deployed after the comparison) at c32 in `--monitor-pairs` pairs of 10 s points
(Ray's metrics period; see the notes in README), ordered on/off, off/on, ...; the median over pairs of 1 - on/off.

The student is the demo preset's default student, untrained (throughput does not depend on the weights),
registered with a reference profile so that the monitor runs.

The last line printed is one JSON object: per layout and concurrency the figures per target; on the shared layout
at c32 `c32_throughput_ratio_vs_best_peer`, `c32_p99_ratio_vs_best_peer`, `cpu_per_request_ratio` (endpoint /
the peer with the least CPU per request), `open_loop_p99_ratio` (endpoint / the best peer's p99) and
`monitor_throughput_cost`, each naming the peer it is against.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import scratch_dir  # noqa: E402

MODEL = "raysys-student"
RAYSYS = "raysys"


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
# one point: a load generator against a target, with the target's server CPU over it
# ----------------------------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, url: str, procs):
        self.name, self.url, self.procs = name, url, procs  # procs(): the server's processes now

    def point(self, run, *args, **kw) -> dict:
        from _http_peers import server_cpu_s

        procs = self.procs()
        cpu0, t0 = server_cpu_s(procs), time.perf_counter()
        out = run(f"{self.url}/v1/predict", *args, **kw)
        cpu, wall = server_cpu_s(procs) - cpu0, time.perf_counter() - t0
        answered = out.get("requests", 0) - out.get("non_2xx", 0)
        out["server_cpu_ms_per_request"] = round(cpu * 1000 / max(1, answered), 3)
        out["server_cpu_cores"] = round(cpu / wall, 2)
        return out


def ray_processes(exclude: set[int]) -> list:
    """Every process of the local Ray this driver started (its descendants), less the peers' trees."""
    from _http_peers import tree

    me = os.getpid()
    return [p for p in tree(me) if p.pid != me and p.pid not in exclude]


def closed_loop(targets: list[Target], levels: list[int], args, bodies, client_cpus: str | None, log) -> dict:
    """{c: [round: {target: wrk point}]}; the order of the targets rotates every round."""
    from _loadgen import wrk_point

    out: dict[int, list] = {}
    for c in levels:
        rounds = []
        for r in range(args.repeats if c == 32 else 1):
            k = (r + len(out)) % len(targets)
            rnd = {}
            for t in targets[k:] + targets[:k]:
                if args.warmup:
                    wrk_point(f"{t.url}/v1/predict", bodies, c, args.warmup, cpus=client_cpus)
                rnd[t.name] = t.point(wrk_point, bodies, c, args.duration, cpus=client_cpus)
            rounds.append(rnd)
            log(json.dumps({"c": c, "round": r, **{n: {m: v[m] for m in ("rps", "p50_ms", "p99_ms", "non_2xx",
                                                                         "server_cpu_ms_per_request")}
                                                   for n, v in rnd.items()}}))
        out[c] = rounds
    return out


def open_loop(targets: list[Target], rate: float, args, bodies, client_cpus: str | None, log) -> dict:
    from _loadgen import hey_point

    out = {t.name: t.point(hey_point, bodies, rate, args.open_loop_s, cpus=client_cpus) for t in targets}
    log(json.dumps({"open_loop_rps": rate, **{n: {m: v[m] for m in ("achieved_rps", "p50_ms", "p99_ms", "non_2xx")}
                                              for n, v in out.items()}}))
    return out


def monitor_cost(on: Target, off: Target, args, bodies, log) -> dict:
    from _loadgen import wrk_point

    pairs = []
    for i in range(args.monitor_pairs):
        order = (on, off) if i % 2 == 0 else (off, on)
        pair = {}
        for t in order:
            wrk_point(f"{t.url}/v1/predict", bodies, 32, 1.0)
            pair[t.name] = t.point(wrk_point, bodies, 32, args.monitor_duration)
        pairs.append(pair)
        log(json.dumps({"monitor_pair": i, **{n: {m: v[m] for m in ("rps", "p99_ms", "server_cpu_ms_per_request")}
                                              for n, v in pair.items()}}))
    costs = [1 - p[on.name]["rps"] / p[off.name]["rps"] for p in pairs]
    return {"monitor_throughput_cost": round(statistics.median(costs), 4),
            "pairs": len(costs), "cost_per_pair": [round(c, 4) for c in costs],
            "rps_on": statistics.median(p[on.name]["rps"] for p in pairs),
            "rps_off": statistics.median(p[off.name]["rps"] for p in pairs),
            "server_cpu_ms_per_request_on": statistics.median(p[on.name]["server_cpu_ms_per_request"] for p in pairs),
            "server_cpu_ms_per_request_off": statistics.median(p[off.name]["server_cpu_ms_per_request"]
                                                               for p in pairs)}


# ----------------------------------------------------------------------------------------------------
# the figures
# ----------------------------------------------------------------------------------------------------


def per_level(rounds: list[dict]) -> dict:
    """Medians over rounds per target, and the endpoint's per-round ratios to each peer (medians)."""
    names = list(rounds[0])
    out = {n: {k: round(statistics.median(r[n][k] for r in rounds), 3)
               for k in ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "server_cpu_cores")} for n in names}
    out["non_2xx"] = sum(r[n]["non_2xx"] for r in rounds for n in names)
    for peer in names:
        if peer != RAYSYS:
            out[f"vs_{peer}"] = {
                "throughput_ratio": round(statistics.median(r[RAYSYS]["rps"] / r[peer]["rps"] for r in rounds), 3),
                "p99_ratio": round(statistics.median(r[RAYSYS]["p99_ms"] / r[peer]["p99_ms"] for r in rounds), 3),
                "cpu_per_request_ratio": round(statistics.median(
                    r[RAYSYS]["server_cpu_ms_per_request"] / r[peer]["server_cpu_ms_per_request"] for r in rounds), 3)}
    return out


def headline(c32: dict, open_pts: dict | None) -> dict:
    """The issue's figures at c32: against the peer with the most throughput, the least CPU per request, and in
    the open loop the least p99."""
    peers = [n for n in c32 if n not in (RAYSYS, "non_2xx") and not n.startswith("vs_")]
    fastest = max(peers, key=lambda n: c32[n]["rps"])
    thrifty = min(peers, key=lambda n: c32[n]["server_cpu_ms_per_request"])
    out = {"best_peer": fastest,
           "c32_throughput_ratio_vs_best_peer": c32[f"vs_{fastest}"]["throughput_ratio"],
           "c32_p99_ratio_vs_best_peer": c32[f"vs_{fastest}"]["p99_ratio"],
           "cpu_per_request_peer": thrifty,
           "cpu_per_request_ratio": c32[f"vs_{thrifty}"]["cpu_per_request_ratio"]}
    if open_pts:
        best = min((n for n in open_pts if n != RAYSYS), key=lambda n: open_pts[n]["p99_ms"])
        out.update(open_loop_peer=best,
                   open_loop_p99_ratio=round(open_pts[RAYSYS]["p99_ms"] / open_pts[best]["p99_ms"], 3))
    return out


# ----------------------------------------------------------------------------------------------------
# a layout: a local Ray with the endpoint, the peers beside it
# ----------------------------------------------------------------------------------------------------


def run_layout(layout: str, reg, bodies, args, log) -> dict:
    import ray
    from _http_peers import start_peer, stop_peer, tree, wait_ready
    from ray import serve

    from serve.app import build_app
    from serve.ingress import free_port, serve_start

    server_cpus, client_cpus = ("0", "1") if layout == "split" else (None, None)
    everything = os.sched_getaffinity(0)
    peers: dict[str, object] = {}
    try:
        if server_cpus is not None:
            os.sched_setaffinity(0, {int(server_cpus)})  # Ray's processes inherit the driver's affinity
        port = free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve_start("127.0.0.1", port)
        os.sched_setaffinity(0, everything)  # the driver itself only waits on the load generators
        base = f"http://127.0.0.1:{port}"

        def deploy(monitor: bool, name: str) -> str:
            serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor": monitor,
                                 "monitor_name": f"bench_monitor_{name}", "serve_cfg": json.loads(args.serve_cfg)}),
                      name=name, route_prefix=f"/{name}")
            url = f"{base}/{name}"
            wait_ready(None, f"{url}/v1/predict", bodies.raw[0], bodies.headers)
            return url

        url = deploy(True, "mon_on")
        replicas = 2
        for name in args.peers:
            pport = free_port()
            proc = start_peer(name, reg, MODEL, pport, replicas, cpus=server_cpus)
            peers[name] = (proc, f"http://127.0.0.1:{pport}")
            wait_ready(proc, f"http://127.0.0.1:{pport}/v1/predict", bodies.raw[0], bodies.headers)
        peer_pids = {p.pid for proc, _ in peers.values() for p in tree(proc.pid)}
        targets = [Target(RAYSYS, url, lambda: ray_processes(peer_pids))]
        targets += [Target(n, u, (lambda pid=proc.pid: tree(pid))) for n, (proc, u) in peers.items()]
        closed = closed_loop(targets, args.levels, args, bodies, client_cpus, log)
        levels = {str(c): per_level(r) for c, r in closed.items()}
        c32 = levels["32"]
        rate = 0.7 * max(c32[n]["rps"] for n in args.peers)
        open_pts = open_loop(targets, rate, args, bodies, client_cpus, log) if args.open_loop_s else None
        out = {"per_concurrency": levels, "open_loop": {"offered_rps": rate, **(open_pts or {})},
               **headline(c32, open_pts)}
        for _, (proc, _) in list(peers.items()):
            stop_peer(proc)
        peers.clear()
        if layout == "shared" and args.monitor_pairs:
            off = Target("raysys_monitor_off", deploy(False, "mon_off"), lambda: ray_processes(set()))
            out["monitor"] = monitor_cost(targets[0], off, args, bodies, log)
        return out
    finally:
        os.sched_setaffinity(0, everything)
        for proc, _ in peers.values():
            stop_peer(proc)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def main() -> int:
    from _http_peers import PEERS, require_peers
    from _loadgen import Bodies, require_tools

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per closed-loop point")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    p.add_argument("--concurrency", default="8,32,128", help="comma-separated wrk connection counts")
    p.add_argument("--repeats", type=int, default=3, help="rounds at c32")
    p.add_argument("--open-loop-s", type=float, default=15.0, help="seconds of hey per target at the fixed rate")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated peers of {','.join(PEERS)}")
    p.add_argument("--layouts", default="shared,split", help="shared (all cores) and/or split (taskset)")
    p.add_argument("--monitor-pairs", type=int, default=6, help="on/off pairs for the monitor's cost (0: none)")
    p.add_argument("--monitor-duration", type=float, default=10.0,
                   help="measured seconds per monitor point (a multiple of Ray's 10 s metrics period)")
    p.add_argument("--serve-cfg", default="{}", help="JSON ServeConfig overrides for the raysys app (exploration)")
    p.add_argument("--quick", action="store_true", help="--duration 3 --warmup 1 --concurrency 32 --repeats 1 "
                                                         "--open-loop-s 4 --monitor-pairs 2 --monitor-duration 2")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup, args.concurrency, args.repeats = 3.0, 1.0, "32", 1
        args.open_loop_s, args.monitor_pairs, args.monitor_duration = 4.0, 2, 2.0
    args.levels = sorted({int(c) for c in args.concurrency.split(",")} | {32})
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if unknown := [x for x in args.peers if x not in PEERS] or [x for x in layouts if x not in ("shared", "split")]:
        p.error(f"--peers/--layouts: unknown {unknown}")
    if "split" in layouts and len(os.sched_getaffinity(0)) < 2:
        p.error("--layouts split: needs 2 CPUs this process may run on")
    require_tools("wrk", "hey")
    require_peers(args.peers)

    logging.basicConfig(level=logging.WARNING)
    import ray

    from serve.apikey import API_TOKEN_ENV, auth_headers
    from serve.ingress import apply_ingress_env

    tmp = scratch_dir("raysys-serve-load-")  # removed at exit
    reg, spec, raw = make_registry(tmp)
    env = apply_ingress_env()  # the shipped default, as raysys.workflow.cluster.init_ray applies it
    # HAProxy binds all interfaces, so the endpoint refuses to start without a key: a scratch one for this run
    os.environ.setdefault(API_TOKEN_ENV, secrets.token_urlsafe(32))
    # the endpoint needs its key (the peers ignore it): every target gets the same headers
    bodies = Bodies(raw, {"content-type": "application/json", **auth_headers()})
    t0 = time.time()
    try:
        results = {layout: run_layout(layout, reg, bodies, args, lambda m: print(m, flush=True))
                   for layout in layouts}
    finally:
        bodies.close()
    first = results.get("shared") or next(iter(results.values()))
    summary = {
        "benchmark": "serve_load",
        **{k: first[k] for k in ("best_peer", "c32_throughput_ratio_vs_best_peer", "c32_p99_ratio_vs_best_peer",
                                 "cpu_per_request_peer", "cpu_per_request_ratio", "open_loop_peer",
                                 "open_loop_p99_ratio") if k in first},
        "monitor_throughput_cost": (first.get("monitor") or {}).get("monitor_throughput_cost"),
        "layouts": results,
        "setup": {"duration_s": args.duration, "warmup_s": args.warmup, "repeats_c32": args.repeats,
                  "levels": args.levels, "peers": args.peers, "open_loop_s": args.open_loop_s,
                  "monitor_pairs": args.monitor_pairs, "monitor_duration_s": args.monitor_duration,
                  "generators": "wrk (closed loop), hey (open loop)", "ingress_env": env,
                  "model_spec": {k: v for k, v in spec.items() if k != "schema"}, "rows_per_request": 1,
                  "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                  "elapsed_s": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
