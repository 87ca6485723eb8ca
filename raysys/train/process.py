"""A training worker's process settings: logging, torch threads, nice value, Ray Train's report interval."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from raysys.config import TrainConfig

logger = logging.getLogger(__name__)

# Ray Train v2's controller collects each worker's `ray.train.report` once per health-check interval and a
# worker's result queue holds one report, so a report waits until the previous one has been taken. The
# driver's value of this variable reaches the controller and the workers (Ray Train's ENV_VARS_TO_PROPAGATE).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextmanager
def report_poll_interval(seconds: float) -> Iterator[float]:
    """Sets `REPORT_POLL_ENV` to `seconds` for the duration (for `TrainController`s created inside it),
    unless the environment already sets it; yields the interval in force.

    With Ray's 2 s default, epochs shorter than that wait for the controller at every report.
    """
    if os.environ.get(REPORT_POLL_ENV):
        yield float(os.environ[REPORT_POLL_ENV])
        return
    os.environ[REPORT_POLL_ENV] = repr(float(seconds))
    try:
        yield float(seconds)
    finally:
        os.environ.pop(REPORT_POLL_ENV, None)


def report_poll_interval_s() -> float | None:
    """The controller's report-collection interval as Ray Train handed it to this worker (None: Ray's 2 s)."""
    value = os.environ.get(REPORT_POLL_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def setup_worker_process(train: TrainConfig, rank: int) -> None:
    """Logging to stderr, `train.threads_per_worker` torch threads, `train.worker_niceness` on every thread."""
    ensure_log_handler()
    torch.set_num_threads(train.threads_per_worker)
    if train.worker_niceness is None:
        return
    _changed, refused = renice_process(train.worker_niceness)
    if refused and rank == 0:
        logger.warning("teacher: could not set train.worker_niceness=%s on %d threads (needs CAP_SYS_NICE); "
                       "they keep Ray's worker niceness", train.worker_niceness, refused)


def ensure_log_handler() -> None:
    # Ray worker processes have no logging handlers: without one, rank 0's INFO lines would vanish.
    # Leave the process alone when something (the driver in local mode, a user config) handles them.
    root = logging.getLogger("raysys")
    if not root.hasHandlers():
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


def renice_process(niceness: int) -> tuple[int, int]:
    """Set the nice value of every thread of this process (Linux nice values are per thread: the training
    thread, gloo's communication threads, torch's pools). Returns (threads changed, threads refused).

    Why: Ray starts worker processes at nice 15 (`RAY_worker_niceness`) to keep its raylet and GCS
    responsive; a training worker is then the first thing starved on a shared or busy machine, while a
    plain torchrun process runs at 0. Lowering a nice value needs CAP_SYS_NICE (root in most containers);
    without it the threads keep Ray's value and the refusal is counted, not raised.
    """
    changed = refused = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: one process-wide value
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except PermissionError:
            refused += 1
        except (OSError, AttributeError):  # a thread that just exited; no setpriority on this platform
            pass
    return changed, refused
