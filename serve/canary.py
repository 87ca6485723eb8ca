"""The gated canary: start it, check the candidate's live figures against the stable version's every
`interval_s` (`serve.gate`), then promote it or roll it back by itself, naming the check that failed.

Used by `raysys serve canary` (reading the monitor report over HTTP, `http_report_reader`) and by the
retrain job (reading the monitor actor). The application's rollout lease is held the whole time and renewed
at every check, so no other rollout interleaves; if this process dies, the lease lapses within
`3 x interval_s + 10` s and the next rollout command stops the orphaned canary (`serve.rollout.reconcile`);
if nobody comes, the replicas stop routing to it at its deadline (`canary_deadline` in the user_config).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from raysys.config import CanaryConfig
from serve.gate import Verdict, VersionCounts, evaluate
from serve.rollout import LEASE_MARGIN_S, RolloutError, ServeAdmin, _resolve, holding

log = logging.getLogger("raysys")
DEADLINE_MARGIN_S = 30  # the replicas' deadline outlives the gate's own max_s by this much


@dataclass
class CanaryResult:
    version: int
    stable: int
    promoted: bool
    passed: bool  # the gate's verdict (promoted unless promote=False)
    why: str
    seconds: float
    checks: list[dict[str, Any]] = field(default_factory=list)
    reconciled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "stable": self.stable, "promoted": self.promoted, "passed": self.passed,
                "why": self.why, "seconds": round(self.seconds, 1), "checks": self.checks,
                "reconciled": self.reconciled}


def heartbeat_s(cfg: CanaryConfig) -> float:
    """How long the lease lasts between two renewals: a dead owner is noticed this long after its death."""
    return 3 * cfg.interval_s + 10


def _judge(cfg: CanaryConfig, read_report: Callable[[], dict], version: int, stable: int,
           before: tuple[VersionCounts, VersionCounts]) -> Verdict | None:
    try:
        report = read_report()
    except Exception as e:  # an unreachable monitor makes this check a wait; max_s bounds the waiting
        log.warning("canary: cannot read the monitor report (%s: %s); this check waits", type(e).__name__, e)
        return None
    cand = VersionCounts.from_report(report, version, stable).since(before[0])
    base = VersionCounts.from_report(report, stable, version).since(before[1])
    return evaluate(cfg, cand, base, shadow=cfg.shadow)


def run_canary(admin: ServeAdmin, app_name: str, ref: str | int, cfg: CanaryConfig,
               read_report: Callable[[], dict], *, alias: str = "production", promote: bool = True,
               timeout_s: float = 300, on_check: Callable[[int, Verdict | None], None] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> CanaryResult:
    """Canary (or shadow) version `ref` in `app_name` under `cfg`'s gate; promote it (and move `alias`) when
    `cfg.intervals` checks passed, roll it back when `cfg.failure_threshold` failed or `cfg.deadline_s()`
    passed without a decision. `promote=False`: stop it after the verdict either way. Any error on the way
    (this process interrupted included) stops the canary before it goes up."""
    with holding(admin, app_name, timeout_s=timeout_s) as ro:
        state = ro.state()
        version = _resolve(ro.reg, ro.name, ref)
        stable = _resolve(ro.reg, ro.name, state[2]["model_ref"])
        try:
            first = read_report()
        except Exception as e:
            raise RolloutError(f"the canary gate reads the endpoint's monitor and could not ({type(e).__name__}: "
                               f"{str(e)[:300]}); fix the monitor, or canary by hand with --no-gate") from None
        before = (VersionCounts.from_report(first, version, stable), VersionCounts.from_report(first, stable, version))
        deadline = time.time() + cfg.deadline_s() + DEADLINE_MARGIN_S
        ro.lease.renew(timeout_s + LEASE_MARGIN_S)
        ro.start_canary(version, cfg.percent, shadow=cfg.shadow, deadline=deadline, gated=True, state=state)
        log.info("canary: v%d %s at %g%% of %r (stable v%d), a check every %gs", version,
                 "shadowing" if cfg.shadow else "serving", cfg.percent, app_name, stable, cfg.interval_s)
        t0 = time.monotonic()
        checks: list[dict[str, Any]] = []
        try:
            passed, why = _watch(cfg, ro, read_report, version, stable, before, checks, on_check, sleep, t0)
        except BaseException as e:
            _stop_quietly(ro, f"the gate's owner failed ({type(e).__name__}: {str(e)[:200]})")
            raise
        ro.lease.renew(timeout_s + LEASE_MARGIN_S)
        if passed and promote:
            ro.promote(alias, why=why)
        else:
            ro.stop_canary(why if not passed else f"{why} (not promoted: promote=False)")
        result = CanaryResult(version, stable, passed and promote, passed, why, time.monotonic() - t0, checks,
                              ro.reconciled)
        log.info("canary: v%d %s: %s", version, "promoted" if result.promoted else "rolled back", why)
        return result


def _watch(cfg: CanaryConfig, ro, read_report, version: int, stable: int, before, checks: list, on_check, sleep,
           t0: float) -> tuple[bool, str]:
    """Check every interval until the gate decides: (passed, why)."""
    passes = failures = 0
    while True:
        ro.lease.renew(heartbeat_s(cfg))
        sleep(cfg.interval_s)
        ro.lease.renew(heartbeat_s(cfg))
        verdict = _judge(cfg, read_report, version, stable, before)
        elapsed = time.monotonic() - t0
        checks.append({"t_s": round(elapsed, 1), **(verdict.to_dict() if verdict else {"state": "wait",
                                                                                       "checks": [], "figures": {}})})
        if on_check is not None:
            on_check(len(checks), verdict)
        if verdict is not None and verdict.state == "pass":
            passes += 1
        elif verdict is not None and verdict.state == "fail":
            failures += 1
            if failures >= cfg.failure_threshold:
                return False, f"gate failed {failures} checks: {verdict.describe()}"
        if passes >= cfg.intervals:
            return True, (f"gate passed {passes} checks: {verdict.describe()}" if verdict else "gate passed")
        if elapsed >= cfg.deadline_s():
            last = verdict.describe() if verdict else "no monitor report"
            return False, (f"no decision within max_s={cfg.deadline_s():g}s ({passes} passed, {failures} failed "
                           f"checks; the last: {last})")


def _stop_quietly(ro, why: str) -> None:
    try:
        ro.lease.renew(ro.timeout_s + LEASE_MARGIN_S)
        ro.stop_canary(why)
    except Exception as e:
        log.error("canary: could not stop the canary of %r (%s); the next rollout command or its deadline "
                  "ends it", ro.app_name, e)


# ----- reading the monitor -----
def endpoint_url(admin: ServeAdmin, app_name: str) -> str:
    """The HTTP base URL of `app_name`: Serve's HTTP port on the dashboard's host, plus the route prefix."""
    details = admin.details()
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = urlsplit(admin.address).hostname or "127.0.0.1"
    prefix = ((details.get("applications") or {}).get(app_name) or {}).get("route_prefix") or "/"
    return f"http://{host}:{http.get('port') or 8000}{prefix.rstrip('/')}"


def http_report_reader(url: str, api_key: str | None, timeout_s: float = 30) -> Callable[[], dict]:
    """GET <url>/v1/monitor (with the API key when there is one), the monitor's report as JSON."""
    def read() -> dict:
        req = urllib.request.Request(f"{url}/v1/monitor", headers={"Authorization": f"Bearer {api_key}"}
                                     if api_key else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"GET {url}/v1/monitor: HTTP {e.code}: {e.read()[:300]!r}") from None

    return read
