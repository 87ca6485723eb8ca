"""Alert -> retrain: submit `jobs/retrain.py` through the Ray Jobs API, one job in flight at a time, with
a cooldown between submissions. Submission runs on a background thread so that a slow Jobs API never
blocks the monitor's ingest."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("raysys")

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def default_submit(address: str | None) -> tuple[Callable[..., str], Callable[[str], str]]:
    """(submit(entrypoint, metadata) -> job id, status(job id) -> str) over JobSubmissionClient."""

    def client():
        from ray.job_submission import JobSubmissionClient

        addr = address or os.environ.get("RAY_ADDRESS")
        if not addr:
            import ray

            # inside the cluster: the dashboard this actor's Ray runs
            addr = "http://" + ray.worker.get_dashboard_url() if ray.is_initialized() else None  # type: ignore[attr-defined]
        return JobSubmissionClient(addr)

    def submit(entrypoint: str, metadata: dict[str, str]) -> str:
        return client().submit_job(entrypoint=entrypoint, metadata=metadata)

    def status(job_id: str) -> str:
        return str(client().get_job_status(job_id)).split(".")[-1]

    return submit, status


class RetrainTrigger:
    def __init__(self, *, enabled: bool, cooldown_s: float, args: list[str], address: str | None = None,
                 submit: Callable[..., str] | None = None, status: Callable[[str], str] | None = None,
                 clock: Callable[[], float] = time.time):
        self.enabled = enabled
        self.cooldown_s = float(cooldown_s)
        self.args = list(args)
        self._submit, self._status = (submit, status) if submit else default_submit(address)
        self._clock = clock
        self.job_id: str | None = None
        self.last_submit: float | None = None
        self.last_error: str | None = None
        self.jobs: list[dict[str, Any]] = []
        self._lock = threading.RLock()  # re-entered when submitting in the foreground
        self._thread: threading.Thread | None = None

    def entrypoint(self, extra: list[str]) -> str:
        import shlex

        script = REPO_ROOT / "jobs" / "retrain.py"
        return " ".join(shlex.quote(a) for a in [sys.executable, str(script), *self.args, *extra])

    def in_flight(self) -> bool:
        if self.job_id is None:
            return False
        try:
            st = self._status(self.job_id)
        except Exception as e:  # the Jobs API is down: assume the job may still run
            self.last_error = f"status: {type(e).__name__}: {e}"
            return True
        for j in self.jobs:
            if j["job_id"] == self.job_id:
                j["status"] = st
        if st in TERMINAL:
            self.job_id = None
            return False
        return True

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
            self.last_submit = now
            entry = self.entrypoint(extra_args)

            def run():
                try:
                    job = self._submit(entry, {"raysys_reason": reason[:200]})
                    with self._lock:
                        self.job_id = job
                        self.jobs.append({"job_id": job, "reason": reason, "submitted_at": now, "status": "PENDING"})
                    log.warning("raysys monitor: drift alert -> submitted retrain job %s (%s)", job, reason)
                except Exception as e:
                    self.last_error = f"submit: {type(e).__name__}: {e}"
                    log.error("raysys monitor: retrain submission failed: %s", e)

            if background:
                self._thread = threading.Thread(target=run, daemon=True, name="raysys-retrain-submit")
                self._thread.start()
            else:
                run()
            return {"submitted": True, "entrypoint": entry}

    def summary(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "job_in_flight": self.job_id, "last_submit": self.last_submit,
                "cooldown_s": self.cooldown_s, "jobs": list(self.jobs[-10:]), "last_error": self.last_error}
