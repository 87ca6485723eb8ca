"""Tier 2: 2-rank gloo. DDP via `apply_ddp`, each rank on half of every batch, ends with the same weights
as one process training on the full batches (the loop's own `train_step` on both sides)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from serve.ingress import free_port
from helpers.dist import exit_rank, spawn_ranks, toy_batches
from safetensors.torch import load_file, save_file

from raysys.models import build_model
from raysys.parallel import apply_ddp, unwrap
from raysys.train.checkpoint import model_state_dict
from raysys.train.steps import train_step

pytestmark = pytest.mark.dist

SPEC = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [32, 16],
        "embed_dim": 4, "dropout": 0.0}
WORLD, STEPS, BATCH = 2, 8, 64


def _data():
    return toy_batches(STEPS, BATCH)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # different seeds per rank on purpose: DDP must broadcast rank 0's initial weights
        torch.manual_seed(0 if rank == 0 else 99)
        model = build_model(SPEC)
        opt = _optimizer(model)
        ddp = apply_ddp(model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and unwrap(ddp) is model
        x_num, x_cat, y = _data()
        half = BATCH // WORLD
        sl = slice(rank * half, (rank + 1) * half)
        losses = [train_step(ddp, opt, x_num[s, sl], x_cat[s, sl], y[s, sl]) for s in range(STEPS)]
        sd = model_state_dict(ddp)
        sd["__losses__"] = torch.tensor(losses, dtype=torch.float64)
        save_file(sd, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
    exit_rank()  # not reached when the work failed: the exception reaches mp.spawn


@pytest.mark.timeout(120)
def test_ddp_matches_single_process(tmp_path):
    spawn_ranks(_rank_main, (free_port(), str(tmp_path)), WORLD, 90, "2-rank gloo DDP run")

    torch.manual_seed(0)
    ref = build_model(SPEC)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = _optimizer(ref)
    x_num, x_cat, y = _data()
    ref_losses = [train_step(ref, opt, x_num[s], x_cat[s], y[s]) for s in range(STEPS)]

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    # the ranks stay in lockstep: identical weights (allreduced grads, same AdamW update)
    for k in ref.state_dict():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    # and equal to single-process training on the full batch, up to float summation order
    for k, v in ref.state_dict().items():
        assert "module." not in k
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the mean of the two half-batch losses is the full-batch loss
    mean_loss = (ranks[0]["__losses__"] + ranks[1]["__losses__"]) / 2
    torch.testing.assert_close(mean_loss, torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert not torch.equal(ref.state_dict()["head.weight"], init["head.weight"])  # training moved the weights
