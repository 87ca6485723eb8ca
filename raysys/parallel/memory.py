"""Per-rank memory of the training state: measured on each rank, and estimated before training. No Ray.

Measured (`rank_memory`): the bytes this rank really holds in parameters, gradients and optimizer state
(the local shards of FSDP2 DTensors, only the ZeRO-1 partition's AdamW state), taken after an optimizer
step so that gradients and state exist. Activations, DDP's communication buckets and allocator slack are
not counted: this is the part of memory each strategy shards.

Estimated (`estimate_rank_bytes`): from the parameter count alone, fp32 parameters (4 B), fp32 gradients
(4 B) and AdamW's two moments (8 B) per parameter, divided as each strategy shards them over the dp
degree N (model parallelism first divides the model by tp x pp; with pp > 1 the heaviest real stage of the
block-wise split when given, `largest_stage_params`):

| strategy | params           | grads  | optimizer |
|----------|------------------|--------|-----------|
| ddp      | 4P               | 4P     | 8P        |
| zero1    | 4P               | 4P     | 8P / N    |
| zero2    | 4P (gathered from forward to backward) | 4P / N | 8P / N |
| zero3    | 4P / N + 4U (one gathered unit U)      | 4P / N | 8P / N |

`check_memory_budget` refuses a configuration over `train.max_worker_memory_gb` before any worker starts,
naming a strategy and worker count that fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from raysys.parallel.dims import DATA_PARALLEL, ParallelDims, StrategyConfig

PARAM_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
GB = 1024**3
MAX_SUGGESTED_WORKERS = 1024
MEMORY_KEYS = ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes")


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters, their gradients and AdamW state are DTensors: count this rank's shard only
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def tensor_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    loc = _local(t)
    return loc.numel() * loc.element_size()


def _optimizer_state(optimizer: torch.optim.Optimizer):
    # ZeroRedundancyOptimizer keeps this rank's partition in an inner optimizer `.optim`
    inner = getattr(optimizer, "optim", None)
    return (inner if isinstance(inner, torch.optim.Optimizer) else optimizer).state


def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank."""
    seen: set[int] = set()
    params = grads = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += tensor_bytes(p)
        grads += tensor_bytes(p.grad)
    opt = 0
    if optimizer is not None:
        for state in _optimizer_state(optimizer).values():
            for v in (state or {}).values():
                if isinstance(v, torch.Tensor):
                    opt += tensor_bytes(v)
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": opt,
            "total_bytes": params + grads + opt}


def gather_rank_memory(stats: dict[str, int]) -> list[dict[str, int]]:
    """Every rank's `rank_memory` (collective; a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [dict(stats)]
    mine = torch.tensor([stats[k] for k in MEMORY_KEYS], dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [dict(zip(MEMORY_KEYS, (int(x) for x in t.tolist()))) for t in out]


def gpu_memory_metrics(device: torch.device) -> dict[str, object]:
    """On CUDA, the peak bytes the caching allocator handed out on each rank's device since the last call
    (`torch.cuda.max_memory_allocated`, then reset), max over ranks and per rank (collective); {} on CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    per_rank = [int(x["total_bytes"]) for x in gather_rank_memory(dict.fromkeys(MEMORY_KEYS, 0) | {"total_bytes": peak})]
    return {"gpu_max_allocated_bytes": max(per_rank), "gpu_per_rank_max_allocated_bytes": per_rank}


def memory_metrics(per_rank: list[dict[str, int]]) -> dict[str, object]:
    """Flat metrics for a report: the max over ranks of each kind, plus the per-rank lists."""
    out: dict[str, object] = {}
    for k in MEMORY_KEYS:
        vals = [r[k] for r in per_rank]
        out[f"mem_max_{k}"] = max(vals)
        out[f"mem_per_rank_{k}"] = vals
    return out


