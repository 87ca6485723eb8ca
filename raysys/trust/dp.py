"""DP-SGD (Abadi et al., CCS 2016) for a raysys model through Opacus (`pip install raysys[dp]`).

Opacus computes each row's gradient by hooks (`GradSampleModule`), its optimizer clips every row's gradient to
`max_grad_norm` and adds N(0, (noise_multiplier * max_grad_norm)^2) to their sum; batches are Poisson samples
(each row with probability q), which the accounting assumes. Epsilon at `delta` comes from Opacus's RDP
accountant (Mironov, CSF 2017; the subsampled Gaussian bound of Mironov, Talwar and Zhang, 2019).

Strategies: DP-SGD needs every row's own gradient before any reduction, so it works for one process and for
data parallel (Opacus's `DifferentiallyPrivateDistributedDataParallel`), not for strategies that shard or split
parameters or batches (ZeRO, FSDP, pipeline, tensor): `check_strategy` refuses those.

Two ways in: `train_dp` trains a model in one call (benchmarks/trust.py); the pieces `private_training`,
`poisson_rows` and `dp_accounting` let a loop of its own (the Ray Train teacher loop, a Tune student trial) run
DP-SGD step by step, with the accounting recomputed from the step count (so a resumed run reports the same
epsilon as an uninterrupted one). `composed_epsilon` composes several runs on the same rows (a sweep's trials and
the teacher whose logits they learn from) in RDP, which is tighter than adding their epsilons.

What epsilon covers: the weights, given the preprocessing (its means, deviations and fill values are fitted on the
training rows without noise, as are the per-epoch training losses reported). The Poisson draws and the noise come
from the run's seeded generators, so runs are reproducible and resumable; the guarantee assumes the seed is kept
secret like the data.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.config.governance import DPConfig

DP_STRATEGIES = ("single", "ddp")


def check_strategy(strategy: str, field: str = "train.strategy") -> None:
    """ValueError unless DP-SGD can run under `strategy`."""
    if strategy not in DP_STRATEGIES:
        raise ValueError(f"{field}: DP-SGD (dp) needs each row's own gradient, so it supports single-process and "
                         f"data-parallel training only ({', '.join(DP_STRATEGIES)}), not {strategy!r}, which shards "
                         "or splits the parameters or the batch; set the strategy to ddp or remove dp")


def _opacus():
    try:
        import opacus
        from opacus.grad_sample import register_grad_sampler
    except ImportError as e:
        raise ValueError("dp: DP-SGD needs Opacus: pip install 'raysys[dp]' (opacus; it keeps the pinned torch)") \
            from e
    from raysys.models.mlp import CategoricalEmbeddings

    if CategoricalEmbeddings not in opacus.GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(CategoricalEmbeddings)(_embedding_grad_sample)
    return opacus


def _embedding_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-row gradient of the one shared embedding table (raysys.models.mlp.CategoricalEmbeddings): row b's
    output gradient, (features, dim), added into the table rows its categories index (the same rule Opacus's
    nn.Embedding sampler applies, with the per-feature offsets)."""
    idx = activations[0] + layer.offsets
    b, n = idx.shape
    g = backprops.reshape(b, n, layer.embedding_dim)
    out = torch.zeros(b, layer.weight.shape[0], layer.embedding_dim, dtype=g.dtype, device=g.device)
    out.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, layer.embedding_dim), g)
    return {layer.weight: out}


def _offsets_as_attributes(model: nn.Module, back: bool = False) -> None:
    """Opacus refuses a trainable module holding buffers (a buffer could carry private statistics, as
    BatchNorm's do). The embedding table's `offsets` is a constant derived from the spec (non-persistent, not in
    state dicts): it becomes a plain attribute while Opacus wraps the model, and a buffer again after."""
    from raysys.models.mlp import CategoricalEmbeddings

    for m in model.modules():
        if isinstance(m, CategoricalEmbeddings):
            if back:
                off = m.__dict__.pop("offsets")
                m.register_buffer("offsets", off, persistent=False)
            else:
                off = m._buffers.pop("offsets")
                m.__dict__["offsets"] = off


