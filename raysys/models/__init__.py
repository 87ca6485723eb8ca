"""Model families by name. A model is described by a JSON-able spec so the registry can rebuild it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raysys.config import ModelConfig
from raysys.data.schema import DatasetSchema
from raysys.models.mlp import TabularMLP

FAMILIES = {"mlp": TabularMLP}


def model_spec(schema: DatasetSchema, cfg: ModelConfig, family: str = "mlp") -> dict[str, Any]:
    """The constructor arguments of a model for this schema, as plain JSON."""
    return {
        "family": family,
        "num_numeric": len(schema.numeric),
        "cardinalities": schema.cardinalities,
        "num_classes": schema.num_classes,
        "hidden_dims": list(cfg.hidden_dims),
        "embed_dim": cfg.embed_dim,
        "dropout": cfg.dropout,
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    family = spec.pop("family", "mlp")
    if family not in FAMILIES:
        raise ValueError(f"model family: unknown {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family](**spec)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, x_num, x_cat, batch_size: int = 8192) -> torch.Tensor:
    """Logits for numpy/tensor inputs, in eval mode, batched to bound memory."""
    model.eval()
    x_num = torch.as_tensor(x_num, dtype=torch.float32)
    x_cat = torch.as_tensor(x_cat, dtype=torch.int64)
    outs = [model(x_num[i:i + batch_size], x_cat[i:i + batch_size]) for i in range(0, len(x_num), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
