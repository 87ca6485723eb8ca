"""FT-Transformer style tabular teacher: a feature tokenizer, a [CLS] token, pre-norm transformer blocks.

Single-device code: no parallelism, no Ray. The structure is what `raysys/parallel` relies on, so keep it:

- `tokenizer` turns (x_num, x_cat) into tokens (batch, 1 + features, d_model), [CLS] first: numeric
  feature j becomes `x_num[:, j] * weight[j] + bias[j]`, categorical feature j an embedding row (one
  table for all categorical features, indexed with per-feature offsets);
- `blocks` is an `nn.ModuleList` of `Block`s, each `x + attn(norm1(x))` then `x + mlp(norm2(x))`; the
  attention has separate `q`, `k`, `v`, `out` Linear layers and derives its head count from the width
  of `q`'s output (`view(..., -1, head_dim)`), so the same code runs when tensor parallelism hands each
  rank a slice of the heads; the MLP is `fc1` -> GELU -> `fc2`;
- `head` reads the [CLS] token: LayerNorm then Linear to logits.

A pipeline stage is then a contiguous run of [tokenizer, blocks..., head]; FSDP wraps each block.
Sizes go from a few thousand parameters (`tiny`) to ~300M (`large`), see `FT_PRESETS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Named sizes, each derived from the one before. The per-block parameter count is about
# (4 + 2 * ffn_mult) * d_model**2, so `large` (24 blocks of d=1024, ffn_mult=4) has ~302M parameters.
FT_PRESETS: dict[str, dict[str, float | int]] = {}
FT_PRESETS["tiny"] = {"d_model": 32, "num_blocks": 2, "num_heads": 4, "ffn_mult": 2.0}
FT_PRESETS["small"] = {**FT_PRESETS["tiny"], "d_model": 128, "num_blocks": 4, "num_heads": 8, "ffn_mult": 4.0}
FT_PRESETS["base"] = {**FT_PRESETS["small"], "d_model": 512, "num_blocks": 8}
FT_PRESETS["large"] = {**FT_PRESETS["base"], "d_model": 1024, "num_blocks": 24, "num_heads": 16}


def ffn_hidden(d_model: int, ffn_mult: float) -> int:
    """Width of the MLP's hidden layer."""
    return max(1, int(round(d_model * ffn_mult)))


class FeatureTokenizer(nn.Module):
    def __init__(self, num_numeric: int, cardinalities: list[int], d_model: int):
        super().__init__()
        self.num_numeric = num_numeric
        self.num_categorical = len(cardinalities)
        self.num_weight = nn.Parameter(torch.empty(num_numeric, d_model))
        self.num_bias = nn.Parameter(torch.empty(num_numeric, d_model))
        self.cat_embedding = nn.Embedding(max(1, sum(cardinalities)), d_model)
        # not persistent: derived from the spec, so checkpoints hold only learned tensors
        offsets = torch.tensor([0, *cardinalities[:-1]], dtype=torch.int64).cumsum(0) if cardinalities else \
            torch.zeros(0, dtype=torch.int64)
        self.register_buffer("cat_offsets", offsets, persistent=False)
        self.cls = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the FT-Transformer paper's tokenizer init: uniform(-1/sqrt(d), 1/sqrt(d))
        bound = 1.0 / math.sqrt(self.cls.numel())
        for p in (self.num_weight, self.num_bias, self.cls, self.cat_embedding.weight):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        batch = x_num.shape[0] if self.num_numeric else x_cat.shape[0]
        tokens = [self.cls.expand(batch, 1, -1)]
        if self.num_numeric:
            tokens.append(x_num.unsqueeze(-1) * self.num_weight + self.num_bias)
        if self.num_categorical:
            tokens.append(self.cat_embedding(x_cat + self.cat_offsets))
        return torch.cat(tokens, dim=1)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"model.d_model ({d_model}) must be divisible by model.num_heads ({num_heads})")
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        # no key bias: softmax is invariant to it (q.(k + b) shifts every score of a query equally), so its
        # gradient is float noise that Adam's normalisation would turn into real, order-dependent updates
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            # heads from the width: under tensor parallelism q/k/v return this rank's slice of the heads only;
            # explicit sizes (not -1) so an empty batch (FSDP's padding of a rank's validation) reshapes too
            return z.view(b, t, z.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, q.shape[1] * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, num_heads: int, ffn_mult: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ffn_hidden(d_model, ffn_mult), dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class ClsHead(nn.Module):
    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear = nn.Linear(d_model, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h[:, 0]))


class FTTransformer(nn.Module):
    """forward(x_num float (B, num_numeric), x_cat int64 (B, len(cardinalities))) -> logits (B, num_classes)."""

    def __init__(self, num_numeric: int, cardinalities: list[int], num_classes: int, d_model: int = 32,
                 num_blocks: int = 2, num_heads: int = 4, ffn_mult: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if num_numeric + len(cardinalities) < 1:
            raise ValueError("ft_transformer: the schema has no features (num_numeric and cardinalities are empty)")
        for name, value in (("d_model", d_model), ("num_blocks", num_blocks), ("num_heads", num_heads)):
            if int(value) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value}")
        if ffn_mult <= 0:
            raise ValueError(f"model.ffn_mult must be positive, got {ffn_mult}")
        self.tokenizer = FeatureTokenizer(num_numeric, list(cardinalities), d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, ffn_mult, dropout) for _ in range(num_blocks))
        self.head = ClsHead(d_model, num_classes)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        h = self.tokenizer(x_num, x_cat)
        for block in self.blocks:
            h = block(h)
        return self.head(h)
