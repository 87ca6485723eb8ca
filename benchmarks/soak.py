"""Soak: the shipped endpoint at a steady rate for minutes, with delayed labels and a drift, watching what
creeps: errors, tail latency, and the memory of every process raysys runs.

One Ray node (`ray.cluster_utils.Cluster` head, benchmarks/_chaos_rig.py) serves 2 replicas behind HAProxy with
the monitor storing traffic as Parquet; an open-loop load (`--rate` requests/s, each with a request id, labelled
through /v1/feedback every second) runs for `--duration-s`, its rows shifted by `--shift` standard units from
40% of the run on (the monitor must alarm, and keep its buffers bounded while it does). Every `--sample-s` the
resident memory of each replica, the monitor, Serve's controller, the HAProxy manager and HAProxy is read from
/proc; every 15 s each replica also reports its memory by layer from inside (serve.memprobe: anonymous and file
RSS, bytes malloc has handed out and holds free, Python's blocks and objects), and at the end glibc's
`malloc_trim` shows how much of its RSS the allocator merely kept (`replica_memory_layers`): RSS that grows while
malloc's in-use bytes and Python's objects stay flat is the allocator's, not a leak.

Goals (issue 21): zero errors; the p99 of every later bucket within 1.25x of the first bucket's (buckets of
`--bucket-s`, 60 s by default); memory flat (the slope of each process's RSS over the run after its first 20%,
MB/min, reported; `memory_flat`: every process's slope over the last half <= 0.25 MB/min); the monitor's window,
prediction log and stored traffic bounded; events dropped counted.

    python benchmarks/soak.py                      # 5 minutes
    python benchmarks/soak.py --duration-s 30 --bucket-s 10   # the test mode
    python benchmarks/soak.py --malloc-arena-max 2            # fewer glibc arenas in every Ray process
                                                              # (the replicas have 2 anyway: serve.malloc_arena_max)

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _chaos_load import OpenLoad  # noqa: E402
from _chaos_rig import APP, ChaosRig, stdout_to_stderr  # noqa: E402

ROLES = {"ServeReplica": "replica", "Monitor": "monitor", "ServeController": "controller",
         "HAProxyManager": "haproxy_manager"}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MemorySampler:
    """Every `every_s`, the RSS of each raysys process of the rig, keyed by role and PID; every `probe_every_s`,
    each replica's memory by layer from inside it (serve.memprobe through a Serve handle)."""

    def __init__(self, rig: ChaosRig, every_s: float, probe_every_s: float = 15.0):
        self.rig, self.every_s, self.probe_every_s = rig, every_s, probe_every_s
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.probes: dict[str, list[tuple[float, dict]]] = {}
        self._next_probe = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-memory")

    def _procs(self) -> dict[str, int]:
        out = {}
        for a in self.rig.actors(""):
            role = next((r for prefix, r in ROLES.items() if a.class_name.startswith(prefix)), None)
            if role is not None and a.pid:
                out[f"{role}:{a.pid}"] = a.pid
        for pid in self.rig.haproxy_pids():
            out[f"haproxy:{pid}"] = pid
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                for key, pid in self._procs().items():
                    mb = rss_mb(pid)
                    if mb is not None:
                        self.samples.setdefault(key, []).append((t, mb))
            except Exception:  # the state API may time out on a busy box: skip the sample
                pass
            if t >= self._next_probe:
                self._next_probe = t + self.probe_every_s
                try:
                    for rid, rep in probe_replicas(self.rig).items():
                        self.probes.setdefault(rid, []).append((t, rep))
                except Exception:  # a replica busy past the timeout: the next probe
                    pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def summary(self, t0: float, t1: float) -> dict:
        """Per process: RSS at the first and last sample, the least-squares slope (MB/min) over the samples
        after the first 20% of the run (start-up allocations excluded), the slope over the last half alone
        (a warm-up that settles shows there as a smaller slope; a leak keeps its slope), and the RSS at each
        quarter of the run."""
        out = {}
        cut, half = t0 + 0.2 * (t1 - t0), t0 + 0.5 * (t1 - t0)
        for key, pts in sorted(self.samples.items()):
            late = [(t, m) for t, m in pts if t >= cut]
            quarters = [next((round(m, 1) for t, m in pts if t >= t0 + q * (t1 - t0)), None) for q in (0.25, 0.5, 0.75)]
            out[key] = {"first_mb": round(pts[0][1], 1), "last_mb": round(pts[-1][1], 1),
                        "samples": len(pts), "slope_mb_per_min": _slope(late),
                        "slope_last_half_mb_per_min": _slope([(t, m) for t, m in pts if t >= half]),
                        "mb_at_quarters": quarters}
        return out


