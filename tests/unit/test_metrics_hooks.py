"""The `raysys_*` metrics added for deploy/ (alerts and dashboard): when they are set, with fakes in place of
Ray's metric objects (no Ray)."""

from __future__ import annotations

from raysys.monitor.metrics import LinkMetrics, link_metrics
from raysys.monitor.trigger import RetrainTrigger
from raysys.train.metrics import TrainMetrics, train_metrics


class FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, value=1, tags=None):
        self.calls.append((value, tags))

    def set(self, value, tags=None):
        self.calls.append((value, tags))


def test_retrain_trigger_reports_how_jobs_end():
    ended = []
    trig = RetrainTrigger(enabled=True, cooldown_s=0, args=[], submit=lambda e, m: "job-1",
                          status=lambda j: "FAILED", message=lambda j: "exit 1", poll_s=None, on_end=ended.append)
    assert trig.maybe_submit("drift", [], background=False)["submitted"]
    assert not trig.in_flight() and ended == ["FAILED"]  # the status refresh saw it end, once
    trig.in_flight()
    assert ended == ["FAILED"]

    def refuse(entry, meta):
        raise RuntimeError("submitting jobs is not allowed here")

    trig = RetrainTrigger(enabled=True, cooldown_s=0, args=[], submit=refuse, status=lambda j: "RUNNING",
                          poll_s=None, on_end=ended.append)
    assert not trig.maybe_submit("drift", [], background=False)["submitted"]
    assert ended == ["FAILED", "SUBMIT_FAILED"]


def test_link_metrics_export_the_dropped_rows_delta():
    assert link_metrics() is None  # outside a Ray actor nothing is made
    lm = LinkMetrics.__new__(LinkMetrics)
    lm.dropped, lm._exported = FakeMetric(), 0
    for running in (0, 5, 5, 12):
        lm.export(running)
    assert [v for v, _ in lm.dropped.calls] == [5, 7]


def test_train_metrics_set_throughput_and_every_ranks_memory():
    assert train_metrics(0) is None  # outside a Ray Train worker
    tm = TrainMetrics.__new__(TrainMetrics)
    tm.samples_per_s, tm.rank_memory = FakeMetric(), FakeMetric()
    tm.record_epoch("run-1", {"samples_per_s": 1234.5, "strategy": "zero3",
                              "mem_per_rank_total_bytes": [100, 90], "mem_per_rank_params_bytes": [40, 30]})
    assert tm.samples_per_s.calls == [(1234.5, {"run_name": "run-1", "strategy": "zero3"})]
    got = {(t["rank"], t["kind"]): v for v, t in tm.rank_memory.calls}
    assert got == {("0", "total_bytes"): 100.0, ("1", "total_bytes"): 90.0, ("0", "params_bytes"): 40.0,
                   ("1", "params_bytes"): 30.0}
