"""Tier 2: 2-rank gloo, bf16 mixed precision on CPU through the loop's own pieces (`build_parallel_model`,
`train_step` with the rank's `amp`): DDP computes under bf16 autocast, FSDP2 (zero3) under its
`MixedPrecisionPolicy` (bf16 parameters in compute, fp32 gradient reduction), both keep fp32 parameters and
AdamW state, and both train to losses within a bf16 tolerance of the single-process fp32 run. What a GPU run
does with bf16, minus the GPU (train.mixed_precision: bf16 on a CPU rank)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from helpers.dist import exit_rank, spawn_ranks, toy_batches
from safetensors.torch import load_file, save_file
from serve.ingress import free_port

from raysys.models import build_model
from raysys.parallel import unwrap
from raysys.train.steps import train_step

pytestmark = pytest.mark.dist

SPEC = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [32, 16],
        "embed_dim": 4, "dropout": 0.0}
WORLD, STEPS, BATCH = 2, 8, 64


def _worker_config(strategy: str):
    from raysys.config import TrainConfig
    from raysys.data.schema import DatasetSchema, FeatureSpec
    from raysys.train.worker_config import WorkerConfig

    schema = DatasetSchema(features=[*(FeatureSpec(name=f"x{i}", kind="numeric") for i in range(6)),
                                     FeatureSpec(name="c0", kind="categorical", categories=["a", "b", "c", "d"]),
                                     FeatureSpec(name="c1", kind="categorical", categories=["a", "b", "c"])],
                           label="y", classes=["0", "1", "2", "3"])
    train = TrainConfig(strategy=strategy, num_workers=WORLD, mixed_precision="bf16", lr=1e-2, weight_decay=0.0,
                        seed=0)
    return WorkerConfig(run_name="bf16", train=train, model_spec=SPEC, dataset_schema=schema, preprocessor={},
                        total_steps=STEPS)


def _rank_main(rank: int, port: int, out_dir: str, strategy: str) -> None:
    from raysys.train.loop import build_parallel_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pm = build_parallel_model(_worker_config(strategy), WORLD, torch.device("cpu"))
        x_num, x_cat, y = toy_batches(STEPS, BATCH)
        half = BATCH // WORLD
        sl = slice(rank * half, (rank + 1) * half)
        with pm.amp():
            logits = pm.model(x_num[0, sl], x_cat[0, sl])
        losses = [train_step(pm.model, pm.optimizer, x_num[s, sl], x_cat[s, sl], y[s, sl], amp=pm.amp)
                  for s in range(STEPS)]
        params = [p.to_local() if hasattr(p, "to_local") else p for p in unwrap(pm.state_module).parameters()]
        states = [v for st in pm.optimizer.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0]
        record = {"__losses__": torch.tensor(losses, dtype=torch.float64),
                  "__facts__": torch.tensor([
                      logits.dtype == torch.bfloat16,  # the forward computed in bf16
                      all(p.dtype == torch.float32 for p in params),  # the parameters stay fp32 ...
                      bool(states) and all(v.dtype == torch.float32 for v in states),  # ... and AdamW's state
                      pm.precision == "bf16", pm.autocast_forward])}
        save_file(record, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("strategy,autocast", [("ddp", True), ("zero3", False)])
def test_bf16_trains_like_fp32_with_fp32_master_weights(tmp_path, strategy, autocast):
    spawn_ranks(_rank_main, (free_port(), str(tmp_path), strategy), WORLD, 150, f"2-rank gloo {strategy} bf16 run")

    torch.manual_seed(0)
    ref = build_model(SPEC)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    x_num, x_cat, y = toy_batches(STEPS, BATCH)
    ref_losses = torch.tensor([train_step(ref, opt, x_num[s], x_cat[s], y[s]) for s in range(STEPS)],
                              dtype=torch.float64)

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for r in ranks:
        facts = r["__facts__"].tolist()
        assert facts[:4] == [True, True, True, True], facts
        assert facts[4] == autocast, facts  # FSDP2 casts by its policy, DDP by autocast
    mean = (ranks[0]["__losses__"] + ranks[1]["__losses__"]) / 2
    # bf16 keeps 8 bits of mantissa: the same curve as fp32 within a few percent, never bit-equal
    torch.testing.assert_close(mean, ref_losses, rtol=0.05, atol=0.02)
    assert not torch.equal(mean, ref_losses)
