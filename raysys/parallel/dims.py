"""Parallel degrees and the named `DeviceMesh` every strategy is applied on. No Ray.

`ParallelDims(dp, tp, pp, world_size)` checks that the degrees multiply to the world size and builds one
`DeviceMesh` whose dimensions are named `pp`, `dp`, `tp` (outermost first, as in torchtitan: tensor
parallel groups are adjacent ranks, the chattiest collectives stay closest). Dimensions of degree 1 are
left out, except that a mesh always has at least `dp`. Strategies receive the sub-mesh they work on
(`mesh["dp"]`, `mesh["tp"]`) explicitly as `mesh=`; nothing relies on a global default mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

# the data-parallel flavours; `pipeline` and `tensor` name model parallelism, whose dp dimension (if any)
# is plain DDP
DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3")
MODEL_PARALLEL = ("pipeline", "tensor")
STRATEGIES = DATA_PARALLEL + MODEL_PARALLEL
MESH_DIM_ORDER = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data (`dp`), tensor (`tp`) and pipeline (`pp`) parallelism over `world_size` ranks."""

    dp: int
    tp: int = 1
    pp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"train.parallel.{name}: must be a positive integer, got {v!r}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"train.parallel: dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.dp * self.tp * self.pp} "
                f"but there are {self.world_size} workers (train.num_workers); set the degrees so that "
                f"dp * tp * pp == {self.world_size} (e.g. dp={self.world_size // (self.tp * self.pp) or 1}), "
                f"or leave train.parallel out for pure data parallelism")

    @classmethod
    def for_strategy(cls, strategy: str, world_size: int, *, dp: int | None = None, tp: int | None = None,
                     pp: int | None = None) -> ParallelDims:
        """Degrees from `train.strategy` and the optional `train.parallel` overrides.

        With no overrides: `tensor` puts every rank in one tensor-parallel group, `pipeline` every rank in
        one pipeline, and the data-parallel strategies use dp = world size. Given degrees win; a missing
        one is inferred so that the product is the world size (dp first).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"train.strategy: unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
        if dp is None and tp is None and pp is None:
            if strategy == "tensor":
                return cls(dp=1, tp=world_size, pp=1, world_size=world_size)
            if strategy == "pipeline":
                return cls(dp=1, tp=1, pp=world_size, world_size=world_size)
            return cls(dp=world_size, world_size=world_size)
        tp_, pp_ = tp or 1, pp or 1
        if dp is None:
            if world_size % (tp_ * pp_):
                raise ValueError(f"train.parallel: tp={tp_} x pp={pp_} does not divide the {world_size} workers; "
                                 f"choose degrees whose product divides train.num_workers")
            dp = world_size // (tp_ * pp_)
        return cls(dp=dp, tp=tp_, pp=pp_, world_size=world_size)

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, names) of the mesh: degree-1 dimensions dropped, but always at least `dp`."""
        dims = [(n, getattr(self, n)) for n in MESH_DIM_ORDER if getattr(self, n) > 1 or n == "dp"]
        return tuple(d for _, d in dims), tuple(n for n, _ in dims)

    def build_mesh(self, device_type: str = "cpu"):
        """The named `DeviceMesh` over the initialised default process group ("cpu" or "cuda").

        Returns None without a process group (single-process runs: every strategy is then a no-op).
        """
        if not (dist.is_available() and dist.is_initialized()):
            if self.world_size > 1:
                raise RuntimeError(f"ParallelDims: world_size={self.world_size} but no process group is initialised")
            return None
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"train.parallel: degrees are for {self.world_size} ranks but the process group has "
                             f"{dist.get_world_size()}; set train.num_workers to {self.world_size}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"ParallelDims.build_mesh: device_type must be 'cpu' or 'cuda', got {device_type!r}")
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.mesh_shape()
        return init_device_mesh(device_type, shape, mesh_dim_names=names)


@dataclass(frozen=True)
class StrategyConfig:
    """What `parallelize` and `build_optimizer` need beyond the degrees (a Ray-free slice of `TrainConfig`).

    `options` carries strategy-specific settings (pipeline microbatches and schedule, tensor-parallel
    plans) so that adding one does not change every signature.
    """

    strategy: str = "ddp"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy: unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")

    @property
    def data_parallel(self) -> str:
        """The flavour of the dp dimension: the strategy itself; under `tensor` FSDP2 (zero3), the data
        parallelism that composes with tensor-parallel DTensor shards; under `pipeline` DDP."""
        if self.strategy in DATA_PARALLEL:
            return self.strategy
        return "zero3" if self.strategy == "tensor" else "ddp"

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)
