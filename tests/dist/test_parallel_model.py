"""Tier 2: tensor and pipeline parallelism on real gloo process groups, each against a single-process
reference: same seed, same data, K AdamW steps; per-step losses and final weights must agree.

Two spawned jobs cover every case (process start-up dominates on a 2-core box, so cases share a job):
- 2 ranks: tensor parallel (FT-Transformer and TabularMLP), pipeline GPipe with 1, 2 and 4 microbatches
  and 1F1B with 2 and 4 (FT-Transformer), 1F1B on TabularMLP, and pipeline evaluation logits;
- 4 ranks: tensor x FSDP2 (`fully_shard` with reshard_after_forward=True, i.e. zero3, on the dp
  sub-mesh after TP) and pipeline x DDP (DDP over the dp sub-group around each stage).

Tolerance: rtol 1e-4, atol 3e-5 on weights and losses (float32; only the summation order differs:
microbatch means averaged, partial sums all-reduced).
"""

from __future__ import annotations

import datetime
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from serve.ingress import free_port
from helpers.dist import exit_rank, spawn_ranks, toy_batches
from safetensors.torch import load_file, save_file

from raysys.models import build_model

pytestmark = pytest.mark.dist

FT = {"family": "ft_transformer", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "d_model": 16,
      "num_blocks": 4, "num_heads": 4, "ffn_mult": 2.0, "dropout": 0.0}
MLP = {"family": "mlp", "num_numeric": 6, "cardinalities": [4, 3], "num_classes": 4, "hidden_dims": [32, 16, 16],
       "embed_dim": 4, "dropout": 0.0}
SPECS = {"ft": FT, "mlp": MLP}
STEPS, BATCH, EVAL_BATCH = 4, 32, 10  # 10 rows: 4 microbatches do not divide it (eval falls back to 1)
RTOL, ATOL = 1e-4, 3e-5

# name -> (spec, kind, options); kind "tp" / "pp" run in the 2-rank job, "tp_fsdp" / "pp_ddp" in the 4-rank one
CASES_2 = {
    "tp_ft": ("ft", "tp", {}),
    "tp_mlp": ("mlp", "tp", {}),
    "pp_ft_gpipe_m1": ("ft", "pp", {"schedule": "gpipe", "m": 1}),
    "pp_ft_gpipe_m2": ("ft", "pp", {"schedule": "gpipe", "m": 2}),
    "pp_ft_gpipe_m4": ("ft", "pp", {"schedule": "gpipe", "m": 4}),
    "pp_ft_1f1b_m2": ("ft", "pp", {"schedule": "1f1b", "m": 2}),
    "pp_ft_1f1b_m4": ("ft", "pp", {"schedule": "1f1b", "m": 4}),
    "pp_mlp_1f1b_m4": ("mlp", "pp", {"schedule": "1f1b", "m": 4}),
}
CASES_4 = {
    # four stages: the middle ones receive and send in both directions (prefetched receives on gloo)
    "pp4_ft_gpipe_m8": ("ft", "pp", {"schedule": "gpipe", "m": 8}),
    "pp4_ft_1f1b_m4": ("ft", "pp", {"schedule": "1f1b", "m": 4}),
    "tp_fsdp_ft": ("ft", "tp_fsdp", {}),
    "pp_ddp_ft": ("ft", "pp_ddp", {"schedule": "1f1b", "m": 2}),
}


def _data():
    return toy_batches(STEPS, BATCH)


def _eval_data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(EVAL_BATCH, 6, generator=g), torch.stack(
        [torch.randint(0, 4, (EVAL_BATCH,), generator=g), torch.randint(0, 3, (EVAL_BATCH,), generator=g)], -1)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-3)


def _full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain-tensor state dict, DTensors (TP/FSDP shards) gathered to full tensors."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        out[k] = v.detach().contiguous().clone()
    return out


