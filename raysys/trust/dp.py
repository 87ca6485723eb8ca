"""DP-SGD (Abadi et al., CCS 2016) for a raysys model through Opacus (`pip install raysys[dp]`), single process.

Opacus's `PrivacyEngine.make_private` wraps the model (per-sample gradients by hooks), the optimizer (clip each
row's gradient to `max_grad_norm`, add N(0, (noise_multiplier * max_grad_norm)^2) to the sum) and the data
loader (Poisson sampling with rate batch_size / rows, which the accounting assumes). Epsilon at `delta` comes from
its RDP accountant (Mironov, CSF 2017; the subsampled Gaussian bound of Mironov, Talwar and Zhang, 2019).

Strategies: DP-SGD needs every row's own gradient before any reduction, so it works for one process and for
data parallel (Opacus's `DifferentiallyPrivateDistributedDataParallel`), not for strategies that shard or split
parameters or batches (ZeRO, FSDP, pipeline, tensor): `check_strategy` refuses those.
"""

from __future__ import annotations

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


class _Rows(torch.utils.data.Dataset):
    def __init__(self, *arrays: np.ndarray):
        self.arrays = [torch.as_tensor(np.asarray(a)) for a in arrays]

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, i: int):
        return tuple(a[i] for a in self.arrays)


def train_dp(model: nn.Module, x_num, x_cat, y, dp: DPConfig, *, epochs: int, batch_size: int, lr: float,
             seed: int = 0, soft_targets=None, temperature: float = 2.0, alpha: float = 0.5
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` with DP-SGD (Adam on the privatized gradients) and return (the plain trained model, the
    accounting: epsilon at delta, noise, clip, steps, sample rate). With `soft_targets` (the teacher's logits per
    row) the loss is the distillation loss alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, per row,
    so clipping bounds each row's whole contribution. The teacher's logits are a function of the training rows:
    the guarantee covers the student's use of them, not the teacher's own training."""
    opacus = _opacus()
    torch.manual_seed(seed)
    arrays = [x_num, x_cat, y] + ([soft_targets] if soft_targets is not None else [])
    loader = torch.utils.data.DataLoader(_Rows(*arrays), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    engine = opacus.PrivacyEngine(accountant="rdp")
    model.train()
    _offsets_as_attributes(model)
    pmodel = None
    try:
        pmodel, popt, ploader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                    noise_multiplier=dp.noise_multiplier,
                                                    max_grad_norm=dp.max_grad_norm, poisson_sampling=True)
        steps = _epochs(pmodel, popt, ploader, epochs, soft_targets is not None, temperature, alpha)
    finally:
        if pmodel is not None:  # Opacus's hooks stay on the modules otherwise: later backward passes would fail
            pmodel._close()
        _offsets_as_attributes(model, back=True)
    model.eval()
    acct = {"dp_sgd": True, "epsilon": float(engine.get_epsilon(dp.delta)), "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "steps": steps,
            "sample_rate": batch_size / len(loader.dataset), "epochs": epochs, "accountant": "rdp (opacus)"}
    return model, acct


def _epochs(pmodel, popt, ploader, epochs: int, distill: bool, t: float, alpha: float) -> int:
    steps = 0
    for _ in range(epochs):
        for batch in ploader:
            # an empty Poisson batch still takes a (noise-only) step: the accounting counts every step
            popt.zero_grad()
            logits = pmodel(batch[0].float(), batch[1].long())
            loss = F.cross_entropy(logits, batch[2].long())
            if distill:
                soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(batch[3].float() / t, 1),
                                log_target=True, reduction="batchmean") * t * t
                loss = alpha * soft + (1 - alpha) * loss
            loss.backward()
            popt.step()
            steps += 1
    return steps