def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPConfig, *,
                     expected_batch_size: float, distributed: bool = False):
    """(what runs the batches: `model` under Opacus's per-sample gradient hooks, the optimizer that steps it with
    DP-SGD). Each `step()` clips every row's gradient to `dp.max_grad_norm`, adds Gaussian noise of std
    `noise_multiplier * max_grad_norm` to their sum and divides by `expected_batch_size` (this process's expected
    rows per step; its loss must be a mean over its rows). `distributed`: data parallel over the default process
    group (Opacus's DPDDP: weights broadcast from rank 0; its optimizer adds the noise on rank 0 only and
    all-reduces the sums, so the global step equals one process's on the union of the batches). `optimizer` must be
    built over `model`'s parameters; step-pre hooks belong on it (Opacus's optimizer runs none of its own)."""
    opacus = _opacus()
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    # torch warns on every first backward that the hooks fire for module outputs only: the inputs are data, which
    # never require gradients here, so that is always the case and says nothing
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                              "respect to module outputs")
    _offsets_as_attributes(model)  # Opacus checks for buffers when it wraps, only then
    try:
        runner = opacus.GradSampleModule(DPDDP(model) if distributed else model, batch_first=True,
                                         loss_reduction="mean")
    finally:
        _offsets_as_attributes(model, back=True)
    cls = DistributedDPOptimizer if distributed else DPOptimizer
    return runner, cls(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                       expected_batch_size=expected_batch_size, loss_reduction="mean")


def poisson_rows(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The indices of one DP-SGD step's batch: each of `n` rows independently with probability `rate` (Poisson
    subsampling, what the accounting assumes; a batch may be empty and still takes a noise-only step)."""
    return np.flatnonzero(rng.random(n) < rate)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Poisson steps that make one expected pass over `rows` at an expected batch of `batch_size`."""
    return max(1, round(rows / batch_size))


def composed_epsilon(parts: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of several DP-SGD runs on the same rows, each (noise_multiplier, sample_rate, steps),
    composed in RDP (Opacus's accountant)."""
    from opacus.accountants import RDPAccountant

    _opacus()
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in parts if n]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0


def dp_accounting(dp: DPConfig, *, sample_rate: float, steps: int, epochs: int) -> dict[str, Any]:
    """Epsilon at `dp.delta` after `steps` DP-SGD steps at `sample_rate` (Opacus's RDP accountant), with what it
    was computed from: what the model card and `privacy_of` read."""
    return {"dp_sgd": True, "epsilon": composed_epsilon([(dp.noise_multiplier, sample_rate, steps)], dp.delta),
            "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "steps": steps,
            "sample_rate": sample_rate, "epochs": epochs, "accountant": "rdp (opacus)"}


def train_dp(model: nn.Module, x_num, x_cat, y, dp: DPConfig, *, epochs: int, batch_size: int, lr: float,
             seed: int = 0, soft_targets=None, temperature: float = 2.0, alpha: float = 0.5
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` with DP-SGD (Adam on the privatized gradients, Poisson batches of expected size
    `batch_size`) and return (the plain trained model, `dp_accounting`). With `soft_targets` (the teacher's logits
    per row) the loss is the distillation loss alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, per
    row, so clipping bounds each row's whole contribution. The teacher's logits are a function of the training
    rows: the guarantee covers the student's use of them, not the teacher's own training."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arrays = [torch.as_tensor(np.asarray(a)) for a in (x_num, x_cat, y)]
    soft = torch.as_tensor(np.asarray(soft_targets)).float() if soft_targets is not None else None
    n = len(arrays[2])
    batch_size = min(batch_size, n)
    rate, steps = batch_size / n, steps_per_epoch(n, batch_size)
    model.train()
    runner, opt = private_training(model, torch.optim.Adam(model.parameters(), lr=lr), dp,
                                   expected_batch_size=batch_size)
    try:
        for _ in range(epochs * steps):
            idx = torch.from_numpy(poisson_rows(n, rate, rng))
            opt.zero_grad()
            logits = runner(arrays[0][idx].float(), arrays[1][idx].long())
            loss = F.cross_entropy(logits, arrays[2][idx].long())
            if soft is not None:
                t = temperature
                kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(soft[idx] / t, 1), log_target=True,
                              reduction="batchmean") * t * t
                loss = alpha * kd + (1 - alpha) * loss
            loss.backward()
            opt.step()
    finally:
        runner._close()  # Opacus's hooks stay on the modules otherwise: later backward passes would fail
    model.eval()
    return model, dp_accounting(dp, sample_rate=rate, steps=epochs * steps, epochs=epochs)
