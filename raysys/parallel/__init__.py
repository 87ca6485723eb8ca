"""All parallelism lives here (DDP now; ZeRO, FSDP2, pipeline and tensor parallel later). No Ray.

`parallelize(model, strategy)` is the one entry point the training loop calls; each strategy is an
`apply_<strategy>` function that logs one line on rank 0 when it changes the model.
"""

from __future__ import annotations

from torch import nn

from raysys.parallel.ddp import apply_ddp, rank, unwrap, world_size

STRATEGIES = ("ddp",)


def parallelize(model: nn.Module, strategy: str) -> nn.Module:
    """Apply the named parallel strategy to a single-device model (`train.strategy` in the config)."""
    if strategy == "ddp":
        return apply_ddp(model)
    raise ValueError(f"train.strategy: unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")


__all__ = ["STRATEGIES", "apply_ddp", "parallelize", "rank", "unwrap", "world_size"]
