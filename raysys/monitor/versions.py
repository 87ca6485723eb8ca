"""Per model version figures that a canary gate compares, cumulative since the monitor started:

- how long each version's scoring passes took (validation + forward pass, in CPU time of the replica's
  thread, a log histogram per version): the version's own cost, not the queue all versions share, and not
  inflated when other processes preempt the replica on a busy node;
- the requests it scored for nobody (shadow traffic, or the stable version re-scoring a canary's rows),
  and how many of those it failed (raised) or refused (its schema rejected rows the answering version took);
- how often two versions agreed on the top class of the same rows.

Replicas add `serve.scoring` pass records (`add_passes`) between flushes and ship `take()` with their rows;
the monitor `merge`s them. Ray-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysys.monitor.latency import NUM_BUCKETS, LogHistogram

COMPARE_KEYS = ("compare_requests", "compare_rows", "compare_failed", "compare_rejected")


class VersionFigures:
    def __init__(self) -> None:
        self.by_version: dict[str, dict[str, Any]] = {}

    def _entry(self, key: str) -> dict[str, Any]:
        e = self.by_version.get(key)
        if e is None:
            e = self.by_version[key] = {"score_hist": LogHistogram(), "compare_hist": LogHistogram(),
                                        **dict.fromkeys(COMPARE_KEYS, 0), "agreement": {}}
        return e

    def __bool__(self) -> bool:
        return bool(self.by_version)

    # ----- replica side -----
    def add_passes(self, passes: list) -> None:
        """`serve.scoring.GroupStats` and `Agreement` records of one batch."""
        for p in passes:
            if hasattr(p, "ms"):
                e = self._entry(str(p.version))
                e["score_hist"].add(np.full(p.requests, p.cpu_ms))
                if p.compare:
                    e["compare_hist"].add(np.full(p.requests, p.cpu_ms))
                    e["compare_requests"] += p.requests
                    e["compare_rows"] += p.rows
                    e["compare_failed"] += p.failed
                    e["compare_rejected"] += p.rejected
            else:
                self._agree(str(p.version), str(p.other), p.rows, p.agreed)

    def _agree(self, a: str, b: str, rows: int, agreed: int) -> None:
        for mine, other in ((a, b), (b, a)):
            agg = self._entry(mine)["agreement"].setdefault(other, [0, 0])
            agg[0] += int(rows)
            agg[1] += int(agreed)

    def take(self) -> dict[str, Any]:
        """What was added since the last take, as JSON-able data for `merge`; empties this."""
        out = self.payload()
        self.by_version = {}
        return out

    # ----- monitor side -----
    def payload(self) -> dict[str, Any]:
        out = {}
        for v, e in self.by_version.items():
            out[v] = {"score_hist": _sparse(e["score_hist"]), "compare_hist": _sparse(e["compare_hist"]),
                      "score_ms_total": e["score_hist"].total_ms,
                      **{k: e[k] for k in COMPARE_KEYS}, "agreement": {o: list(a) for o, a in e["agreement"].items()}}
        return out

    def merge(self, payload: dict[str, Any]) -> None:
        for v, p in payload.items():
            e = self._entry(str(v))
            for key in ("score_hist", "compare_hist"):
                for i, c in (p.get(key) or {}).items():
                    if 0 <= int(i) < NUM_BUCKETS:
                        e[key].counts[int(i)] += int(c)
            e["score_hist"].total_ms += float(p.get("score_ms_total") or 0.0)
            for k in COMPARE_KEYS:
                e[k] += int(p.get(k) or 0)
            for other, (rows, agreed) in (p.get("agreement") or {}).items():
                agg = e["agreement"].setdefault(str(other), [0, 0])
                agg[0] += int(rows)
                agg[1] += int(agreed)

    def summary(self) -> dict[str, Any]:
        """Per version: the score-time histogram (bucket counts, for gates that diff two reports) and its
        percentiles, the comparison counters, and {other version: [rows compared, rows agreed]}."""
        return {v: {"score_cpu_ms": e["score_hist"].summary(), "score_hist": e["score_hist"].counts.tolist(),
                    "compare_hist": e["compare_hist"].counts.tolist(),
                    **{k: e[k] for k in COMPARE_KEYS}, "agreement": {o: list(a) for o, a in e["agreement"].items()}}
                for v, e in self.by_version.items()}

    def state(self) -> dict[str, Any]:
        return self.payload()

    def load_state(self, st: dict[str, Any]) -> None:
        self.by_version = {}
        self.merge(st or {})


def _sparse(h: LogHistogram) -> dict[int, int]:
    return {int(i): int(h.counts[i]) for i in np.flatnonzero(h.counts)}
