"""Issue 6's alert -> retrain "Done when" point, end to end over real HTTP (tier 3), and the retrain job's
pieces on their own (tier 1, no Ray).

The end-to-end test deploys the endpoint declaratively (as `raysys serve deploy` does, so a canary can be
applied in place) from a registry whose production student was trained on the synthetic task, with
`monitor.on_drift: retrain` and recent traffic written to Parquet. The same number of undrifted rows raises
no alert and submits no job; drifted rows (x1 shifted 1.5 sigma, and classes 0 and 1 swapped in the labels
the users send back) raise a window alert that submits `jobs/retrain.py` through the Ray Jobs API. The
job joins the labels to the recent traffic, retrains the teacher with Ray Train, distills with Ray Tune,
registers a `candidate`, beats production on the held-out recent rows, canaries it in the endpoint and
promotes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from helpers.serving import MODEL, monitor_report, poll, predict_rows, send_feedback, serve_http_port
from helpers.worlds import RETRAIN_CONFIG, sample_rows, small_task_world, train_student_registry

from raysys.data import DriftSpec, fingerprint
from raysys.monitor.core import Monitor
from raysys.monitor.profile import ReferenceProfile
from raysys.monitor.store import labels_uri
from raysys.workflow import labelled_traffic, promotion

MONITOR_NAMESPACE = "raysys"
JOB_TIMEOUT_S = 400


# --------------------------------------------------------------------------------------------------
# tier 1: the monitor writes traffic + labels, the job joins them, splits them, judges


@pytest.fixture(scope="module")
def small_world():
    task, schema, table, pre = small_task_world()
    prof = ReferenceProfile.from_table(schema, table, num_bins=10)
    return task, schema, pre, prof


def test_the_job_reads_the_labelled_traffic_the_monitor_wrote(small_world, tmp_path):
    task, schema, pre, prof = small_world
    job = labelled_traffic
    clock = {"t": 0.0}
    traffic = tmp_path / "traffic"
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"traffic_uri": str(traffic), "traffic_flush_interval_s": 10},
                  model_version=1, clock=lambda: clock["t"])
    table = task.sample(300, [11, 8])
    x_num, (_, x_cat, y) = pre.raw_numeric(table), pre.transform_table(table)
    # 100 requests of 3 rows each; labels for the first 60 requests, one with an unknown class
    ids = [f"req-{i}" for i in range(100)]
    mon.record({"x_num": x_num, "x_cat": x_cat, "pred": np.zeros(300, dtype=np.int64), "latency_ms": [1.0] * 100,
                "request_ids": ids, "rows_per_request": [3] * 100})
    fb = [(ids[i], [schema.classes[int(v)] for v in y[3 * i:3 * i + 3]]) for i in range(60)]
    fb[5] = (ids[5], ["class_0", "class_0", "no_such_class"])
    assert mon.record_feedback_batch(fb) == {"received": 60, "matched": 59, "invalid": 1}
    got, info = job.read_labelled_traffic(str(traffic), labels_uri(str(traffic)), schema)
    assert got is None and info["traffic_files"] == 0  # nothing written yet: the flush interval has not passed
    clock["t"] += 11
    mon.report()  # every report (and tick) writes what is due
    got, info = job.read_labelled_traffic(str(traffic), labels_uri(str(traffic)), schema)
    assert info["traffic_rows"] == 300 and info["label_rows"] == 59 * 3 and info["labelled_rows"] == 59 * 3
    assert got.column_names == [f.name for f in schema.features] + ["request_id", "row", "label"]
    # every joined row carries the label its request and row were given, and its own features
    want = {(ids[i], r): int(y[3 * i + r]) for i in range(60) if i != 5 for r in range(3)}
    rows = got.to_pylist()
    assert {(d["request_id"], d["row"]): d["label"] for d in rows} == want
    x0 = {(ids[i], r): float(x_num[3 * i + r, 0]) for i in range(60) for r in range(3)}
    assert all(d["x0"] == pytest.approx(x0[(d["request_id"], d["row"])]) for d in rows)

    # the dataset: deterministic hash split, the holdout never trained on, provenance written beside it
    split = job.assign_splits([d["request_id"] for d in rows], [d["row"] for d in rows], 0.3, 0.2, seed=0)
    assert split == job.assign_splits([d["request_id"] for d in rows], [d["row"] for d in rows], 0.3, 0.2, seed=0)
    with pytest.raises(job.RetrainError, match="validation split needs at least|test split needs at least"):
        job.write_dataset(tmp_path / "ds", schema, got.slice(0, 40), holdout=0.3, val=0.2, seed=0, provenance={})
    counts = job.write_dataset(tmp_path / "ds2", schema, got, holdout=0.3, val=0.2, seed=0, provenance={"why": "t"})
    assert sum(counts.values()) == got.num_rows and counts["test"] == split.count("test")
    from raysys.config import DataConfig
    from raysys.data import ensure_dataset, read_split

    assert ensure_dataset(DataConfig(source="parquet", root=str(tmp_path / "ds2"))) == schema
    assert read_split(tmp_path / "ds2", "test").num_rows == counts["test"]
    assert json.loads((tmp_path / "ds2" / "retrain.json").read_text()) == {"why": "t", "split_rows": counts}
    fingerprint(tmp_path / "ds2")  # a complete dataset directory


def test_the_job_refuses_traffic_it_cannot_train_on(small_world, tmp_path):
    task, schema, pre, prof = small_world
    job = labelled_traffic
    traffic = tmp_path / "traffic"
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"traffic_uri": str(traffic), "traffic_drop_columns": ["x2"]},
                  model_version=1)
    table = task.sample(10, [11, 9])
    x_num, (_, x_cat, y) = pre.raw_numeric(table), pre.transform_table(table)
    mon.record({"x_num": x_num, "x_cat": x_cat, "pred": np.zeros(10, dtype=np.int64), "latency_ms": [1.0] * 10,
                "request_ids": [f"q{i}" for i in range(10)]})
    mon.record_feedback_batch([(f"q{i}", int(y[i])) for i in range(10)])
    mon._flush_recent(force=True)
    with pytest.raises(job.RetrainError, match=r"lacks features \['x2'\].*traffic_drop_columns"):
        job.read_labelled_traffic(str(traffic), labels_uri(str(traffic)), schema)
    with pytest.raises(job.RetrainError, match="only 0 labelled rows .*send labels to /v1/feedback"):
        job.wait_for_labelled_traffic(str(tmp_path / "empty"), str(tmp_path / "empty" / "labels"), schema, 10, 0.0)
    # the judge: strictly better by more than the margin, and says so
    assert promotion.judge(0.80, 0.70, 0.0)[0] and "beats production" in promotion.judge(0.80, 0.70, 0.0)[1]
    wins, why = promotion.judge(0.70, 0.70, 0.0)
    assert not wins and "does not beat production" in why and "production keeps serving" in why
    assert not promotion.judge(0.74, 0.70, 0.05)[0]
    assert not promotion.judge(0.9, None, 0.0)[0]


def test_the_canary_decision_follows_the_metric_gate(monkeypatch):
    """canary_then_decide over `serve.canary.run_canary` (the gate itself is tested in
    tests/unit/test_canary_gate.py): the gate's verdict is the decision, its failed check is in `why`; no
    monitor means no gate, so no promotion; a rollout that cannot start leaves the candidate a candidate."""
    from raysys.config import CanaryConfig
    from raysys.workflow.labelled_traffic import RetrainError
    from serve import canary as gated
    from serve import rollout as serving

    app = {"name": "app", "args": {}}
    figures = {"figures": {"candidate_rows": 300, "failures": 4}}

    def fake(passed):
        return lambda admin, name, v, gate, read, **kw: gated.CanaryResult(
            v, 1, passed, passed, "gate passed 3 checks" if passed else "gate failed 2 checks: server_errors failed: x",
            1.0, [figures])

    monkeypatch.setattr(gated, "run_canary", fake(True))
    promoted, why, canary = promotion.canary_then_decide(None, app, 7, "better", CanaryConfig(), reader=dict)
    assert promoted and "gate passed" in why and canary["rows"] == 300 and canary["errors"] == 4
    monkeypatch.setattr(gated, "run_canary", fake(False))
    promoted, why, canary = promotion.canary_then_decide(None, app, 7, "better", CanaryConfig(), reader=dict)
    assert not promoted and "server_errors failed" in why and not canary["promoted"]
    promoted, why, _ = promotion.canary_then_decide(None, {"name": "app", "args": {"monitor": False}}, 7, "better",
                                                    CanaryConfig())
    assert not promoted and "without the monitor" in why

    def busy(*a, **k):
        raise serving.RolloutError("another rollout of 'app' is in progress")

    monkeypatch.setattr(gated, "run_canary", busy)
    with pytest.raises(RetrainError, match="could not run .*in progress"):
        promotion.canary_then_decide(None, app, 7, "better", CanaryConfig(), reader=dict)


# --------------------------------------------------------------------------------------------------
# tier 3: over HTTP, with a real Ray job


@pytest.fixture(scope="module")
def http_port(request, ray_cluster):
    return serve_http_port(request)


@pytest.fixture(scope="module")
def retrain_registry(tmp_path_factory):
    return train_student_registry(tmp_path_factory.mktemp("retrain_e2e") / "registry")


class Trickle:
    """One row every `interval_s` to /v1/predict on a thread (light load, so that a canary gets requests);
    records (time, status or error, model version)."""

    def __init__(self, url: str, rows: list[dict], interval_s: float = 0.05):
        self.url, self.rows, self.interval_s = url, rows, interval_s
        self.results: list[tuple[float, object, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as s:
            k = 0
            while not self._stop.is_set():
                try:
                    r = s.post(f"{self.url}/v1/predict", json={"instances": [self.rows[k % len(self.rows)]]},
                               timeout=30)
                    self.results.append((time.monotonic(), r.status_code,
                                         r.json().get("model_version") if r.status_code == 200 else r.text[:200]))
                except requests.RequestException as e:
                    self.results.append((time.monotonic(), type(e).__name__, str(e)[:200]))
                k += 1
                self._stop.wait(self.interval_s)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _last_json(logs: str) -> dict:
    """The job's last JSON line (Ray may interleave its own log lines after it)."""
    for line in reversed(logs.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the job's logs: {logs[-3000:]}")


def _monitor_jobs(client, monitor_key: str) -> list:
    return [j for j in client.list_jobs() if (j.metadata or {}).get("raysys_monitor") == monitor_key]


@pytest.mark.integration
def test_drift_alert_retrains_registers_canaries_and_promotes_a_candidate(retrain_registry, http_port, tmp_path):
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from raysys.config import MonitorConfig, preset
    from serve.contract import app_config
    from serve.rollout import ServeAdmin, cluster_dashboard_url, deploy_app

    reg, task, schema = retrain_registry
    n = 1000
    dash = cluster_dashboard_url()
    assert dash, "the session cluster runs a dashboard (Serve's REST API and the Jobs API)"
    jobs = JobSubmissionClient(dash)
    config_file = tmp_path / "retrain.yaml"
    config_file.write_text(yaml.safe_dump(RETRAIN_CONFIG))
    traffic = tmp_path / "traffic"
    name = f"retrain-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    monitor_key = f"{MONITOR_NAMESPACE}-{monitor}"  # the monitor's snapshot key, sent as job metadata
    cfg = preset("tiny").with_root(tmp_path / "root")
    cfg.registry_uri, cfg.model_name = reg.uri, MODEL
    cfg.serve.port, cfg.serve.app_name, cfg.serve.route_prefix = http_port, name, f"/{name}"
    cfg.serve.num_replicas = 1
    cfg.monitor = MonitorConfig(
        window_size=n, min_rows=200, alpha=0.001, min_labels=200, on_drift="retrain", retrain_cooldown_s=3600,
        traffic_uri=str(traffic), traffic_flush_interval_s=1.0,
        retrain_args=["--preset", "tiny", "--config", str(config_file), "--root", str(tmp_path / "root"),
                      "--registry-uri", reg.uri, "--model-name", MODEL, "--min-labelled-rows", str(n),
                      "--label-wait-s", "180", "--canary-percent", "50", "--canary-s", "3", "--canary-min-rows", "10"])
    app = app_config(cfg)
    app["args"]["monitor_name"] = monitor
    url = f"http://127.0.0.1:{http_port}/{name}"
    job_id = None
    t0 = time.perf_counter()
    deploy_app(ServeAdmin(dash), app)
    # RUNNING in Serve before HAProxy routes to it: on a loaded box its reload can lag (a 404 from HAProxy)
    poll(lambda: requests.get(f"{url}/healthz", timeout=30).status_code == 200, what="HAProxy routing to the app")
    print(f"\n[retrain-e2e] deployed {name} in {time.perf_counter() - t0:.1f}s")
    try:
        with requests.Session() as s:
            # the same number of undrifted rows first: no alert, no job
            clean, _ = sample_rows(task, schema, n, [11, 5])
            predict_rows(s, url, clean, "clean")
            poll(lambda: (r := monitor_report(s, url)) is not None and r["rows_seen"] >= n, interval_s=0.5,
                 what="the undrifted rows")
            rep = monitor_report(s, url)  # a fresh evaluation of the full window
            assert rep["window_rows"] == n and rep["armed"] and not rep["dataset"]["drifted"], rep["dataset"]
            assert rep["alert_events"] == [] and rep["retrain"]["enabled"] and rep["retrain"]["jobs"] == []
            assert _monitor_jobs(jobs, monitor_key) == []

            # drifted rows: x1 shifted 1.5 sigma, and the rule changed (class_0 <-> class_1 in the labels)
            rows, labels = sample_rows(task, schema, n, [11, 6], DriftSpec(covariate={"x1": 1.5}))
            labels = [{0: 1, 1: 0}.get(v, v) for v in labels]
            t_drift = time.monotonic()
            ids, _ = predict_rows(s, url, rows, "drift")
            poll(lambda: (r := monitor_report(s, url)) is not None and r["alert_events"], interval_s=0.5,
                 what="a drift alert")
            alerted = poll(lambda: (r := monitor_report(s, url)) is not None and (r["retrain"]["jobs"] or
                                                                           r["retrain"]["last_error"]) and r,
                           interval_s=0.5, what="the retrain submission")
            assert alerted["retrain"]["jobs"], alerted["retrain"]
            t_submit = time.monotonic()
            window = [e for e in alerted["alert_events"] if e["kind"] == "window"]
            assert len(window) == 1 and "x1" in window[0]["features"] and window[0]["retrain"]["submitted"], \
                alerted["alert_events"]
            job_id = alerted["retrain"]["jobs"][0]["job_id"]
            print(f"[retrain-e2e] window alert on {window[0]['features']} -> job {job_id} "
                  f"{t_submit - t_drift:.1f}s after the drifted rows started")
            send_feedback(s, url, ids, labels)  # the labels come after the alert, while the job waits for them
            with Trickle(url, rows) as trickle:
                # the labels show the accuracy fell: a second alert, but one retrain is in flight already
                acc_alert = poll(lambda: [e for e in (monitor_report(s, url) or {}).get("alert_events", [])
                                          if e["kind"] == "accuracy"], interval_s=0.5, what="an accuracy alert")
                assert "still running" in acc_alert[0]["retrain"]["why"], acc_alert
                status = poll(lambda: (st := str(jobs.get_job_status(job_id)).split(".")[-1]) in
                              ("SUCCEEDED", "FAILED", "STOPPED") and st, timeout_s=JOB_TIMEOUT_S, interval_s=2,
                              what=f"retrain job {job_id} to end")
                t_end = time.monotonic()
                logs = jobs.get_job_logs(job_id)
                assert status == "SUCCEEDED", logs[-6000:]
                version = reg.get_alias(MODEL, "production")
                poll(lambda: requests.get(f"{url}/healthz", timeout=10).json()["model_version"] == version,
                     what="the endpoint serving the promoted version")
                time.sleep(1.0)
            decision = _last_json(logs)
            info = jobs.get_job_info(job_id)
            print(f"[retrain-e2e] job {status} in {t_end - t_submit:.0f}s (submitted to end; stages "
                  f"{decision['stage_seconds']}): {decision['why']}; canary {decision['canary']}")

        # one job, running jobs/retrain.py on the monitor's recent traffic, and it succeeded
        mine = _monitor_jobs(jobs, monitor_key)
        assert [j.submission_id for j in mine] == [job_id], mine
        assert "jobs/retrain.py" in info.entrypoint and f"--traffic-uri {traffic}" in info.entrypoint
        assert "window tests" in info.metadata["raysys_reason"]
        # a new candidate, trained on the recent labelled traffic, better than production on held-out recent rows
        cand = decision["candidate_version"]
        assert cand > 1 and reg.get_alias(MODEL, "candidate") == cand
        hold = decision["holdout"]
        assert hold["production_version"] == 1 and hold["rows"] >= 200
        assert hold["candidate_accuracy"] > hold["production_accuracy"] + 0.1, hold
        _, card, _ = reg.model_card(MODEL, cand)
        root = Path(card["data"]["root"])
        assert card["lineage"]["data_fingerprint"] == card["data"]["fingerprint"] == fingerprint(root)
        provenance = json.loads((root / "retrain.json").read_text())
        assert provenance["traffic_uri"] == str(traffic) and provenance["labels_uri"] == labels_uri(str(traffic))
        assert provenance["labelled_rows"] == n and provenance["served_version"] == 1
        assert provenance["job_id"] == job_id and "window tests" in provenance["reason"]
        assert sum(provenance["split_rows"].values()) == n
        # the card itself names the traffic it was retrained on (not only the dataset's retrain.json)
        assert card["lineage"]["retrain"]["job_id"] == job_id
        assert card["lineage"]["retrain"]["traffic_uri"] == str(traffic)
        teacher = card["lineage"]["parent_teacher"]
        assert teacher == f"{MODEL}-teacher:v{decision['teacher_version']}"
        assert reg.describe(f"{MODEL}-teacher", decision["teacher_version"])["lineage"]["data_fingerprint"] == \
            fingerprint(root)  # the teacher was retrained on the same rows
        # canaried in the endpoint, then promoted: stable version and production alias
        assert decision["promoted"] and "beats production" in decision["why"]
        assert decision["canary"]["app"] == name and decision["canary"]["rows"] > 0, decision["canary"]
        assert decision["canary"]["errors"] == 0
        assert version == cand
        versions = {v for _, st, v in trickle.results if st == 200}
        assert {1, cand} <= versions, versions
        failed = [r for r in trickle.results if r[1] != 200]
        assert failed == [] and len(trickle.results) > 50, failed[:5]
        # the promoted version's monitor runs on it and shows the job's end: its watcher refreshes the status
        # every 2 s (RetrainTrigger.poll_s), so the report may trail the Jobs API by that much
        with requests.Session() as s:
            after = poll(lambda: (r := monitor_report(s, url)) is not None and r["retrain"]["jobs"]
                         and r["retrain"]["jobs"][0]["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and r,
                         timeout_s=30, interval_s=0.5, what="the monitor's report of the job's end")
        assert after["model_version"] == str(cand) and after["retrain"]["jobs"][0]["status"] == "SUCCEEDED"
    finally:
        if job_id is not None and str(jobs.get_job_status(job_id)).split(".")[-1] not in ("SUCCEEDED", "FAILED",
                                                                                            "STOPPED"):
            jobs.stop_job(job_id)
        serve.delete(name)
        import ray

        try:
            ray.kill(ray.get_actor(monitor, namespace=MONITOR_NAMESPACE), no_restart=True)
        except ValueError:
            pass


def _labelled_traffic(reg, task, schema, traffic: Path, n: int) -> list[dict]:
    """What the monitor writes under `monitor.traffic_uri` for `n` drifted rows whose labels follow a new rule
    (classes 0 and 1 swapped), written by a real (Ray-free) Monitor; returns the rows."""
    prod = reg.load(MODEL, reg.get_alias(MODEL, "production"))
    table = task.sample(n, [11, 6], DriftSpec(covariate={"x1": 1.5}))
    pre = prod.preprocessor
    x_num, (_, x_cat, y) = pre.raw_numeric(table), pre.transform_table(table)
    mon = Monitor(prod.reference_profile, schema.model_dump(), {"traffic_uri": str(traffic)}, model_version=1)
    ids = [f"t{i}" for i in range(n)]
    mon.record({"x_num": x_num, "x_cat": x_cat, "pred": np.zeros(n, dtype=np.int64), "latency_ms": [1.0] * n,
                "request_ids": ids})
    swapped = [{0: 1, 1: 0}.get(int(v), int(v)) for v in y]
    assert mon.record_feedback_batch(list(zip(ids, swapped)))["matched"] == n
    mon._flush_recent(force=True)
    return table.drop_columns([schema.label]).to_pylist()


def _retrain_process(args: list[str], log: Path, *, kill_at_production_alias: bool = False) -> subprocess.Popen:
    """The retrain job's entrypoint as a driver process of the session cluster (what `ray job submit -- python
    jobs/retrain.py` runs), in its own process group; optionally SIGKILLing itself the moment it would move
    the `production` alias (after the Serve update)."""
    import ray

    patch = ("from raysys.registry import Registry\n"
             "_move = Registry.set_alias\n"
             "def set_alias(self, name, alias, version, *a, **k):\n"
             "    if alias == 'production':\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return _move(self, name, alias, version, *a, **k)\n"
             "Registry.set_alias = set_alias\n") if kill_at_production_alias else ""
    code = f"import os, signal, sys\n{patch}from raysys.jobs.retrain import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    with open(log, "w") as out:  # a file, not a pipe: nobody reads the job's output until it ends
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_group(job: subprocess.Popen) -> None:
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended by itself (the assertion before says why)
        pass
    job.wait(60)


@pytest.mark.integration
def test_a_killed_retrain_job_leaves_the_app_serving_exactly_production(http_port, tmp_path):
    """SIGKILL the retrain job (1) while its canary runs, (2) between the Serve update of its promotion and
    the alias move. The next rollout command (`serve.rollout.status`, what `raysys serve status` runs) leaves
    the app serving exactly the `production` alias, with no canary live."""
    from ray import serve

    from raysys.config import preset
    from serve import rollout
    from serve.contract import app_config

    # a registry of its own: the e2e test above promotes a candidate that already fits the new label rule
    reg, task, schema = train_student_registry(tmp_path / "registry")
    dash = rollout.cluster_dashboard_url()
    traffic = tmp_path / "traffic"
    rows = _labelled_traffic(reg, task, schema, traffic, 1000)
    config_file = tmp_path / "retrain.yaml"
    config_file.write_text(yaml.safe_dump(RETRAIN_CONFIG))
    name = f"killed-{uuid.uuid4().hex[:6]}"
    cfg = preset("tiny").with_root(tmp_path / "root")
    cfg.registry_uri, cfg.model_name = reg.uri, MODEL
    cfg.serve.port, cfg.serve.app_name, cfg.serve.route_prefix = http_port, name, f"/{name}"
    cfg.serve.num_replicas = 1
    app = app_config(cfg, model_ref=reg.get_alias(MODEL, "production"))
    app["args"]["monitor_name"] = f"raysys_monitor_{name}"
    admin = rollout.ServeAdmin(dash)
    rollout.deploy_app(admin, app)
    url = f"http://127.0.0.1:{http_port}/{name}"
    base = ["--preset", "tiny", "--config", str(config_file), "--root", str(tmp_path / "root"), "--registry-uri",
            reg.uri, "--model-name", MODEL, "--traffic-uri", str(traffic), "--min-labelled-rows", "1000",
            "--label-wait-s", "30", "--app", name, "--canary-percent", "50"]
    served = reg.get_alias(MODEL, "production")
    try:
        with Trickle(url, rows):
            # (1) a canary that never decides (too few rows for the gate), killed while it is live
            log1, log2 = tmp_path / "job1.log", tmp_path / "job2.log"
            job = _retrain_process([*base, "--canary-s", "6", "--canary-min-rows", "1000000"], log1)
            try:
                poll(lambda: job.poll() is not None or requests.get(f"{url}/healthz", timeout=10).json()[
                    "candidate_version"], timeout_s=JOB_TIMEOUT_S, interval_s=0.5, what="the job's canary")
                assert job.poll() is None, log1.read_text()[-4000:]
            finally:
                _kill_group(job)
            assert requests.get(f"{url}/healthz", timeout=10).json()["candidate_version"]  # orphaned, still live
            st = poll(lambda: (s := rollout.status(admin, name))["reconciled"] and s, timeout_s=90, interval_s=2,
                      what="the next rollout command to end the orphaned canary")
            assert "stopped renewing the rollout lease" in st["reconciled"][0], st
            health = requests.get(f"{url}/healthz", timeout=10).json()
            assert health["candidate_version"] is None and health["model_version"] == served
            assert reg.get_alias(MODEL, "production") == served

            # (2) a canary that passes, killed between the Serve update of its promotion and the alias move; it
            # distils from the teacher job (1) registered (--skip-teacher: what is tested here comes after training)
            job = _retrain_process([*base, "--canary-s", "3", "--canary-min-rows", "20", "--skip-teacher"], log2,
                                   kill_at_production_alias=True)
            try:
                assert job.wait(JOB_TIMEOUT_S) == -signal.SIGKILL, log2.read_text()[-4000:]
            finally:
                _kill_group(job)
            cand = reg.get_alias(MODEL, "candidate")
            assert cand > served and reg.get_alias(MODEL, "production") == served
            assert rollout.current_rollout(admin, name)[2]["model_ref"] == cand  # Serve moved, the alias did not
            # the dead job's lease lapses 20 s after its last heartbeat; then the next command finishes its work
            st = poll(lambda: (s := rollout.status(admin, name))["reconciled"] and s, timeout_s=90, interval_s=2,
                      what="the next rollout command to finish the promotion")
            assert any("moved the registry alias 'production'" in line for line in st["reconciled"]), \
                (st["reconciled"], st["journal"]["events"][-6:], log2.read_text()[-3000:])
            assert reg.get_alias(MODEL, "production") == cand == st["stable_version"]
            poll(lambda: requests.get(f"{url}/healthz", timeout=10).json()["model_version"] == cand,
                 what="the endpoint serving the production alias")
            assert requests.get(f"{url}/healthz", timeout=10).json()["candidate_version"] is None
    finally:
        serve.delete(name)