PROBED = ("rss_mb", "rss_anon_mb", "malloc_in_use_mb", "malloc_free_mb", "py_blocks", "gc_objects")


_LOOP: list = []  # one event loop, in its own thread, for every probe (Serve caches the handle it makes)


def _probe_loop():
    import asyncio

    if not _LOOP:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True, name="soak-probe-loop").start()
        _LOOP.append(loop)
    return _LOOP[0]


def probe_replicas(rig: ChaosRig, trim: bool = False, calls: int = 8) -> dict[str, dict]:
    """One memory report per replica, by replica id (Serve's router spreads the concurrent calls). raysys runs
    Serve throughput-optimized, whose handles route inside the caller's event loop: the calls run in one loop
    kept for the whole run (the handle Serve caches is bound to it)."""
    import asyncio

    from ray import serve

    from serve.contract import DEPLOYMENT_NAME

    async def calls_now() -> list[dict]:
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP)
        return await asyncio.gather(*[handle.memory.remote(trim) for _ in range(calls)])

    out: dict[str, dict] = {}
    for rep in asyncio.run_coroutine_threadsafe(calls_now(), _probe_loop()).result(timeout=30):
        old = out.get(rep["replica"])
        if old is None or (trim and (rep.get("trimmed_mb") or 0) > (old.get("trimmed_mb") or 0)):
            out[rep["replica"]] = rep
    return out


def probe_summary(probes: dict[str, list[tuple[float, dict]]], t0: float, t1: float,
                  trimmed: dict[str, dict]) -> dict:
    """Per replica and layer: the value at the first probe after 20% of the run, at the last, and the slope per
    minute over those probes (Python's counts per minute, MB/min otherwise); then what `malloc_trim` gave back
    at the end and the RSS after it."""
    cut, out = t0 + 0.2 * (t1 - t0), {}
    for rid, pts in sorted(probes.items()):
        late = [(t, r) for t, r in pts if t >= cut] or pts
        layers = {}
        for k in PROBED:
            series = [(t, r[k]) for t, r in late if r.get(k) is not None]
            if series:
                layers[k] = {"first": series[0][1], "last": series[-1][1], "slope_per_min": _slope(series)}
        end = trimmed.get(rid) or {}
        out[rid] = {"probes": len(pts), **layers, "malloc_arena_max": pts[-1][1].get("malloc_arena_max"),
                    "trimmed_mb_at_end": end.get("trimmed_mb"),
                    "rss_mb_after_trim": end.get("rss_mb")}
    return out


