"""Loop hooks for tests and the chaos benchmark: watch the workers (PIDs, per-step events, a per-step delay).

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
