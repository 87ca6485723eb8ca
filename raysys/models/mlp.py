"""Tabular MLP: an embedding per categorical feature, concatenated with numeric features, then an MLP.

Single-device code: no parallelism, no Ray (see raysys/parallel for how it is distributed).
"""

from __future__ import annotations

import torch
from torch import nn


class TabularMLP(nn.Module):
    def __init__(self, num_numeric: int, cardinalities: list[int], num_classes: int,
                 hidden_dims: list[int], embed_dim: int = 8, dropout: float = 0.0):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        width = num_numeric + embed_dim * len(cardinalities)
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        parts = [x_num] + [emb(x_cat[:, j]) for j, emb in enumerate(self.embeddings)]
        return self.head(self.body(torch.cat(parts, dim=1)))