def _run_case(rank: int, world: int, name: str, spec_name: str, kind: str, opts: dict, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from raysys.parallel.pipeline import apply_pipeline_parallel, build_pipeline
    from raysys.parallel.tensor import apply_tensor_parallel

    torch.manual_seed(0)
    model = build_model(SPECS[spec_name])
    x_num, x_cat, y = _data()
    result: dict[str, torch.Tensor] = {}
    losses: list[float] = []

    if kind in ("tp", "tp_fsdp"):
        if kind == "tp":
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
            rows = slice(None)
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            dp_rank, half = mesh["dp"].get_local_rank(), BATCH // 2
            rows = slice(dp_rank * half, (dp_rank + 1) * half)
        apply_tensor_parallel(model, mesh["tp"])
        if kind == "tp_fsdp":
            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"], reshard_after_forward=True)
            fully_shard(model, mesh=mesh["dp"], reshard_after_forward=True)
        opt = _optimizer(model.parameters())
        for s in range(STEPS):
            loss = F.cross_entropy(model(x_num[s, rows], x_cat[s, rows]), y[s, rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        result.update(_full_state(model))
        model.eval()
        with torch.no_grad():
            result["__eval_logits__"] = model(*_eval_data()).contiguous()
        tag = f"rank{rank}"
    else:
        if kind == "pp":
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
            dp_wrap, rows = None, slice(None)
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
            dp_group = mesh["dp"].get_group()
            dp_rank, half = mesh["dp"].get_local_rank(), BATCH // 2
            rows = slice(dp_rank * half, (dp_rank + 1) * half)

            def dp_wrap(m):
                return DistributedDataParallel(m, process_group=dp_group)

        if kind == "pp":
            runner = build_pipeline(model, mesh["pp"], num_microbatches=opts["m"], schedule=opts["schedule"])
        else:  # the apply_<strategy>(model, mesh, cfg) form, on the 2-D mesh
            cfg = SimpleNamespace(option={"num_microbatches": opts["m"], "pipeline_schedule": opts["schedule"]}.get)
            runner = apply_pipeline_parallel(model, mesh, cfg, dp_wrap=dp_wrap)
        opt = _optimizer(runner.parameters())
        if kind == "pp":
            # the minimal data contract: only the first stage holds x, the others get it broadcast
            got = runner.broadcast_batch(*((x_num[0], x_cat[0], y[0]) if runner.is_first else (None,) * 3))
            assert all(torch.equal(a, b) for a, b in zip(got, (x_num[0], x_cat[0], y[0])))
        for s in range(STEPS):
            if kind == "pp" and not runner.is_first:  # later stages need y and the batch size only
                loss = runner.train_step(opt, None, None, y[s, rows])
            else:
                loss = runner.train_step(opt, x_num[s, rows], x_cat[s, rows], y[s, rows])
            assert (loss is None) == (not runner.is_last)
            if loss is not None:
                losses.append(loss)
        result.update({k: v.detach().contiguous().clone() for k, v in runner.state_dict().items()})
        ev_num, ev_cat = _eval_data()
        logits = runner.eval_logits(ev_num, ev_cat)
        assert (logits is None) == (not runner.is_last)
        if logits is not None:
            result["__eval_logits__"] = logits.contiguous()
        tag = f"rank{rank}"

    if losses:
        result["__losses__"] = torch.tensor(losses, dtype=torch.float64)
    save_file(result, f"{out_dir}/{name}.{tag}.safetensors")


def _rank_main(rank: int, world: int, port: int, cases: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, (spec_name, kind, opts) in cases.items():
            try:
                _run_case(rank, world, name, spec_name, kind, opts, out_dir)
            except Exception:
                # mp.spawn reports one rank's error, often a peer's "connection closed": print every rank's
                traceback.print_exc()
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank()  # not reached when the work failed: the exception reaches mp.spawn


def _spawn(world: int, cases: dict, out_dir: str, limit_s: float) -> None:
    spawn_ranks(_rank_main, (world, free_port(), cases, out_dir), world, limit_s, f"{world}-rank gloo job")


def _reference(spec_name: str) -> tuple[dict[str, torch.Tensor], list[float], torch.Tensor]:
    """Single process, full batches: state dict, losses, eval logits."""
    torch.manual_seed(0)
    model = build_model(SPECS[spec_name])
    opt = _optimizer(model.parameters())
    x_num, x_cat, y = _data()
    losses = []
    for s in range(STEPS):
        loss = F.cross_entropy(model(x_num[s], x_cat[s]), y[s])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        logits = model(*_eval_data())
    return model.state_dict(), losses, logits


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_model")
    _spawn(2, CASES_2, str(out), 90)
    _spawn(4, CASES_4, str(out), 120)
    refs = {name: _reference(name) for name in SPECS}
    return out, refs


def _load(out, name: str, world: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / f"{name}.rank{r}.safetensors")) for r in range(world)]


def _assert_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], case: str) -> None:
    assert sorted(k for k in got if not k.startswith("__")) == sorted(ref), case
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{case} {k}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["tp_ft", "tp_mlp"])
def test_tensor_parallel_matches_single_process(results, case):
    out, refs = results
    ref_sd, ref_losses, ref_logits = refs[CASES_2[case][0]]
    ranks = _load(out, case, 2)
    for r in ranks:
        _assert_weights(r, ref_sd, case)
        torch.testing.assert_close(r["__losses__"], torch.tensor(ref_losses, dtype=torch.float64), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["__eval_logits__"], ref_logits, rtol=RTOL, atol=ATOL)
    torch.manual_seed(0)
    init = build_model(SPECS[CASES_2[case][0]]).state_dict()
    assert all(not torch.equal(ranks[0][k], init[k]) for k in init)  # every tensor trained (and was compared)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for cases in (CASES_2, CASES_4) for c, (_, kind, _) in cases.items()
                                  if kind == "pp"])