# ----------------------------------------------------------------------------------------------------
# estimates before training
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    strategy: str
    num_workers: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def estimate_rank_bytes(num_params: int, strategy: str, dims: ParallelDims, *, largest_unit_params: int = 0,
                        largest_stage_params: int = 0) -> MemoryEstimate:
    """Per-rank bytes of params + grads + AdamW state (the table in the module docstring).

    With pp > 1, `largest_stage_params` (the heaviest stage of `raysys.parallel.pipeline.stage_sizes`)
    replaces the ideal P / pp: stages split at whole blocks, so the heaviest rank can hold more than 1/pp.
    """
    flavour = StrategyConfig(strategy).data_parallel
    p = _ceil_div(num_params, dims.tp * dims.pp)  # model parallelism splits the model first
    if dims.pp > 1 and largest_stage_params:
        p = max(p, _ceil_div(largest_stage_params, dims.tp))
    u = _ceil_div(largest_unit_params, dims.tp * dims.pp)
    n = dims.dp
    params, grads, opt = PARAM_BYTES * p, GRAD_BYTES * p, ADAM_BYTES * p
    if flavour == "zero1":
        opt = ADAM_BYTES * _ceil_div(p, n)
    elif flavour == "zero2":
        grads, opt = GRAD_BYTES * _ceil_div(p, n), ADAM_BYTES * _ceil_div(p, n)
    elif flavour == "zero3":
        params = PARAM_BYTES * (_ceil_div(p, n) + (u if n > 1 else 0))
        params = min(params, PARAM_BYTES * p)
        grads, opt = GRAD_BYTES * _ceil_div(p, n), ADAM_BYTES * _ceil_div(p, n)
    return MemoryEstimate(strategy, dims.world_size, params, grads, opt)


def suggest_fit(num_params: int, budget_gb: float, dims: ParallelDims, *, largest_unit_params: int = 0,
                largest_stage_params: int = 0) -> MemoryEstimate | None:
    """The cheapest data-parallel strategy and worker count under the budget, keeping tp and pp: fewest
    workers first, then the least sharding (less communication): ddp, zero1, zero2, zero3."""
    mp = dims.tp * dims.pp
    workers = sorted({dims.world_size} | {mp * 2**i for i in range(11)})
    for w in workers:
        if w < dims.world_size or w > MAX_SUGGESTED_WORKERS:
            continue
        d = ParallelDims(dp=w // mp, tp=dims.tp, pp=dims.pp, world_size=w)
        for s in DATA_PARALLEL:
            est = estimate_rank_bytes(num_params, s, d, largest_unit_params=largest_unit_params,
                                      largest_stage_params=largest_stage_params)
            if est.total_gb <= budget_gb:
                return est
    return None


def check_memory_budget(num_params: int, strategy: str, dims: ParallelDims, budget_gb: float | None, *,
                        largest_unit_params: int = 0, largest_stage_params: int = 0) -> MemoryEstimate:
    """Raise ValueError when the per-rank estimate exceeds `budget_gb` (None: no budget); return the estimate."""
    est = estimate_rank_bytes(num_params, strategy, dims, largest_unit_params=largest_unit_params,
                              largest_stage_params=largest_stage_params)
    if budget_gb is None or est.total_gb <= budget_gb:
        return est
    fit = suggest_fit(num_params, budget_gb, dims, largest_unit_params=largest_unit_params,
                      largest_stage_params=largest_stage_params)
    need = (f"train.max_worker_memory_gb: strategy {strategy!r} on {dims.world_size} workers needs ~{est.total_gb:.3g} GB "
            f"per worker for {num_params:,} parameters (params {est.params_bytes / GB:.3g} + grads "
            f"{est.grads_bytes / GB:.3g} + AdamW state {est.optimizer_bytes / GB:.3g} GB), over the budget of "
            f"{budget_gb:g} GB")
    if fit is None:
        raise ValueError(f"{need}; nothing fits up to {MAX_SUGGESTED_WORKERS} workers: use a smaller teacher "
                         f"(teacher.*) or raise the budget")
    raise ValueError(f"{need}; strategy {fit.strategy!r} with {fit.num_workers} workers fits (~{fit.total_gb:.3g} GB "
                     f"per worker): set train.strategy={fit.strategy} and train.num_workers={fit.num_workers} "
                     f"(raysys train --strategy {fit.strategy} --workers {fit.num_workers})")
