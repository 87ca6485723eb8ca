"""Feedback no stranger can poison (tier 1, no Ray): the monitor judges each `/v1/feedback` label (accepted,
unknown request id, invalid label), a probe neither pops nor counts, an id refused after the second ask is
counted once; the endpoint asks again for ids another replica may still hold in its buffer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers.endpoint import MonitorHandle

from raysys.config import DataConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.monitor import Monitor, ReferenceProfile
from serve.monitor_link import MonitorBuffer, MonitorLink
from serve.parsing import RequestError, feedback_answer, parse_feedback_body


@pytest.fixture(scope="module")
def small():
    task = SyntheticTask(DataConfig(num_numeric=3, num_categorical=1, num_categories=3, num_classes=3, seed=5))
    schema = task.schema()
    ident = Preprocessor(schema, [0.0] * 3, [1.0] * 3)

    def arrays(n, seed):
        x_num, x_cat, y = ident.transform_table(task.sample(n, seed))
        proba = np.full((n, 3), 0.1)
        proba[np.arange(n), y] = 0.8
        return x_num, x_cat, y, proba

    x, c, y, p = arrays(500, 1)
    prof = ReferenceProfile.from_arrays(schema, x, c, num_bins=5, pred=p.argmax(1))
    return schema, arrays, prof


def _monitor(small) -> Monitor:
    schema, _, prof = small
    return Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 100, "min_rows": 10}, model_version=1)


def _record(mon: Monitor, arrays, ids: list[str]) -> np.ndarray:
    x, c, y, p = arrays(len(ids), 7)
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * len(ids), "request_ids": ids})
    return y


def test_verdicts_accept_refuse_once_and_keep_a_mislabelled_prediction(small):
    schema, arrays, _ = small
    mon = _monitor(small)
    y = _record(mon, arrays, ["a", "b", "c"])
    # a probe (final=False): the unknown id is neither popped nor counted, the known one joins
    out = mon.feedback_verdicts([("a", int(y[0])), ("zz", 0)], final=False)
    assert [v["verdict"] for v in out] == ["accepted", "unknown_request_id"]
    acc = mon.report()["accuracy"]
    assert acc["labels_total"] == 1 and acc["refused_unknown_ids"] == 0 and acc["unmatched_labels"] == 0
    # the final ask refuses it and counts it, once; "a" was consumed, so it is unknown now
    out = mon.feedback_verdicts([("zz", 0), ("a", 0)], final=True)
    assert [v["verdict"] for v in out] == ["unknown_request_id"] * 2 and "prediction_log_size" in out[0]["message"]
    # an invalid label is counted and leaves the prediction waiting: a corrected label still joins
    out = mon.feedback_verdicts([("b", "no_such_class"), ("c", [0, 1])], final=True)
    assert [v["verdict"] for v in out] == ["invalid_label"] * 2 and "unknown class" in out[0]["message"]
    assert mon.feedback_verdicts([("b", schema.classes[int(y[1])])])[0]["verdict"] == "accepted"
    acc = mon.report()["accuracy"]
    assert (acc["labels_total"], acc["refused_unknown_ids"], acc["invalid_labels"], acc["unmatched_labels"]) \
        == (2, 2, 2, 0)
    # the fire-and-forget path (record_feedback_batch) still counts unknown ids as unmatched, never refused
    assert mon.record_feedback_batch([("c", int(y[2])), ("nope", 0)]) == {"received": 2, "matched": 1, "invalid": 0}
    acc = mon.report()["accuracy"]
    assert acc["unmatched_labels"] == 1 and acc["refused_unknown_ids"] == 2
    assert mon.accuracy.state()["refused"] == 2


def test_feedback_answer_202_404_422():
    items, prefix = parse_feedback_body(b'{"feedback": [{"request_id": "a", "label": 0}, '
                                        b'{"request_id": "b", "label": "x"}, {"request_id": "c", "label": 1}]}')
    ok, unknown, bad = {"verdict": "accepted"}, {"verdict": "unknown_request_id", "message": "m"}, \
        {"verdict": "invalid_label", "message": "unknown class 'x'"}
    assert feedback_answer(items, [ok, bad, unknown], prefix) == {"accepted": 1, "refused": [
        {"index": 1, "request_id": "b", "reason": "invalid_label", "message": "unknown class 'x'"},
        {"index": 2, "request_id": "c", "reason": "unknown_request_id", "message": "m"}]}
    with pytest.raises(RequestError) as e:
        feedback_answer(items, [unknown] * 3, prefix)
    assert e.value.status == 404 and e.value.field == "feedback[0].request_id"
    with pytest.raises(RequestError) as e:
        feedback_answer(items, [unknown, bad, unknown], prefix)
    assert e.value.status == 422 and e.value.field == "feedback[1].label"
    one, prefix = parse_feedback_body(b'{"request_id": "zz", "label": 0}')
    with pytest.raises(RequestError) as e:
        feedback_answer(one, [unknown], prefix)
    assert e.value.status == 404 and e.value.field == "request_id"


def _endpoint_with(link: MonitorLink):
    from serve.endpoint import StudentEndpoint

    cls = next(c for c in StudentEndpoint.func_or_class.__mro__ if "_predict" in vars(c))
    ep = cls.__new__(cls)
    ep.monitor = link
    return ep


def test_endpoint_asks_again_for_ids_another_replica_still_buffers(small):
    _, arrays, _ = small
    mon, calls = _monitor(small), []
    links = [MonitorLink(lambda: MonitorHandle(mon, calls), interval_s=0.05, buffer=MonitorBuffer()) for _ in range(2)]
    here, other = links
    x, c, y, p = arrays(2, 9)
    here.add(x[:1], c[:1], None, 1.0, 1, proba=p[:1], request_id="mine")
    other.add(x[1:], c[1:], None, 1.0, 1, proba=p[1:], request_id="theirs")  # not shipped yet
    ep = _endpoint_with(here)

    async def run():
        async def other_flushes_soon():
            await asyncio.sleep(0.01)
            other.flush()

        task = asyncio.get_running_loop().create_task(other_flushes_soon())
        out = await ep.feedback([("mine", int(y[0])), ("theirs", int(y[1])), ("stranger", 0)], "feedback")
        await task
        return out

    out = asyncio.run(run())
    assert out["accepted"] == 2 and [r["request_id"] for r in out["refused"]] == ["stranger"]
    asks = [args for name, args in calls if name == "feedback_verdicts"]
    assert [a[1] for a in asks] == [False, True] and [rid for rid, _ in asks[1][0]] == ["theirs", "stranger"]
    assert mon.report()["accuracy"]["refused_unknown_ids"] == 1  # counted once, on the final ask

    async def stranger_only():
        return await ep.feedback([("stranger", 0)], None)

    with pytest.raises(RequestError) as e:
        asyncio.run(stranger_only())
    assert e.value.status == 404 and e.value.field == "request_id"
    assert mon.report()["accuracy"]["refused_unknown_ids"] == 2
