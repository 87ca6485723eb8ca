"""Tensor parallelism (Megatron-style) with `torch.distributed.tensor.parallel` on a 1-D `tp` mesh.

Plans, per model family:

- `FTTransformer`: in every block, attention `q`, `k`, `v` column-wise (each rank computes
  `num_heads / tp` whole heads: the model derives its local head count from `q`'s output width) and `out`
  row-wise (partial sums all-reduced to a replicated output); MLP `fc1` column-wise, `fc2` row-wise. So a
  block costs two all-reduces forward and two backward. Tokenizer, LayerNorms and head stay replicated:
  their inputs are replicated, and the column-wise layers' backward all-reduces the input gradient, so
  replicated parameters get identical gradients on every tp rank.
- `TabularMLP`: the hidden Linear layers in consecutive pairs (column-wise, row-wise); the GELU between
  them is elementwise, so it runs on the sharded activations. With an odd number of hidden layers the
  last one stays replicated, as do the embeddings and the head.

All layers keep `use_local_output=True`, so activations between modules are plain tensors and pipeline
stages can send them; parameters become `DTensor`s sharded over `tp_mesh` (`full_tensor()` gathers one).
Dropout in the sharded part of the MLP draws each rank's mask over its own slice from the same seed:
statistically fine, but not the mask a single process would draw (equivalence tests use dropout 0).
Apply this before pipeline splitting and before FSDP (`fully_shard` on the dp mesh then composes 2-D).
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

logger = logging.getLogger(__name__)


# parallel/ imports torch only: models are recognised by their layout, not their class
def is_transformer_layout(model: nn.Module) -> bool:
    """`tokenizer`, `blocks` (each with `attn.{q,k,v,out}` and `mlp.{fc1,fc2}`), `head`: FTTransformer."""
    blocks = getattr(model, "blocks", None)
    return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and hasattr(model, "tokenizer")
            and all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks))


def is_mlp_layout(model: nn.Module) -> bool:
    """`embeddings` (ModuleList), `body` (Sequential of Linear/GELU/Dropout), `head`: TabularMLP."""
    return (isinstance(getattr(model, "embeddings", None), nn.ModuleList)
            and isinstance(getattr(model, "body", None), nn.Sequential) and hasattr(model, "head"))


def tensor_parallel_plan(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """The {module FQN: style} plan for `model` at tensor-parallel degree `tp` (ValueError if it cannot split)."""
    if is_transformer_layout(model):
        plan: dict[str, ParallelStyle] = {}
        for i, block in enumerate(model.blocks):
            d_model = block.attn.q.out_features
            num_heads = d_model // block.attn.head_dim
            if num_heads % tp:
                raise ValueError(f"train.parallel.tp ({tp}) must divide model.num_heads ({num_heads}): "
                                 f"choose tp in {[n for n in range(1, num_heads + 1) if num_heads % n == 0]}")
            hidden = block.mlp.fc1.out_features
            if hidden % tp:
                raise ValueError(f"train.parallel.tp ({tp}) must divide the MLP width ({hidden} = "
                                 f"d_model * ffn_mult); change model.ffn_mult or tp")
            for name in ("q", "k", "v"):
                plan[f"blocks.{i}.attn.{name}"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.out"] = RowwiseParallel()
            plan[f"blocks.{i}.mlp.fc1"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.fc2"] = RowwiseParallel()
        return plan
    if is_mlp_layout(model):
        linears = [i for i, m in enumerate(model.body) if isinstance(m, nn.Linear)]
        plan = {}
        for a, b in zip(linears[0::2], linears[1::2]):
            width = model.body[a].out_features
            if width % tp:
                raise ValueError(f"train.parallel.tp ({tp}) must divide the hidden width {width} "
                                 f"(model.hidden_dims); change hidden_dims or tp")
            plan[f"body.{a}"] = ColwiseParallel()
            plan[f"body.{b}"] = RowwiseParallel()
        if not plan:
            raise ValueError("tensor parallel: a TabularMLP needs at least 2 hidden layers (model.hidden_dims) "
                             "to split a column-wise/row-wise pair; use the ft_transformer family or dp")
        return plan
    raise ValueError(f"tensor parallel: no plan for {type(model).__name__}; "
                     f"supported: FTTransformer (ft_transformer), TabularMLP (mlp)")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model`'s attention and MLP Linear layers over the 1-D `tp_mesh`, in place; returns `model`.

    Every tp rank must then see the same input batch (the tp ranks of one data-parallel replica).
    Parameters must already hold the same values on every tp rank (same seed): `parallelize_module`
    scatters rank 0's (`src_data_rank=0`) shards, so differing init is overwritten.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel: pass the 1-D tp sub-mesh (mesh['tp']), got a {tp_mesh.ndim}-D mesh")
    tp = tp_mesh.size()
    if tp == 1:
        return model
    plan = tensor_parallel_plan(model, tp)
    parallelize_module(model, tp_mesh, plan)
    if dist.get_rank() == 0:
        logger.info("parallel: tensor parallel applied over %d ranks (%d layers sharded: %s)", tp, len(plan),
                    "attention q/k/v colwise + out rowwise, mlp fc1 colwise + fc2 rowwise"
                    if is_transformer_layout(model) else "hidden Linear pairs colwise/rowwise")
    return model


__all__ = ["apply_tensor_parallel", "is_mlp_layout", "is_transformer_layout", "tensor_parallel_plan"]
