"""Independent load generators for benchmarks/serve_load.py: `wrk` (C, closed loop: c connections sending back to
back) and `hey` (Go, a fixed offered rate), Debian's packages (`apt-get install wrk hey`). Neither is our client:
a skeptical reader reruns the same figures with them.

`wrk_point` cycles through the given request bodies (a Lua script reads them from a file, one per line) and
returns requests/s of 2xx answers, p50/p99 latency and the error counts wrk keeps; `hey_point` sends one body at
`rate` requests/s for `duration_s` and returns its p50/p99 from hey's per-request CSV.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

TOOLS = {"wrk": "wrk", "hey": "hey"}

_WRK_LUA = r"""
local bodies = {}
for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(headers)s
local i = 0
function setup(thread)
  thread:set("offset", i)
  i = i + 7919
end
function init(args)
  i = offset or 0
end
function request()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%%d,\"duration_us\":%%d,\"non_2xx\":%%d,\"connect\":%%d,\"read\":%%d,\"write\":%%d," ..
    "\"timeout\":%%d,\"p50_us\":%%d,\"p99_us\":%%d,\"max_us\":%%d}\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def require_tools(*names: str) -> None:
    """SystemExit naming the package to install when a load generator is missing."""
    missing = [n for n in names if shutil.which(TOOLS[n]) is None]
    if missing:
        raise SystemExit(f"serve_load: {', '.join(missing)} not found on PATH; install the independent load "
                         f"generator(s): `sudo apt-get install {' '.join(missing)}` (Debian/Ubuntu), or "
                         "`brew install wrk hey` (macOS)")


class Bodies:
    """Request bodies on disk, for wrk's script (one JSON document a line) and hey (the first one)."""

    def __init__(self, bodies: list[bytes], headers: dict[str, str]):
        self.raw = list(bodies)
        self.dir = Path(tempfile.mkdtemp(prefix="raysys-loadgen-"))
        self.lines = self.dir / "bodies.jsonl"
        self.lines.write_bytes(b"\n".join(b.replace(b"\n", b" ") for b in bodies) + b"\n")
        self.first = self.dir / "body.json"
        self.first.write_bytes(bodies[0])
        self.headers = dict(headers)  # for plain requests; the generators set Content-Type themselves
        extra = {k: v for k, v in self.headers.items() if k.lower() != "content-type"}
        self.extra_headers = extra
        hdr = "\n".join(f'wrk.headers["{k}"] = {json.dumps(v)}' for k, v in extra.items())
        self.lua = self.dir / "post.lua"
        self.lua.write_text(_WRK_LUA % {"bodies": str(self.lines), "headers": hdr})

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def wrk_point(url: str, bodies: Bodies, concurrency: int, duration_s: float, *, threads: int = 2,
              cpus: str | None = None, timeout_s: float = 10.0) -> dict:
    """One closed-loop point: `concurrency` connections over `threads` wrk threads for `duration_s`.
    `cpus`: run wrk under `taskset -c cpus` (the split layout)."""
    cmd = ["wrk", "-t", str(min(threads, concurrency)), "-c", str(concurrency), "-d", f"{duration_s:g}s",
           "--timeout", f"{timeout_s:g}s", "-s", str(bodies.lua), url]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    r = json.loads(line[len("WRKJSON "):])
    secs = r["duration_us"] / 1e6
    ok = r["requests"] - r["non_2xx"]
    return {"concurrency": concurrency, "requests": r["requests"], "rps": round(ok / secs, 1),
            "p50_ms": round(r["p50_us"] / 1000, 2), "p99_ms": round(r["p99_us"] / 1000, 2),
            "non_2xx": r["non_2xx"], "errors": {k: r[k] for k in ("connect", "read", "write", "timeout") if r[k]},
            "duration_s": round(secs, 2), "generator": "wrk"}


def hey_point(url: str, bodies: Bodies, rate: float, duration_s: float, *, workers: int | None = None,
              cpus: str | None = None) -> dict:
    """One open-loop point at `rate` requests/s offered (hey: `workers` workers x rate/workers each). hey's
    worker waits for its answer before its next request, so each worker offers at most 1/latency: by default one
    worker per 20 requests/s (50 ms a request before the offered rate falls short)."""
    workers = workers or max(8, -(-int(rate) // 20))
    per_worker = max(1, round(rate / workers))
    cmd = ["hey", "-z", f"{duration_s:g}s", "-c", str(workers), "-q", str(per_worker), "-m", "POST",
           "-T", "application/json", "-D", str(bodies.first), "-o", "csv", "-t", "10"]
    for k, v in bodies.extra_headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    lat = sorted(float(r["response-time"]) * 1000 for r in rows)
    codes = [int(r["status-code"]) for r in rows if r.get("status-code", "").isdigit()]
    ok = sum(1 for c in codes if 200 <= c < 300)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {"offered_rps": per_worker * workers, "requests": len(rows), "achieved_rps": round(ok / duration_s, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "non_2xx": len(rows) - ok, "generator": "hey"}
