"""Alert -> retrain: submit the retrain job (`raysys.jobs.retrain`, shipped with the package) through the
Ray Jobs API, one job in flight at a time, with a cooldown between submissions. Submission runs on a background thread so that a slow Jobs API never
blocks the monitor's ingest; the same thread then follows the job until it ends, so the monitor's report
shows its final status (and, when it failed, Ray's message saying why)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("raysys")

RETRAIN_JOB = "raysys.jobs.retrain"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
def cluster_dashboard_address() -> str | None:
    """The Jobs API (dashboard) address of the Ray cluster this process belongs to, read from the GCS where
    the dashboard registers it: inside an actor `ray.get_dashboard_url()` knows no dashboard (a worker's
    node object has no web UI URL) and JobSubmissionClient(None) would guess 127.0.0.1:8265."""
    import ray

    if not ray.is_initialized():
        return None
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    url = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    if not url:
        return None
    url = url.decode() if isinstance(url, bytes) else str(url)
    return url if "://" in url else f"http://{url}"


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    addr = address or os.environ.get("RAY_ADDRESS") or cluster_dashboard_address()
    if not addr:
        raise RuntimeError("no Ray Jobs API to submit the retrain job to: set monitor.retrain_address (the Ray "
                           "dashboard URL) or RAY_ADDRESS, or run the monitor on a cluster with a dashboard")
    return JobSubmissionClient(addr)


def default_submit(address: str | None, resources: dict[str, float] | None = None,
                   ) -> tuple[Callable[..., str], Callable[[str], str]]:
    """(submit(entrypoint, metadata) -> job id, status(job id) -> str) over JobSubmissionClient; the job's
    driver reserves `resources` (monitor.retrain_resources), which places it on a node that has them."""

    def submit(entrypoint: str, metadata: dict[str, str]) -> str:
        return _client(address).submit_job(entrypoint=entrypoint, metadata=metadata,
                                           entrypoint_resources=dict(resources) if resources else None)

    def status(job_id: str) -> str:
        return str(_client(address).get_job_status(job_id)).split(".")[-1]

    return submit, status


def default_message(address: str | None) -> Callable[[str], str | None]:
    """message(job id): Ray's one-line account of how the job ended (e.g. the exit code and last error)."""

    def message(job_id: str) -> str | None:
        return _client(address).get_job_info(job_id).message

    return message


DRIFT_ALERT_KINDS = ("online", "window")


def held_back(kind: str, monitor_cfg) -> dict | None:
    """The retrain answer for an alert that `monitor.retrain_when` keeps from submitting a job (a drift alert
    under 'accuracy_drop'), else None."""
    if kind in DRIFT_ALERT_KINDS and monitor_cfg.retrain_when == "accuracy_drop":
        return {"submitted": False, "why": "monitor.retrain_when is 'accuracy_drop': drift alone is reported; a "
                f"retrain waits for the realised or estimated accuracy to fall by {monitor_cfg.accuracy_drop}"}
    return None


