"""Tier 2: 2-rank gloo DP-SGD (`raysys.trust.dp.private_training(distributed=True)`, what the teacher loop runs
under `train.dp`). Each rank clips its own rows' gradients and rank 0 alone adds the noise: with the noise made
negligible the ranks end where one process stepping on the union of their batches ends; with real noise the
ranks still hold identical weights (the noise is added once and all-reduced, not drawn per rank)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from helpers.dist import exit_rank, spawn_ranks, toy_batches
from safetensors.torch import load_file, save_file
from serve.ingress import free_port

from raysys.config import DPConfig
from raysys.models import build_model
from raysys.train.steps import train_step

pytest.importorskip("opacus")
pytestmark = pytest.mark.dist

SPEC = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [16],
        "embed_dim": 4, "dropout": 0.0}
WORLD, STEPS, BATCH = 2, 6, 48
# rows of each step's batch per rank: uneven, as Poisson batches are, and one rank empty at one step
CUTS = [24, 10, 30, 0, 48, 17]
QUIET, NOISY = DPConfig(noise_multiplier=1e-7, max_grad_norm=0.3), DPConfig(noise_multiplier=1.0, max_grad_norm=0.3)


def _train(dp: DPConfig, distributed: bool, rank: int, seed: int) -> tuple[dict, list[float]]:
    from raysys.trust.dp import private_training

    torch.manual_seed(seed)
    model = build_model(SPEC)
    # plain SGD: its step scales with the gradient, so a wrong divisor (expected batch) shows
    runner, opt = private_training(model, torch.optim.SGD(model.parameters(), lr=0.5), dp,
                                   expected_batch_size=BATCH / (WORLD if distributed else 1), distributed=distributed)
    x_num, x_cat, y = toy_batches(STEPS, BATCH)
    losses = []
    for s in range(STEPS):
        rows = (slice(0, CUTS[s]) if rank == 0 else slice(CUTS[s], BATCH)) if distributed else slice(0, BATCH)
        losses.append(train_step(runner, opt, x_num[s, rows], x_cat[s, rows], y[s, rows]))
    runner._close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # different init seeds per rank on purpose: DPDDP must broadcast rank 0's weights
        quiet, _ = _train(QUIET, True, rank, seed=0 if rank == 0 else 99)
        noisy, _ = _train(NOISY, True, rank, seed=0 if rank == 0 else 99)
        save_file({**{f"quiet.{k}": v for k, v in quiet.items()}, **{f"noisy.{k}": v for k, v in noisy.items()}},
                  f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.timeout(120)
def test_data_parallel_dp_sgd_is_one_step_on_the_union_with_the_noise_added_once(tmp_path):
    spawn_ranks(_rank_main, (free_port(), str(tmp_path)), WORLD, 90, "2-rank gloo DP-SGD run")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # lockstep, also with real noise
    ref, _ = _train(QUIET, False, 0, seed=0)
    torch.manual_seed(0)
    init = build_model(SPEC).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0][f"quiet.{k}"], v, rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(ref["head.weight"], init["head.weight"])  # training moved the weights
    # the noise is real: the noisy run ends far from the quiet one
    assert (ranks[0]["noisy.head.weight"] - ranks[0]["quiet.head.weight"]).abs().max() > 1e-2
