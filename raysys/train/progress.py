"""The teacher's epochs as seen from the driver (`EpochWatcher`), for the CLI's progress bar.

Ray Train v2 runs its callbacks in the controller actor and rank 0's epoch line on a worker (it reaches the
driver only while Ray forwards worker logs, which `raysys demo` turns off), so the driver reads the run's own
record instead: Ray Train keeps the latest reported checkpoint's metrics in
`<storage>/<run>/checkpoint_manager_snapshot.json` (rank 0 reports one checkpoint per epoch). Shared storage
is required for Ray Train's checkpoints anyway, so this works on a cluster as on a laptop. Each new epoch is
one log line with `extra={"raysys_progress": ...}` (raysys.cli.progress); any error reading the file is
skipped: progress must never fail training.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pyarrow.fs

logger = logging.getLogger(__name__)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_epoch(fs: pyarrow.fs.FileSystem, path: str) -> tuple[int, dict] | None:
    """(epoch number, its metrics) of the latest reported checkpoint in the snapshot at `path`, or None."""
    try:
        with fs.open_input_stream(path) as f:
            snap = json.loads(f.read())
        metrics = (snap.get("latest_checkpoint_result") or {}).get("metrics") or {}
        return (int(metrics["epoch"]), metrics) if "epoch" in metrics else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class EpochWatcher:
    """`with EpochWatcher(storage, run_name, num_epochs): trainer.fit()` logs each epoch the run reports."""

    def __init__(self, storage: str, run_name: str, num_epochs: int, interval_s: float = 1.0):
        self.num_epochs, self.interval_s = num_epochs, interval_s
        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        self.path = f"{root.rstrip('/')}/{run_name}/{SNAPSHOT_FILE}"
        start = latest_epoch(self.fs, self.path)  # a resumed run: its earlier epochs are not news
        self.seen = start[0] if start else -1
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raysys-epoch-watcher", daemon=True)

    def __enter__(self) -> EpochWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last epoch, when fit() returned before the next poll

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        got = latest_epoch(self.fs, self.path)
        if got is None or got[0] <= self.seen:
            return
        self.seen, metrics = got
        acc = metrics.get("val_accuracy")
        logger.info("teacher: epoch %d/%d reported%s (%.0fs)", self.seen + 1, self.num_epochs,
                    f", val_accuracy {acc:.4f}" if isinstance(acc, int | float) else "", time.monotonic() - self.t0,
                    extra={"raysys_progress": {"task": "teacher", "event": "advance", "completed": self.seen + 1,
                                               "total": self.num_epochs}})
