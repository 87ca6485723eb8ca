"""ZeRO-1: optimizer state partitioned across data-parallel ranks, over DDP.

Gradients are still all-reduced in full by DDP (ZeRO-1 shards only the optimizer state); each rank then
steps the AdamW state of the part it owns and shares the updated parameters. Two partitions:

- "even" (default, `EvenShardedAdamW`): the flattened parameters split into N equal slices, as in the
  ZeRO paper / DeepSpeed stage 1: max-over-ranks optimizer bytes = the ideal 1/N (+ padding).
- "whole_params": torch's `ZeroRedundancyOptimizer`, which assigns *whole* parameters greedily (largest
  first). Measured on the large MLP teacher (one 1024x1024 matrix = 56% of the parameters): 2.24x the
  ideal at N=4 (benchmarks/zero_memory.py), because no rank can hold less than that matrix.

Checkpoints: `full_optimizer_state` consolidates the shards onto rank 0 in the same index-keyed layout
as a plain `AdamW.state_dict()` over `model.parameters()`, so a ZeRO-1 checkpoint is interchangeable
with a DDP one (and `ZeroRedundancyOptimizer.load_state_dict` takes that full layout on every rank).
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from raysys.parallel.ddp import apply_ddp, dp_group, dp_size, rank, unwrap

logger = logging.getLogger(__name__)


def apply_zero1(model: nn.Module, mesh=None, cfg=None) -> nn.Module:
    """DDP for the gradients; the partitioned optimizer comes from `build_zero1_optimizer`."""
    return apply_ddp(model, mesh, cfg, label="ZeRO-1 (DDP + ZeroRedundancyOptimizer)")


ZERO1_PARTITIONS = ("even", "whole_params")


def build_zero1_optimizer(model: nn.Module, mesh, cfg) -> torch.optim.Optimizer | EvenShardedAdamW:
    """AdamW whose state is partitioned over the mesh's dp ranks (a plain AdamW on one rank).

    `cfg.option("zero1_partition")`: "even" (default) splits the flattened parameters into N equal
    slices (`EvenShardedAdamW`); "whole_params" is torch's `ZeroRedundancyOptimizer`, which assigns whole
    parameters to ranks and is uneven when one matrix dominates the model.
    """
    params = list(unwrap(model).parameters())
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    if dp_size(mesh) <= 1:
        return torch.optim.AdamW(params, **kwargs)
    partition = cfg.option("zero1_partition", "even")
    if partition not in ZERO1_PARTITIONS:
        raise ValueError(f"train.zero1_partition: {partition!r} is not one of {list(ZERO1_PARTITIONS)}")
    if partition == "even":
        opt = EvenShardedAdamW(params, group=dp_group(mesh), **kwargs)
        sizes = [opt.shard_size] * opt.world
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=dp_group(mesh),
                                      **kwargs)
        sizes = [sum(p.numel() for g in part for p in g["params"]) for part in opt._partition_parameters()]
    if rank() == 0:
        logger.info("parallel: ZeRO-1 optimizer state partitioned (%s) over %d ranks, parameters per rank %s",
                    partition, len(sizes), sizes)
    return opt


class EvenShardedAdamW:
    """ZeRO-1 with an even split: rank r owns elements [r*S, (r+1)*S) of the flattened parameters.

    DDP has already averaged the full gradients on every rank. `step` copies this rank's slice of the
    parameters and gradients into a flat shard, runs a real `torch.optim.AdamW` on it (AdamW is
    elementwise, so slicing changes nothing numerically), then all-gathers the updated slices back into
    every rank's parameters. Only the AdamW moments of the slice persist (8 B x P / N per rank); the
    shard of the parameters is re-read from the model at every step, so loading weights into the model
    (a checkpoint restore) needs nothing else. Beside the state, each rank keeps a 4 B x P buffer the
    updated slices are gathered into (the role DDP's buckets play for gradients; not counted as optimizer
    state by raysys.parallel.memory).

    Quacks like an optimizer for the loop and checkpoints: `param_groups` (the inner AdamW's, so setting
    `lr` works), `zero_grad`, `step`, `state_dict`/`load_state_dict` in the plain-AdamW index layout
    (`consolidated_state_dict` is the collective that builds it on rank 0), and `.optim` for memory
    accounting.
    """

    def __init__(self, params, *, group=None, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch.distributed as dist

        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.numels = [p.numel() for p in self.params]
        self.total = sum(self.numels)
        self.shard_size = -(-self.total // self.world)
        self.start = min(self.rank * self.shard_size, self.total)
        self.end = min(self.start + self.shard_size, self.total)
        dtype = self.params[0].dtype if self.params else torch.float32
        device = self.params[0].device if self.params else torch.device("cpu")  # a GPU rank's shard stays on it
        self.shard = nn.Parameter(torch.zeros(self.end - self.start, dtype=dtype, device=device))
        self.optim = torch.optim.AdamW([self.shard], lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        # buffers reused every step: the shard's gradient, and the gathered flat parameters (each rank's
        # slice lands in its own view, no concatenation)
        self._grad = torch.zeros_like(self.shard.data)
        self._flat = torch.zeros(self.shard_size * self.world, dtype=dtype, device=device)
        self._slots = list(self._flat.split(self.shard_size))
        self._mine = list(self._overlaps())
        self._pre_hooks: OrderedDict[int, Any] = OrderedDict()  # RemovableHandle needs a weak-referenceable dict

    def register_step_pre_hook(self, hook):
        """`torch.optim.Optimizer.register_step_pre_hook`: `hook(self, args, kwargs)` before every step,
        while the full parameters still hold the pre-step values (e.g. decoupled weight decay)."""
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._pre_hooks)
        self._pre_hooks[handle.id] = hook
        return handle

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def _overlaps(self):
        """(param index, slice of the param's flat view, slice of the shard) for the params in my range."""
        offset = 0
        for i, n in enumerate(self.numels):
            lo, hi = max(offset, self.start), min(offset + n, self.end)
            if lo < hi:
                yield i, slice(lo - offset, hi - offset), slice(lo - self.start, hi - self.start)
            offset += n

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist

        for hook in list(self._pre_hooks.values()):
            hook(self, (), {})
        grad = self._grad
        grad.zero_()
        for i, ps, ss in self._mine:
            p = self.params[i]
            self.shard.data[ss] = p.detach().reshape(-1)[ps]
            if p.grad is not None:
                grad[ss] = p.grad.reshape(-1)[ps]
        self.shard.grad = grad
        self.optim.step()
        self.shard.grad = None
        mine = self._slots[self.rank]
        mine[: self.end - self.start] = self.shard.data
        dist.all_gather(self._slots, mine.clone(), group=self.group)
        offset = 0
        for p, n in zip(self.params, self.numels):
            p.data.copy_(self._flat[offset:offset + n].view_as(p))
            offset += n
        return None

    # -- checkpoints: the plain-AdamW layout over `params` (index-keyed) ---------------------------------
    def _group_hyper(self) -> dict[str, Any]:
        return {k: v for k, v in self.optim.state_dict()["param_groups"][0].items() if k != "params"}

    def consolidated_state_dict(self, to: int = 0) -> dict[str, Any] | None:
        """Collective: the whole optimizer state as `AdamW(params).state_dict()` would hold it, on rank `to`."""
        import torch.distributed as dist

        st = self.optim.state.get(self.shard, {})
        has = torch.tensor([1 if st else 0], dtype=torch.int64)
        dist.all_reduce(has, op=dist.ReduceOp.MIN, group=self.group)
        groups = [{**self._group_hyper(), "params": list(range(len(self.params)))}]
        if not int(has):
            return {"state": {}, "param_groups": groups} if self.rank == to else None
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            padded = torch.zeros(self.shard_size, dtype=self.shard.dtype, device=self.shard.device)
            padded[: self.end - self.start] = st[key]
            parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == to else None
            dist.gather(padded, parts, dst=dist.get_global_rank(self.group, to) if self.group else to,
                        group=self.group)
            if self.rank == to:
                moments[key] = torch.cat(parts)[: self.total]
        if self.rank != to:
            return None
        state, offset = {}, 0
        for i, (p, n) in enumerate(zip(self.params, self.numels)):
            state[i] = {"step": st["step"].clone(),
                        **{k: v[offset:offset + n].view_as(p).clone() for k, v in moments.items()}}
            offset += n
        return {"state": state, "param_groups": groups}

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("EvenShardedAdamW.state_dict: the state is sharded; call consolidated_state_dict() "
                           "on every rank (raysys.parallel.full_optimizer_state does)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take this rank's slice of a whole plain-AdamW state (every rank passes the same dict)."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"checkpoint: optimizer state has {sum(len(g['params']) for g in groups)} parameters "
                             f"in {len(groups)} groups; this model has {len(self.params)} in one")
        hyper = {k: v for k, v in groups[0].items() if k != "params"}
        inner: dict[str, Any] = {}
        full = state_dict["state"]
        if full:
            shard = {k: torch.zeros_like(self.shard.data) for k in ("exp_avg", "exp_avg_sq")}
            for i, ps, ss in self._overlaps():
                for k in shard:
                    shard[k][ss] = full[i][k].reshape(-1)[ps]
            step = next(iter(full.values()))["step"]
            inner = {0: {"step": torch.as_tensor(step, dtype=torch.float32).clone(), **shard}}
        self.optim.load_state_dict({"state": inner, "param_groups": [{**hyper, "params": [0]}]})


def _torch_zero_class() -> type | None:
    """torch's ZeroRedundancyOptimizer when torch.distributed.optim is loaded: imported only where one is built
    (`build_zero1_optimizer`), since the module pulls in FSDP and DTensor (~1 s of import in every training
    process, for a strategy most runs do not use); an optimizer of that class cannot exist before."""
    module = sys.modules.get("torch.distributed.optim")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def is_zero1(optimizer) -> bool:
    torch_zero = _torch_zero_class()
    return isinstance(optimizer, EvenShardedAdamW) or (torch_zero is not None and isinstance(optimizer, torch_zero))


def full_optimizer_state(optimizer) -> dict[str, Any] | None:
    """The whole optimizer state in plain-AdamW layout on rank 0 (None elsewhere).

    Collective for ZeRO-1 (every rank must call it); a plain optimizer just returns its state dict.
    """
    if isinstance(optimizer, EvenShardedAdamW):
        return optimizer.consolidated_state_dict(to=0)
    if not is_zero1(optimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    if rank() != 0:
        return None
    sd = optimizer.state_dict()
    optimizer._all_state_dicts = []  # drop the consolidated copy: it is a full optimizer state's worth of memory
    return sd
