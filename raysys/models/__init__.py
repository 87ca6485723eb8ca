"""Model families by name. A model is described by a JSON-able spec so the registry can rebuild it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raysys.config import ModelConfig
from raysys.data.schema import DatasetSchema
from raysys.models.ft_transformer import FT_PRESETS, FTTransformer
from raysys.models.mlp import DEFAULT_ACTIVATION, TabularMLP

FAMILIES = {"mlp": TabularMLP, "ft_transformer": FTTransformer}
FT_ARCH_KEYS = ("d_model", "num_blocks", "num_heads", "ffn_mult")


def model_spec(schema: DatasetSchema, cfg: ModelConfig, family: str | None = None, *, size: str | None = None,
               **arch: Any) -> dict[str, Any]:
    """The constructor arguments of a model for this schema, as plain JSON.

    `family` defaults to `cfg.family`. An "mlp" spec carries `activation` only when it differs from the
    format's default (`DEFAULT_ACTIVATION`, exact GELU), which a spec without the key builds.
    For "ft_transformer" the architecture is the named `size` in `FT_PRESETS` (default `cfg.size`, else
    "tiny"), overridden by any of d_model / num_blocks / num_heads / ffn_mult given here or set on `cfg`;
    `cfg.dropout` applies to both families.
    """
    family = family or cfg.family
    # nullable numeric features add their is-missing indicators to the numeric input (data.Preprocessor)
    base = {"family": family, "num_numeric": schema.num_model_numeric, "cardinalities": schema.cardinalities,
            "num_classes": schema.num_classes}
    if family == "mlp":
        if size is not None or arch:
            raise ValueError("model_spec: size/architecture overrides apply to family 'ft_transformer' only")
        return {**base, **_mlp_arch(cfg)}
    if family == "ft_transformer":
        return {**base, **_ft_arch(cfg, size or cfg.size or "tiny", arch)}
    raise ValueError(f"model family: unknown {family!r}; choose one of {sorted(FAMILIES)}")


def _mlp_arch(cfg: ModelConfig) -> dict[str, Any]:
    out = {"hidden_dims": list(cfg.hidden_dims), "embed_dim": cfg.embed_dim, "dropout": cfg.dropout}
    if cfg.activation != DEFAULT_ACTIVATION:
        out["activation"] = cfg.activation
    return out


def _ft_arch(cfg: ModelConfig, size: str, arch: dict[str, Any]) -> dict[str, Any]:
    if size not in FT_PRESETS:
        raise ValueError(f"model.size: unknown {size!r}; choose one of {list(FT_PRESETS)}")
    unknown = set(arch) - set(FT_ARCH_KEYS)
    if unknown:
        raise ValueError(f"model_spec: unknown ft_transformer settings {sorted(unknown)}; use {FT_ARCH_KEYS}")
    out = dict(FT_PRESETS[size])
    for key in FT_ARCH_KEYS:
        value = arch.get(key, getattr(cfg, key))
        if value is not None:
            out[key] = value
    out["ffn_mult"] = float(out["ffn_mult"])
    out["dropout"] = cfg.dropout
    return out


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model a `model_spec` dict describes (a spec without "family" is an MLP)."""
    spec = dict(spec)
    family = spec.pop("family", "mlp")
    if family not in FAMILIES:
        raise ValueError(f"model family: unknown {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family](**spec)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, x_num, x_cat, batch_size: int = 8192) -> torch.Tensor:
    """Logits for numpy/tensor inputs, in eval mode, batched to bound memory; on the model's device, returned on
    the CPU."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # a parameter-free model: the CPU
    x_num = torch.as_tensor(x_num, dtype=torch.float32)
    x_cat = torch.as_tensor(x_cat, dtype=torch.int64)
    outs = [model(x_num[i:i + batch_size].to(device), x_cat[i:i + batch_size].to(device)).cpu()
            for i in range(0, len(x_num), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