def _slope(pts: list[tuple[float, float]]) -> float | None:
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mm = sum(m for _, m in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    return round(60 * sum((t - mt) * (m - mm) for t, m in pts) / var, 3) if var else None


def p99_by_bucket(load: OpenLoad, bucket_s: float) -> list[float | None]:
    t0 = load.t0
    n = max(1, int((load.t1 - t0) // bucket_s))
    return [OpenLoad.summary(load.between(t0 + i * bucket_s, t0 + (i + 1) * bucket_s))["p99_ms"] for i in range(n)]


def shifted(rows: list[dict], numeric: list[str], shift: float) -> list[dict]:
    return [{k: (v + shift if k in numeric and isinstance(v, (int, float)) else v) for k, v in r.items()}
            for r in rows]


def run(root: Path, *, duration_s: float, rate: float, bucket_s: float, sample_s: float, shift: float,
        log=print) -> dict:
    with ChaosRig(root, workers=False, rows_per_file=2000) as rig:
        url = rig.deploy()
        numeric = [f.name for f in rig.schema.numeric]
        log(f"soak: {url}, {rate}/s for {duration_s:.0f} s, shift {shift} from {0.4 * duration_s:.0f} s")
        with MemorySampler(rig, sample_s) as mem, \
                OpenLoad(url, rig.rows, headers=rig.headers(), rate=rate, feedback_every_s=1.0) as load:
            time.sleep(0.4 * duration_s)
            load.set_rows(shifted(rig.rows, numeric, shift))
            time.sleep(0.6 * duration_s)
        report = rig.monitor_report(timeout_s=30)
        # what Prometheus would scrape (Ray exports actor metrics every few seconds)
        series = _poll_series(rig)
        replicas = _replica_link_stats(rig)
        trimmed = probe_replicas(rig, trim=True)
        total = OpenLoad.summary(load.records)
        p99s = p99_by_bucket(load, bucket_s)
        memory = mem.summary(load.t0, load.t1)
    cfg = rig.monitor_cfg
    later = [p for p in p99s[1:] if p is not None]
    bounds = {"window_rows": report["window_rows"], "window_size": report["window_size"],
              "traffic_files_kept": (report.get("traffic") or {}).get("files_kept"),
              "traffic_max_files": cfg.traffic_max_files,
              "prediction_log_size": cfg.prediction_log_size}
    bounds["bounded"] = (bounds["window_rows"] <= bounds["window_size"]
                         and (bounds["traffic_files_kept"] or 0) <= bounds["traffic_max_files"])
    return {"benchmark": "soak", "duration_s": round(load.t1 - load.t0, 1), "rate_per_s": rate, **total,
            "skipped_ticks": load.skipped, "feedback_answers": dict(load.feedback),
            "p99_ms_by_bucket": p99s, "bucket_s": bucket_s,
            "p99_ratio_worst_to_first": round(max(later) / p99s[0], 3) if later and p99s[0] else None,
            "memory": memory,
            "max_slope_mb_per_min": max((m["slope_mb_per_min"] or 0.0) for m in memory.values()) if memory else None,
            **memory_verdict(memory),
            "replica_memory_layers": probe_summary(mem.probes, load.t0, load.t1, trimmed),
            "monitor": {"rows_seen": report["rows_seen"], "drift_detected": report["drift_detected"],
                        "labels_total": (report.get("accuracy") or {}).get("labels_total"),
                        "unmatched_labels": (report.get("accuracy") or {}).get("unmatched_labels"), **bounds},
            "metrics_series": series,
            "dropped": {"replica_rows_dropped": sum(r.get("rows_dropped", 0) for r in replicas.values()),
                        "replicas_seen": len(replicas)}}


# "flat": a process's RSS grows by at most this over the last half of the run (0.25 MB/min is ~1 MB over a
# 5-minute run's last half; glibc's default arenas let a replica grow ~1.2 MB/min, MALLOC_ARENA_MAX=2 ~0.1)
FLAT_MB_PER_MIN = 0.25


def memory_verdict(memory: dict[str, dict]) -> dict:
    """`memory_flat`: every process sampled over the run grew at most FLAT_MB_PER_MIN over its last half (the
    first half holds start-up and warm-up); the processes that did not, by name."""
    slopes = {k: m["slope_last_half_mb_per_min"] for k, m in memory.items()
              if m.get("slope_last_half_mb_per_min") is not None}
    growing = sorted(k for k, v in slopes.items() if v > FLAT_MB_PER_MIN)
    return {"memory_flat": bool(slopes) and not growing, "memory_not_flat": growing,
            "memory_flat_mb_per_min": FLAT_MB_PER_MIN}


def _poll_series(rig: ChaosRig, timeout_s: float = 60) -> dict[str, list[str]]:
    """The head's exported raysys series, once the replicas' and the monitor's have arrived."""
    deadline, got = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            got = rig.scrape()
        except Exception:  # the agent's endpoint may not answer yet
            got = {}
        if any("requests_total" in k for k in got) and any("drift_psi" in k for k in got):
            time.sleep(6)  # one more export round, for series recorded later than these
            return rig.scrape()
        time.sleep(2)
    return got


def _replica_link_stats(rig: ChaosRig, tries: int = 20) -> dict[str, dict]:
    """Each replica's monitor-link counters (rows sent / buffered / dropped), from /healthz (HAProxy spreads
    the probes over the replicas)."""
    import requests

    out = {}
    for _ in range(tries):
        h = requests.get(f"{rig.url}/healthz", timeout=10).json()
        out[h["replica"]] = h.get("monitor") or {}
        if len(out) >= rig.num_replicas:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second")
    p.add_argument("--bucket-s", type=float, default=60.0, help="p99 buckets (the first is the baseline)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--shift", type=float, default=1.5, help="shift of the numeric features from 40%% of the run")
    p.add_argument("--malloc-arena-max", type=int, default=None,
                   help="glibc's MALLOC_ARENA_MAX for every Ray process of the rig (default: glibc's, 8 per core)")
    p.add_argument("--root", default=None, help="working directory (default: a temp dir, removed at the end)")
    a = p.parse_args(argv)
    if a.duration_s < 2 * a.bucket_s:
        p.error("--duration-s: at least two --bucket-s buckets (the first is the baseline)")
    if a.malloc_arena_max is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)  # the raylet and its workers inherit it
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="raysys-soak-"))
    try:
        with stdout_to_stderr():
            out = run(root, duration_s=a.duration_s, rate=a.rate, bucket_s=a.bucket_s, sample_s=a.sample_s,
                      shift=a.shift, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    ok = out["requests_failed"] == 0 and out["monitor"]["bounded"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