class RetrainTrigger:
    """Submits the retrain job on an alert unless disabled, a job is in flight, or within the cooldown.

    `submit`/`status`/`message` are the Jobs API calls (injectable for tests; default JobSubmissionClient on
    `address`, RAY_ADDRESS or this cluster's dashboard). `metadata` goes with every submission (the monitor
    names itself there). `poll_s`: how often a submitted job's status is refreshed until it ends (None: only
    when the next alert asks). A submission that fails (the Jobs API busy or down) starts no cooldown: the next
    alert at least `SUBMIT_RETRY_S` later submits again."""

    SUBMIT_RETRY_S = 30.0
    # an error Ray asks the client to retry ("No available agent to submit job, please try again later": the
    # node's job agent is not up yet or busy) is retried within the same submission, these many seconds apart;
    # an alert fires once per drift episode, so "a later alert" may never come while the drift persists
    TRANSIENT_WAITS_S = (2.0, 4.0, 8.0, 16.0)
    TRANSIENT_MARKS = ("try again later", "No available agent")

    def __init__(self, *, enabled: bool, cooldown_s: float, args: list[str], address: str | None = None,
                 resources: dict[str, float] | None = None,
                 submit: Callable[..., str] | None = None, status: Callable[[str], str] | None = None,
                 message: Callable[[str], str | None] | None = None, metadata: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float | None = 2.0,
                 sleep: Callable[[float], None] = time.sleep, on_end: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.cooldown_s = float(cooldown_s)
        self.args = list(args)
        if submit is not None:
            self._submit, self._status, self._message = submit, status, message
        else:
            self._submit, self._status = default_submit(address, resources)
            self._message = message or default_message(address)
        self.metadata = dict(metadata or {})
        self._clock, self._sleep = clock, sleep
        # called with how each job ended (a TERMINAL status) or "SUBMIT_FAILED" (the dashboard's counter)
        self._on_end = on_end
        self.poll_s = poll_s
        self.job_id: str | None = None
        self.last_submit: float | None = None
        self.last_failed: float | None = None  # when a submission last failed (no job ran)
        self.last_error: str | None = None
        self.jobs: list[dict[str, Any]] = []
        self._lock = threading.RLock()  # re-entered when submitting in the foreground
        self._thread: threading.Thread | None = None  # submitting
        self._watcher: threading.Thread | None = None  # following the submitted job

    def entrypoint(self, extra: list[str]) -> str:
        """The job's command line: this interpreter on the installed job module's file. The job gets no
        working_dir, so it runs the package installed on the cluster, as the monitor does."""
        import shlex

        script = importlib.util.find_spec(RETRAIN_JOB).origin
        return " ".join(shlex.quote(a) for a in [sys.executable, str(script), *self.args, *extra])

    def _ended(self, status: str) -> None:
        if self._on_end is not None:
            try:
                self._on_end(status)
            except Exception as e:  # a metric must never stop the trigger
                log.warning("raysys monitor: retrain on_end callback failed: %s", e)

    def _record_status(self, job_id: str, st: str) -> None:
        with self._lock:
            for j in self.jobs:
                if j["job_id"] == job_id and j.get("status") != st:
                    j["status"] = st
                    if st in TERMINAL:
                        j["ended_at"] = time.time()
                        if st != "SUCCEEDED" and self._message is not None:
                            try:
                                j["message"] = self._message(job_id)
                            except Exception as e:
                                j["message"] = f"(no message: {type(e).__name__}: {e})"
                        level = logging.INFO if st == "SUCCEEDED" else logging.ERROR
                        log.log(level, "raysys monitor: retrain job %s %s%s", job_id, st,
                                f": {j['message']}" if j.get("message") else "")
                        self._ended(st)
            if st in TERMINAL and self.job_id == job_id:
                self.job_id = None

    def in_flight(self) -> bool:
        job = self.job_id
        if job is None:
            return False
        try:
            st = self._status(job)
        except Exception as e:  # the Jobs API is down: assume the job may still run
            self.last_error = f"status: {type(e).__name__}: {e}"
            return True
        self._record_status(job, st)
        return st not in TERMINAL

    def _follow(self, job_id: str) -> None:
        if self.poll_s:
            self._watcher = threading.Thread(target=self._watch, args=(job_id,), daemon=True,
                                             name="raysys-retrain-watch")
            self._watcher.start()

    def _watch(self, job_id: str) -> None:
        """Refresh the job's status every `poll_s` until it ends (or another job replaced it)."""
        while self.poll_s and self.job_id == job_id:
            time.sleep(self.poll_s)
            try:
                st = self._status(job_id)
            except Exception as e:
                self.last_error = f"status: {type(e).__name__}: {e}"
                continue
            self._record_status(job_id, st)

    def _submit_retrying(self, entry: str, metadata: dict[str, str]) -> str:
        """`_submit`, retried after the TRANSIENT_WAITS_S when Ray says to try again later."""
        for wait in (*self.TRANSIENT_WAITS_S, None):
            try:
                return self._submit(entry, metadata)
            except Exception as e:
                if wait is None or not any(m in str(e) for m in self.TRANSIENT_MARKS):
                    raise
                log.warning("raysys monitor: retrain submission: %s; retrying in %.0fs", e, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")

    def maybe_submit(self, reason: str, extra_args: list[str], *, background: bool = True) -> dict[str, Any]:
        """Submit unless disabled, a job is in flight, or within the cooldown. Returns what happened."""
        with self._lock:
            if not self.enabled:
                return {"submitted": False, "why": "monitor.on_drift is 'alert'"}
            if self._thread is not None and self._thread.is_alive():
                return {"submitted": False, "why": "a submission is in progress"}
            if self.in_flight():
                return {"submitted": False, "why": f"retrain job {self.job_id} still running"}
            now = self._clock()
            if self.last_submit is not None and now - self.last_submit < self.cooldown_s:
                return {"submitted": False, "why": f"cooldown ({self.cooldown_s:.0f}s)"}
            if self.last_failed is not None and now - self.last_failed < self.SUBMIT_RETRY_S:
                return {"submitted": False, "why": f"the last submission failed {now - self.last_failed:.0f}s ago "
                                                   f"({self.last_error}); the next alert from "
                                                   f"{self.SUBMIT_RETRY_S:.0f}s after it will retry"}
            entry = self.entrypoint(extra_args)
            outcome: dict[str, Any] = {"submitted": True, "entrypoint": entry}

            def run():
                try:
                    job = self._submit_retrying(entry, {**self.metadata, "raysys_reason": reason[:200]})
                    with self._lock:
                        # the cooldown starts with a job that runs; concurrent calls meanwhile see the
                        # submission in progress (`_thread`) or hold the lock (foreground)
                        self.job_id, self.last_submit, self.last_failed = job, now, None
                        self.jobs.append({"job_id": job, "reason": reason, "submitted_at": now, "status": "PENDING"})
                    log.warning("raysys monitor: drift alert -> submitted retrain job %s (%s)", job, reason)
                except Exception as e:
                    with self._lock:  # no job ran: no cooldown, a later alert retries
                        self.last_failed = now
                        self.last_error = f"submit: {type(e).__name__}: {e}"
                    outcome.update(submitted=False, why=self.last_error)
                    self._ended("SUBMIT_FAILED")
                    log.error("raysys monitor: retrain submission failed (a later alert retries, from %.0fs on): %s",
                              self.SUBMIT_RETRY_S, e)
                    return
                if background:
                    self._follow(job)

            if background:  # `submitted` then means started; a failure shows in summary()["last_error"]
                self._thread = threading.Thread(target=run, daemon=True, name="raysys-retrain-submit")
                self._thread.start()
                return dict(outcome)  # a copy: the thread may update `outcome` while callers read theirs
            run()
            return outcome

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": self.enabled, "job_in_flight": self.job_id, "last_submit": self.last_submit,
                    "cooldown_s": self.cooldown_s, "jobs": [dict(j) for j in self.jobs[-10:]],
                    "last_error": self.last_error}

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"job_id": self.job_id, "last_submit": self.last_submit, "jobs": [dict(j) for j in self.jobs]}

    def load_state(self, st: dict[str, Any]) -> None:
        """Restored from a snapshot: a job still in flight is followed again."""
        with self._lock:
            self.job_id, self.last_submit = st.get("job_id"), st.get("last_submit")
            self.jobs = list(st.get("jobs", []))
            job = self.job_id
        if job is not None and self.enabled:
            self._follow(job)