def test_pipeline_matches_single_process(results, case):
    out, refs = results
    world = 2 if case in CASES_2 else 4
    ref_sd, ref_losses, ref_logits = refs[{**CASES_2, **CASES_4}[case][0]]
    stages = _load(out, case, world)
    keys = [set(k for k in s if not k.startswith("__")) for s in stages]
    assert sum(map(len, keys)) == len(set().union(*keys)), "stages must own disjoint keys"
    _assert_weights({k: v for s in stages for k, v in s.items()}, ref_sd, case)
    assert all("__losses__" not in s for s in stages[:-1])  # the loss lives on the last stage only
    torch.testing.assert_close(stages[-1]["__losses__"], torch.tensor(ref_losses, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(stages[-1]["__eval_logits__"], ref_logits, rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_tensor_x_fsdp_matches_single_process(results):
    out, refs = results
    ref_sd, ref_losses, ref_logits = refs["ft"]
    ranks = _load(out, "tp_fsdp_ft", 4)
    for r in ranks:
        _assert_weights(r, ref_sd, "tp_fsdp_ft")
        torch.testing.assert_close(r["__eval_logits__"], ref_logits, rtol=RTOL, atol=ATOL)
    # each dp replica's loss is the mean over its half batch: their mean is the full-batch loss
    dp_mean = (ranks[0]["__losses__"] + ranks[2]["__losses__"]) / 2
    torch.testing.assert_close(dp_mean, torch.tensor(ref_losses, dtype=torch.float64), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_pipeline_x_ddp_matches_single_process(results):
    out, refs = results
    ref_sd, ref_losses, ref_logits = refs["ft"]
    # mesh (dp, pp): ranks 0, 1 are replica 0's stages 0, 1; ranks 2, 3 replica 1's
    ranks = _load(out, "pp_ddp_ft", 4)
    for stage0, stage1 in ((ranks[0], ranks[1]), (ranks[2], ranks[3])):
        _assert_weights({**stage0, **stage1}, ref_sd, "pp_ddp_ft")
        torch.testing.assert_close(stage1["__eval_logits__"], ref_logits, rtol=RTOL, atol=ATOL)
    dp_mean = (ranks[1]["__losses__"] + ranks[3]["__losses__"]) / 2
    torch.testing.assert_close(dp_mean, torch.tensor(ref_losses, dtype=torch.float64), rtol=RTOL, atol=ATOL)
