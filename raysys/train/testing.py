"""Loop hooks for tests: watch the workers (PIDs, per-step events, a per-step delay) or break one on purpose.

Pass one to `train_teacher(..., hooks=...)`: it is pickled to every worker with the loop function, and
each worker calls it at the points of `raysys.train.loop.LoopHooks`. Production code never builds these.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from raysys.train.loop import NoHooks


class InjectedFailure(RuntimeError):
    """Raised by `FailAtEpoch`."""


class WorkerEvents(NoHooks):
    """Each rank writes its PID to `<directory>/pid-rank<r>` (so a test can SIGKILL it) and appends one JSON
    line per worker start, epoch start, step and report to `events-rank<r>.jsonl`; it sleeps `step_delay_s`
    after every step so that a kill lands mid-epoch."""

    def __init__(self, directory: str | Path, step_delay_s: float = 0.0):
        self.directory = Path(directory).resolve()
        self.step_delay_s = step_delay_s
        self.rank = 0

    def _event(self, **fields: Any) -> None:
        with open(self.directory / f"events-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": self.rank, "pid": os.getpid(), "t": time.time(), **fields}) + "\n")

    def on_worker_start(self, rank: int, world: int) -> None:
        self.rank = rank
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"pid-rank{rank}").write_text(str(os.getpid()))
        self._event(event="worker_start", world=world)

    def on_epoch_start(self, epoch: int, resumes: int) -> None:
        self._event(event="epoch_start", epoch=epoch, resumes=resumes)

    def on_step(self, epoch: int, step: int) -> None:
        self._event(event="step", epoch=epoch, step=step)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def on_reported(self, epoch: int) -> None:
        self._event(event="reported", epoch=epoch)


class FailAtEpoch(NoHooks):
    """The last rank raises `InjectedFailure` at the start of epoch `epoch`. With a `marker` path it fails only
    while that file does not exist (it creates it), so a retry gets through."""

    def __init__(self, epoch: int, marker: str | Path | None = None):
        self.epoch = epoch
        self.marker = Path(marker).resolve() if marker is not None else None
        self.last_rank = False
        self.rank = 0

    def on_worker_start(self, rank: int, world: int) -> None:
        self.rank, self.last_rank = rank, rank == world - 1

    def on_epoch_start(self, epoch: int, resumes: int) -> None:
        if epoch != self.epoch or not self.last_rank:
            return
        if self.marker is not None:
            if self.marker.exists():
                return
            self.marker.write_text(f"failed at epoch {epoch} on rank {self.rank}\n")
        raise InjectedFailure(f"injected failure at epoch {epoch} on rank {self.rank} (FailAtEpoch)")
