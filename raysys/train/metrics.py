"""Training's `raysys_*` metrics on the Ray dashboard / Prometheus (`ray.util.metrics`): the teacher's
throughput and each rank's bytes of parameters, gradients and optimizer state, set once per epoch by rank 0
(which gathers every rank's figures; only rank 0 reports metrics). Made only inside a Ray Train worker (an
actor): elsewhere (local mode, unit tests) `train_metrics` returns None and nothing is exported."""

from __future__ import annotations

from typing import Any

from raysys.parallel.memory import MEMORY_KEYS


class TrainMetrics:
    def __init__(self):
        from ray.util.metrics import Gauge

        self.samples_per_s = Gauge("raysys_train_samples_per_s",
                                   description="Teacher training throughput of the last epoch (global rows/s).",
                                   tag_keys=("run_name", "strategy"))
        self.rank_memory = Gauge("raysys_train_rank_memory_bytes",
                                 description="Bytes one rank holds after a step (kind: params_bytes, "
                                             "grads_bytes, optimizer_bytes, total_bytes).", tag_keys=("run_name", "rank", "kind"))

    def record_epoch(self, run_name: str, metrics: dict[str, Any]) -> None:
        self.samples_per_s.set(float(metrics["samples_per_s"]),
                               tags={"run_name": run_name, "strategy": str(metrics["strategy"])})
        for kind in MEMORY_KEYS:
            for rank, value in enumerate(metrics.get(f"mem_per_rank_{kind}") or []):
                self.rank_memory.set(float(value), tags={"run_name": run_name, "rank": str(rank), "kind": kind})


def train_metrics(rank: int) -> TrainMetrics | None:
    """The metrics on rank 0 of a run inside a Ray actor, else None."""
    import ray

    if rank == 0 and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return TrainMetrics()
    return None
