"""Tabular MLP: categorical features embedded (one shared table), concatenated with numeric features, then an MLP.

Single-device code: no parallelism, no Ray (see raysys/parallel for how it is distributed).

Latency at batch 1 is almost all per-call overhead, so the forward keeps the number of torch calls low:
every categorical feature's embedding lives in ONE table indexed with per-feature offsets (one lookup,
not one module call per feature: ~5.5 us vs ~15 us for three features on one CPU thread), and the
activation is configurable, because torch's exact GELU costs ~7.4 us per call on CPU whatever the size
(tanh-approximate GELU ~0.9-1.3 us at batch 1 but slower than exact from ~64x128 elements; ReLU ~0.8-2 us).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> module factory
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}
# the spec format's default: a spec without "activation" means exact GELU
DEFAULT_ACTIVATION = "gelu"


class _FeatureEmbedding(nn.Module):
    """A read-only view of one feature's rows of the shared table, for code that embeds feature by feature
    (the MLP pipeline stage in raysys/parallel/pipeline.py); it owns no parameters."""

    def __init__(self, owner: CategoricalEmbeddings, offset: int, num_embeddings: int, embedding_dim: int):
        super().__init__()
        # not a registered submodule (that would be a cycle in state_dict()); looked up at call time, so it
        # sees whatever tensor the owner holds then (FSDP2 swaps sharded/unsharded parameters in place)
        self.__dict__["_owner"] = owner
        self.offset, self.num_embeddings, self.embedding_dim = offset, num_embeddings, embedding_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx + self.offset, self._owner.weight)

    def extra_repr(self) -> str:
        return f"rows {self.offset}..{self.offset + self.num_embeddings - 1}, dim {self.embedding_dim}"


class CategoricalEmbeddings(nn.ModuleList):
    """All categorical features' embeddings in one (sum(cardinalities), embed_dim) table.

    forward(x_cat (B, F) int64) -> (B, F * embed_dim), one lookup with per-feature offsets. Iterating it
    yields one `_FeatureEmbedding` per feature (the layout raysys/parallel recognises: a ModuleList whose
    items embed one feature each). State: `weight` only; a state dict in the per-feature layout
    (`0.weight`, `1.weight`, ...: one `nn.Embedding` per feature) is concatenated into it on load.
    """

    def __init__(self, cardinalities: list[int], embed_dim: int):
        super().__init__()
        self.cardinalities, self.embedding_dim = [int(c) for c in cardinalities], int(embed_dim)
        if self.cardinalities:
            # N(0, 1) like nn.Embedding's default init
            self.weight = nn.Parameter(torch.randn(sum(self.cardinalities), self.embedding_dim))
        else:
            self.register_parameter("weight", None)
        starts = [0]
        for c in self.cardinalities[:-1]:
            starts.append(starts[-1] + c)
        # not persistent: derived from the spec, so checkpoints hold only learned tensors
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)
        for start, card in zip(starts, self.cardinalities):
            self.append(_FeatureEmbedding(self, start, card, self.embedding_dim))
        self._register_load_state_dict_pre_hook(self._from_per_feature_layout)

    def forward(self, x_cat: torch.Tensor) -> torch.Tensor:
        return F.embedding(x_cat + self.offsets, self.weight).flatten(1)

    def _from_per_feature_layout(self, state_dict, prefix, *args) -> None:
        old = [f"{prefix}{j}.weight" for j in range(len(self.cardinalities))]
        if f"{prefix}weight" not in state_dict and old and all(k in state_dict for k in old):
            state_dict[f"{prefix}weight"] = torch.cat([state_dict.pop(k) for k in old])


class TabularMLP(nn.Module):
    """forward(x_num float (B, num_numeric), x_cat int64 (B, len(cardinalities))) -> logits (B, num_classes).

    `body` is a Sequential of Linear, activation[, Dropout] per hidden layer (raysys/parallel splits it).
    """

    def __init__(self, num_numeric: int, cardinalities: list[int], num_classes: int,
                 hidden_dims: list[int], embed_dim: int = 8, dropout: float = 0.0,
                 activation: str = DEFAULT_ACTIVATION):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.num_numeric, self.num_categorical = int(num_numeric), len(cardinalities)
        self.embeddings = CategoricalEmbeddings(list(cardinalities), embed_dim)
        layers: list[nn.Module] = []
        width = num_numeric + embed_dim * len(cardinalities)
        for h in hidden_dims:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_num, self.embeddings(x_cat)], dim=1) if self.num_categorical else x_num
        return self.head(self.body(h))
