"""Shared set-up of the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path


def start_quiet_ray(quiet_loggers: tuple[str, ...] = ("ray", "ray.tune", "ray.data", "ray.train")):
    """A fresh local Ray (never a cluster named by RAY_ADDRESS or /tmp/ray/ray_current_cluster), with
    more logical CPUs than cores, one torch thread per worker, and Ray's chatter off so the last stdout
    line stays the benchmark's JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in quiet_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray
    from ray.data import DataContext

    os.environ.pop("RAY_ADDRESS", None)
    ctx = ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                   log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    DataContext.get_current().enable_progress_bars = False
    return ctx


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary directory for one benchmark run (its generated data, checkpoints, registry), removed
    when the process exits, normally or by an exception."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp
