"""Pipeline parallelism with `torch.distributed.pipelining` (manual stage split, GPipe or 1F1B).

The model is cut into contiguous *units*: [tokenizer, blocks.0, ..., blocks.N-1, head] for the
transformer layout (FTTransformer), [embeddings, body groups (a Linear and the GELU/Dropout after it),
head] for the MLP layout (TabularMLP). `balance_stages` splits the units into `pp` contiguous runs that
minimise the largest stage's parameter count; the embedding/tokenizer is always on the first stage and
the head on the last. A stage module holds the model's own submodules under their own names, so its
`state_dict()` keys are the full model's keys (a checkpoint of all stages is the model's state dict, and
DCP can reshard it to any other pp degree).

The first stage's forward takes the model's two inputs (x_num, x_cat); every later stage takes the
activation tensor its predecessor sent. Microbatches split the batch on dim 0; the loss is the mean
over each microbatch and the schedule divides gradients by the number of microbatches
(`scale_grads=True`), so a step equals one single-process step on the whole batch. That needs equal
microbatches: the batch size must be a multiple of `num_microbatches` (drop or pad a last partial batch).

Data contract: every rank of one pipeline (one pp group) passes the *same* batch to `step`: the first
stage reads x_num/x_cat, the last stage reads y, the others only the batch size. When only the first
stage holds data, `broadcast_batch` shares it within the pp group. Data-parallel replicas (dp) get
different batches; the dp wrapper (DDP or FSDP, `dp_wrap`) goes around each stage module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import _sorted_batch_p2p, _wait_batch_p2p

from raysys.parallel.tensor import is_mlp_layout, is_transformer_layout

logger = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def compute_order(schedule: str, num_microbatches: int, num_stages: int, stage_index: int) -> list[tuple[str, int]]:
    """The order in which one stage runs its forwards ("F", i) and backwards ("B", i): torch's GPipe
    (all forwards, then all backwards) or 1F1B (num_stages - stage_index warm-up forwards, then one
    backward and one forward alternately, then the remaining backwards)."""
    n = num_microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(n)] + [("B", i) for i in range(n)]
    warmup = min(n, num_stages - stage_index)
    order = [("F", i) for i in range(warmup)]
    fwd = warmup
    for bwd in range(n):
        order.append(("B", bwd))
        if fwd < n:
            order.append(("F", fwd))
            fwd += 1
    return order


class _PrefetchMixin:
    """GPipe / 1F1B with every receive of a step posted before the stage computes anything.

    torch's schedules post the receive of microbatch i+1 only after computing microbatch i, and a gloo
    send completes only once its receive is posted, so on CPU each activation (and gradient) transfer
    sat on the critical path: at m=8 that was 1.5-2.5x the theoretical bubble. Each microbatch has its
    own receive buffer in `PipelineStage`, so posting them all up front is safe; the stage then waits
    only for data that has not arrived yet. Sends are asynchronous and awaited at the end of the step.
    The compute order is torch's (`compute_order`), so results are identical to torch's schedules.

    Used on gloo only: NCCL runs a peer pair's sends and receives in one stream, where a receive posted
    early would block a send queued behind it (1F1B would deadlock).
    """

    _schedule_name = ""

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None,
                           return_outputs=True, loss_kwargs=None):
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        self._initialize_stage(arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None,
                               loss_kwargs)
        stage, n = self._stage, self._n_microbatches
        fwd_recvs = [_sorted_batch_p2p(stage.get_fwd_recv_ops(i), desc="fwd_recv") for i in range(n)]
        bwd_recvs = ([_sorted_batch_p2p(stage.get_bwd_recv_ops(i), desc="bwd_recv") for i in range(n)]
                     if self._has_backward else [])
        sends: list = []
        for kind, i in compute_order(self._schedule_name, n, self._num_stages, stage.stage_index):
            if kind == "F":
                for work in fwd_recvs[i].values():
                    _wait_batch_p2p(work)
                output = stage.forward_one_chunk(i, arg_mbs[i], kwarg_mbs[i], save_forward_output=return_outputs)
                sends.extend(_sorted_batch_p2p(stage.get_fwd_send_ops(i), desc="fwd_send").values())
                self._maybe_compute_loss(stage, output, target_mbs, i, loss_kwargs)
            elif self._has_backward:
                for work in bwd_recvs[i].values():
                    _wait_batch_p2p(work)
                stage.backward_one_chunk(i, loss=self._maybe_get_loss(stage, i), last_backward=i == n - 1)
                sends.extend(_sorted_batch_p2p(stage.get_bwd_send_ops(i), desc="bwd_send").values())
        for work in sends:
            _wait_batch_p2p(work)
        self._update_losses(stage, losses)
        if self._has_backward:
            stage.perform_reduce_grad(n if self.scale_grads else 1)


class PrefetchGPipe(_PrefetchMixin, ScheduleGPipe):
    """`ScheduleGPipe` with receives posted up front (see `_PrefetchMixin`)."""

    _schedule_name = "gpipe"


class Prefetch1F1B(_PrefetchMixin, Schedule1F1B):
    """`Schedule1F1B` with receives posted up front (see `_PrefetchMixin`)."""

    _schedule_name = "1f1b"


PREFETCH_SCHEDULES = {"gpipe": PrefetchGPipe, "1f1b": Prefetch1F1B}


@dataclass(frozen=True)
class Unit:
    """A piece of the model that is never cut: {FQN: module} (FQNs are the model's own), and its size."""

    name: str
    modules: dict[str, nn.Module]
    num_params: int


def _count(modules: dict[str, nn.Module]) -> int:
    # DTensor parameters (after tensor parallel) report their global numel: the balance is the same
    return sum(p.numel() for m in modules.values() for p in m.parameters())


def pipeline_units(model: nn.Module) -> list[Unit]:
    """The model's units in forward order (ValueError for a model whose layout has no pipeline split)."""
    if is_transformer_layout(model):
        pieces = [("tokenizer", {"tokenizer": model.tokenizer})]
        pieces += [(f"blocks.{i}", {f"blocks.{i}": b}) for i, b in enumerate(model.blocks)]
        pieces.append(("head", {"head": model.head}))
    elif is_mlp_layout(model):
        pieces = [("embeddings", {"embeddings": model.embeddings})]
        group: dict[str, nn.Module] = {}
        for i, m in enumerate(model.body):
            if isinstance(m, nn.Linear) and group:
                pieces.append((next(iter(group)), group))
                group = {}
            group[f"body.{i}"] = m
        if group:
            pieces.append((next(iter(group)), group))
        pieces.append(("head", {"head": model.head}))
    else:
        raise ValueError(f"pipeline: no stage split for {type(model).__name__}; supported layouts: "
                         f"tokenizer/blocks/head (ft_transformer) and embeddings/body/head (mlp)")
    return [Unit(name, mods, _count(mods)) for name, mods in pieces]


def balance_stages(sizes: list[int], num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, one non-empty range per stage, minimising the largest sum.

    Exact dynamic programme over split points (O(stages * units^2), units are blocks: small); ties go to
    the split whose earlier stages are lighter, since the first stage also runs the input pipeline.
    """
    n = len(sizes)
    if not 1 <= num_stages <= n:
        raise ValueError(f"pipeline: cannot split {n} units into {num_stages} stages; lower train.parallel.pp "
                         f"or use a deeper model (model.num_blocks)")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: the smallest max-stage-size splitting units[:j] into k stages; cut[k][j]: where stage k starts
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost <= best[k][j]:  # `<=`: prefer the latest cut, i.e. a lighter last stage of the prefix
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def stage_sizes(model: nn.Module, num_stages: int) -> list[int]:
    """Parameters of each of `num_stages` pipeline stages, split as `build_pipeline` splits them (works on
    a meta-device model: nothing is allocated)."""
    sizes = [u.num_params for u in pipeline_units(model)]
    return [sum(sizes[i:j]) for i, j in balance_stages(sizes, num_stages)]


class PipelineStageModule(nn.Module):
    """One stage of a model: its units' modules under the model's own names (state_dict keys included).

    forward(x_num, x_cat) on the first stage, forward(h) on the others; returns the activation for the
    next stage, or the logits on the last.
    """

    def __init__(self, layout: str, units: list[Unit], stage_index: int, num_stages: int):
        super().__init__()
        self.layout, self.stage_index, self.num_stages = layout, stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.unit_names = [u.name for u in units]
        middle = "blocks" if layout == "transformer" else "body"
        # ModuleDict keyed by the model's own indices, so `blocks.3.attn.q.weight` keeps its name
        setattr(self, middle, nn.ModuleDict())
        for unit in units:
            for fqn, module in unit.modules.items():
                if "." in fqn:
                    container, key = fqn.split(".", 1)
                    getattr(self, container)[key] = module
                else:
                    self.add_module(fqn, module)
        self._middle = middle

    def layers(self) -> Iterator[nn.Module]:
        """The stage's blocks (transformer) or body modules (MLP), in forward order."""
        return iter(getattr(self, self._middle).values())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x_num, x_cat = inputs
            if self.layout == "transformer":
                h = self.tokenizer(x_num, x_cat)
            else:  # TabularMLP.forward's input: numeric features then one embedding per categorical feature
                h = torch.cat([x_num] + [emb(x_cat[:, j]) for j, emb in enumerate(self.embeddings)], dim=1)
        else:
            (h,) = inputs
        for layer in self.layers():
            h = layer(h)
        # what crosses to the next stage is fp32 whatever the stage computed in (bf16 autocast): its receive buffers
        # are sized from fp32 metadata, and NCCL does not check that both ends agree
        return self.head(h) if self.is_last else h.float()


def split_model(model: nn.Module, num_stages: int, stage_index: int) -> PipelineStageModule:
    """The `stage_index`-th of `num_stages` parameter-balanced stages of `model` (shares its modules)."""
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"pipeline: stage_index {stage_index} is not in [0, {num_stages})")
    return _split_all(model, num_stages)[stage_index]


def _split_all(model: nn.Module, num_stages: int) -> list[PipelineStageModule]:
    units = pipeline_units(model)
    bounds = balance_stages([u.num_params for u in units], num_stages)
    layout = "transformer" if is_transformer_layout(model) else "mlp"
    return [PipelineStageModule(layout, units[a:b], i, num_stages) for i, (a, b) in enumerate(bounds)]


def example_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-row (x_num, x_cat) of zeros with the model's feature counts."""
    if is_transformer_layout(model):
        n_num, n_cat = model.tokenizer.num_numeric, model.tokenizer.num_categorical
    else:
        n_cat = len(model.embeddings)
        first = next((m for m in model.body if isinstance(m, nn.Linear)), model.head)
        n_num = first.in_features - sum(e.embedding_dim for e in model.embeddings)
    return torch.zeros(1, n_num), torch.zeros(1, n_cat, dtype=torch.int64)


# (per-row shape, dtype) of each stage's inputs and of its output
_Meta = tuple[tuple[int, ...], torch.dtype]


@torch.no_grad()
def _stage_metas(stages: list[PipelineStageModule], example: tuple[torch.Tensor, ...]
                 ) -> list[tuple[list[_Meta], _Meta]]:
    """Run a one-row example through every stage (all are local at build time) to learn the activation
    shapes. The stages get them as static metadata: torch's dynamic inference would run an extra
    forward/backward through a DDP-wrapped stage, which breaks DDP's bucket rebuild on the next step."""
    metas, h = [], tuple(example)
    for stage in stages:
        was_training = stage.training
        stage.eval()  # no dropout: consumes no random numbers, so seeding stays aligned with the reference
        out = stage(*h)
        stage.train(was_training)
        metas.append(([(tuple(t.shape[1:]), t.dtype) for t in h], (tuple(out.shape[1:]), out.dtype)))
        h = (out,)
    return metas


def _mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


class PipelineRunner:
    """This rank's stage of a pipeline, and the schedules that run it.

    `step` / `train_step` on every rank of the pp group with the same batch; the last stage gets the
    mean loss back (None on the others). A `PipelineStage` + schedule is built per distinct batch size
    (torch's stages fix their p2p buffer shapes on first use), which every pp rank sees in the same order.
    """

    def __init__(self, stage_module: PipelineStageModule, module: nn.Module, pp_mesh: DeviceMesh, *,
                 num_microbatches: int, schedule: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 metas: tuple[list[_Meta], _Meta]):
        self._in_metas, self._out_meta = metas
        self.stage_module = stage_module  # unwrapped: parameters, state_dict
        self.module = module  # what the stage runs: stage_module itself, or its DDP/FSDP wrapper
        self.pp_mesh = pp_mesh
        self.group = pp_mesh.get_group()
        self.stage_index, self.num_stages = stage_module.stage_index, stage_module.num_stages
        self.is_first, self.is_last = stage_module.is_first, stage_module.is_last
        self.num_microbatches = num_microbatches
        self.schedule_name = schedule
        self.loss_fn = loss_fn
        self.device = (torch.device("cuda", torch.cuda.current_device()) if pp_mesh.device_type == "cuda"
                       else torch.device(pp_mesh.device_type))
        self._schedules: dict[tuple[str, int], object] = {}

    # -- schedules ---------------------------------------------------------------------------------
    def _stage(self, module: nn.Module, microbatch: int) -> PipelineStage:
        def example(meta: _Meta, grad: bool) -> torch.Tensor:
            t = torch.empty((microbatch, *meta[0]), dtype=meta[1], device=self.device)
            return t.requires_grad_(grad and t.is_floating_point())

        # requires_grad on the float activations between stages: the static metadata decides from it
        # whether gradients are sent back across a boundary (the first stage's inputs are data: no grad)
        return PipelineStage(module, self.stage_index, self.num_stages, self.device,
                             input_args=tuple(example(m, not self.is_first) for m in self._in_metas),
                             output_args=example(self._out_meta, True), group=self.group)

    def _schedule(self, mode: str, batch: int):
        key = (mode, batch)
        if key not in self._schedules:
            if mode == "train":
                stage = self._stage(self.module, batch // self.num_microbatches)
                table = PREFETCH_SCHEDULES if dist.get_backend(self.group) == "gloo" else SCHEDULES
                sched = table[self.schedule_name](stage, self.num_microbatches, loss_fn=self.loss_fn,
                                                  scale_grads=True)
            else:
                # forward only, on the unwrapped module (no DDP hooks); fill-drain is all a forward needs
                m = self.num_microbatches if batch % self.num_microbatches == 0 else 1
                sched = ScheduleGPipe(self._stage(self.stage_module, batch // m), m)
            self._schedules[key] = sched
        return self._schedules[key]

    @staticmethod
    def _batch_size(*tensors: torch.Tensor | None) -> int:
        for t in tensors:
            if t is not None:
                return int(t.shape[0])
        raise ValueError("pipeline: pass the batch (x_num, x_cat, y) on every pp rank; all were None")

    # -- training ----------------------------------------------------------------------------------
    def step(self, x_num: torch.Tensor | None, x_cat: torch.Tensor | None, y: torch.Tensor | None, *,
             batch_size: int | None = None) -> float | None:
        """Forward and backward of one batch through the pipeline; gradients accumulate in the stage's
        parameters (zero them before, step the optimizer after). Returns the batch's mean loss on the
        last stage, None elsewhere. Only the first stage reads x_num/x_cat and only the last reads y; a
        middle stage may pass Nones and `batch_size`."""
        batch = batch_size if batch_size is not None else self._batch_size(x_num, y, x_cat)
        if batch % self.num_microbatches:
            raise ValueError(f"pipeline: a batch of {batch} rows does not split into train.num_microbatches "
                             f"({self.num_microbatches}) equal microbatches; make the per-replica batch size a "
                             f"multiple of it (drop the last partial batch)")
        self.module.train()
        sched = self._schedule("train", batch)
        args = (x_num, x_cat) if self.is_first else ()
        if self.is_last:
            losses: list[torch.Tensor] = []
            sched.step(*args, target=y, losses=losses, return_outputs=False)
            return float(torch.stack([loss.detach() for loss in losses]).mean())
        sched.step(*args, return_outputs=False)
        return None

    def train_step(self, optimizer: torch.optim.Optimizer, x_num: torch.Tensor | None, x_cat: torch.Tensor | None,
                   y: torch.Tensor | None, *, batch_size: int | None = None) -> float | None:
        """`raysys.train.loop.train_step` for a pipeline stage: zero grads, `step`, `optimizer.step()`."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.step(x_num, x_cat, y, batch_size=batch_size)
        optimizer.step()
        return loss

    @torch.no_grad()
    def eval_logits(self, x_num: torch.Tensor | None, x_cat: torch.Tensor | None,
                    batch_size: int | None = None) -> torch.Tensor | None:
        """Logits of a batch (eval mode, no grad) on the last stage, None elsewhere. Middle and last
        stages may pass None inputs and the `batch_size` instead."""
        batch = batch_size if batch_size is not None else self._batch_size(x_num, x_cat)
        self.stage_module.eval()
        try:
            sched = self._schedule("eval", batch)
            out = sched.eval(*((x_num, x_cat) if self.is_first else ()))
        finally:
            self.stage_module.train()
        return out if self.is_last else None

    # -- data ----------------------------------------------------------------------------------------
    def broadcast_batch(self, x_num: torch.Tensor | None, x_cat: torch.Tensor | None, y: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first stage's batch on every rank of this pp group (others pass anything, e.g. None)."""
        src = dist.get_global_rank(self.group, 0)
        shapes = torch.zeros(3, dtype=torch.int64, device=self.device)
        if self.is_first:
            shapes = torch.tensor([x_num.shape[0], x_num.shape[1], x_cat.shape[1]], dtype=torch.int64,
                                  device=self.device)
        dist.broadcast(shapes, src=src, group=self.group)
        b, n_num, n_cat = shapes.tolist()
        if not self.is_first:
            x_num = torch.empty(b, n_num, dtype=torch.float32, device=self.device)
            x_cat = torch.empty(b, n_cat, dtype=torch.int64, device=self.device)
            y = torch.empty(b, dtype=torch.int64, device=self.device)
        for t in (x_num, x_cat, y):
            dist.broadcast(t, src=src, group=self.group)
        return x_num, x_cat, y

    # -- state ---------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """This stage's parameters (what the optimizer of this rank steps)."""
        return self.stage_module.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's tensors under the full model's keys (disjoint across stages)."""
        return self.stage_module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load this stage's keys from a full-model (or this stage's) state dict; extra keys are ignored,
        missing local keys are an error when `strict`."""
        own = self.stage_module.state_dict().keys()
        missing = [k for k in own if k not in state_dict]
        if strict and missing:
            raise KeyError(f"pipeline stage {self.stage_index}: state dict lacks {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        self.stage_module.load_state_dict({k: state_dict[k] for k in own if k in state_dict}, strict=strict)


def build_pipeline(model: nn.Module, pp_mesh: DeviceMesh, *, num_microbatches: int, schedule: str = "1f1b",
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   dp_wrap: Callable[[nn.Module], nn.Module] | None = None) -> PipelineRunner:
    """Split `model` over the 1-D `pp_mesh` and return this rank's `PipelineRunner`.

    `model` is the full single-device model, identical on every rank (same seed or loaded weights;
    tensor parallel already applied if any); this rank keeps the modules of stage `pp_mesh.get_local_rank()`.
    `loss_fn(logits, y)` must be a mean over the microbatch (default cross-entropy). `dp_wrap`, when
    given, wraps the stage module for data parallelism across replicas (e.g. DDP over the dp group, or
    `fully_shard` on the dp mesh); the schedule then syncs gradients once per step, after the last
    microbatch's backward. Build the optimizer over `runner.parameters()`.
    """
    if pp_mesh.ndim != 1:
        raise ValueError(f"build_pipeline: pass the 1-D pp sub-mesh (mesh['pp']), got a {pp_mesh.ndim}-D mesh")
    if schedule not in SCHEDULES:
        raise ValueError(f"train.pipeline_schedule: unknown {schedule!r}; choose one of {list(SCHEDULES)}")
    pp = pp_mesh.size()
    if num_microbatches < 1:
        raise ValueError(f"train.num_microbatches must be at least 1, got {num_microbatches}")
    if schedule == "1f1b" and num_microbatches < pp:
        raise ValueError(f"train.num_microbatches ({num_microbatches}) must be at least train.parallel.pp ({pp}) "
                         f"for the 1f1b schedule; raise it or use schedule 'gpipe'")
    stages = _split_all(model, pp)
    device = next(model.parameters()).device  # a GPU rank's model is on its device already
    metas = _stage_metas(stages, tuple(t.to(device) for t in example_inputs(model)))
    stage_index = pp_mesh.get_local_rank()
    stage_module = stages[stage_index]
    module = dp_wrap(stage_module) if dp_wrap is not None else stage_module
    runner = PipelineRunner(stage_module, module, pp_mesh, num_microbatches=num_microbatches, schedule=schedule,
                            loss_fn=loss_fn or _mean_cross_entropy, metas=metas[stage_index])
    if dist.get_rank() == 0:
        sizes = [sum(p.numel() for p in s.parameters()) for s in stages]
        layout = ", ".join(f"[{s.unit_names[0]}..{s.unit_names[-1]}]" for s in stages)
        logger.info("parallel: pipeline applied over %d stages (%s, %d microbatches); stages %s, params %s",
                    pp, schedule, num_microbatches, layout, sizes)
    return runner


def apply_pipeline_parallel(model: nn.Module, mesh: DeviceMesh, cfg=None, *,
                            dp_wrap: Callable[[nn.Module], nn.Module] | None = None) -> PipelineRunner:
    """The `apply_<strategy>(model, mesh, cfg)` form of `build_pipeline`.

    `mesh` is the named mesh (its "pp" dimension is used) or a 1-D pp mesh; `cfg` is anything with
    `option(key, default)` (`raysys.parallel.StrategyConfig`): "num_microbatches" (default: pp, the fewest
    1F1B accepts) and "pipeline_schedule" ("1f1b" or "gpipe", default "1f1b").
    """
    names = mesh.mesh_dim_names or ()
    pp_mesh = mesh["pp"] if "pp" in names and mesh.ndim > 1 else mesh
    option = getattr(cfg, "option", None) or (lambda key, default=None: default)
    return build_pipeline(model, pp_mesh, num_microbatches=int(option("num_microbatches", pp_mesh.size())),
                          schedule=str(option("pipeline_schedule", "1f1b")), dp_wrap=dp_wrap)


__all__ = ["PREFETCH_SCHEDULES", "SCHEDULES", "compute_order", "PipelineRunner", "apply_pipeline_parallel", "PipelineStageModule", "Unit", "balance_stages", "build_pipeline",
           "example_inputs", "pipeline_units", "split_model", "stage_sizes"]
