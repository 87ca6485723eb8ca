"""Post-training dynamic int8 quantization of a model (`torch.ao.quantization.quantize_dynamic`).

Every `nn.Linear` gets int8 weights (per-tensor affine) and int8 activations quantized on the fly;
embeddings stay float. Quantized modules' state is not plain tensors (packed params), and the registry
stores safetensors only, so a quantized version is stored as its *float* weights plus
`"quantization": "dynamic_int8"` in its model spec, and quantized again on load: dynamic quantization is
deterministic (the scales come from the weights), so the loaded model is the one that was evaluated.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

QUANTIZATION_KEY = "quantization"
DYNAMIC_INT8 = "dynamic_int8"
SUPPORTED = (DYNAMIC_INT8,)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A dynamic-int8 copy of `model` (eval mode); the float model is left untouched."""
    from torch.ao.quantization import quantize_dynamic

    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao, which is not a
        # dependency here; the eager API still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8).eval()


def _check(quantization: str | None) -> None:
    if quantization is not None and quantization not in SUPPORTED:
        raise ValueError(f"model spec: unknown quantization {quantization!r}; supported: {list(SUPPORTED)}")


def split_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`(spec without the quantization key, quantization or None)`; ValueError for an unknown scheme."""
    spec = dict(spec)
    quantization = spec.pop(QUANTIZATION_KEY, None)
    _check(quantization)
    return spec, quantization


def apply_quantization(model: nn.Module, quantization: str | None) -> nn.Module:
    """`model` itself when `quantization` is None, else its quantized copy."""
    _check(quantization)
    return model if quantization is None else quantize_dynamic_int8(model)
