"""Tier 1: the FT-Transformer teacher, its spec, and the process-group-free parts of pipeline and tensor
parallelism (stage split, parameter balance, TP plans). No Ray, no process group."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from raysys.config import ModelConfig
from raysys.data.schema import DatasetSchema
from raysys.models import FAMILIES, FT_PRESETS, build_model, model_spec, num_parameters
from raysys.models.ft_transformer import FTTransformer
from raysys.parallel.pipeline import balance_stages, example_inputs, pipeline_units, split_model
from raysys.parallel.tensor import tensor_parallel_plan

FT = {"family": "ft_transformer", "num_numeric": 5, "cardinalities": [4, 3, 6], "num_classes": 3, "d_model": 16,
      "num_blocks": 3, "num_heads": 4, "ffn_mult": 2.0, "dropout": 0.0}
MLP = {"family": "mlp", "num_numeric": 5, "cardinalities": [4, 3, 6], "num_classes": 3, "hidden_dims": [32, 16, 16],
       "embed_dim": 4, "dropout": 0.1}


def _batch(n: int = 10, num_numeric: int = 5, cards=(4, 3, 6), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, num_numeric, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], 1) if cards else \
        torch.zeros(n, 0, dtype=torch.int64)
    return x_num, x_cat


def _schema() -> DatasetSchema:
    features = [{"name": f"n{i}", "kind": "numeric"} for i in range(5)]
    features += [{"name": "a", "kind": "categorical", "categories": ["x", "y", "z", "w"]},
                 {"name": "b", "kind": "categorical", "categories": ["p", "q", "r"]}]
    return DatasetSchema.model_validate({"features": features, "label": "label", "classes": ["c0", "c1", "c2"]})


def test_forward_backward_shapes():
    torch.manual_seed(0)
    model = build_model(FT)
    assert isinstance(model, FTTransformer) and isinstance(model.blocks, torch.nn.ModuleList)
    x_num, x_cat = _batch()
    tokens = model.tokenizer(x_num, x_cat)
    assert tokens.shape == (10, 1 + 5 + 3, 16)  # [CLS] + one token per feature
    logits = model(x_num, x_cat)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32
    F.cross_entropy(logits, torch.randint(0, 3, (10,))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # every categorical feature has its own rows in the shared table: same index, different feature differs
    same = torch.zeros(1, 3, dtype=torch.int64)
    cat_tokens = model.tokenizer(torch.zeros(1, 5), same)[0, 6:]
    assert not torch.allclose(cat_tokens[0], cat_tokens[1])


@pytest.mark.parametrize("num_numeric,cards", [(4, []), (0, [3, 5])])
def test_numeric_only_and_categorical_only(num_numeric, cards):
    spec = {**FT, "num_numeric": num_numeric, "cardinalities": cards}
    model = build_model(spec)
    x_num, x_cat = _batch(7, num_numeric, cards)
    assert model(x_num, x_cat).shape == (7, 3)


def test_invalid_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="num_heads"):
        build_model({**FT, "d_model": 18, "num_heads": 4})
    with pytest.raises(ValueError, match="num_blocks"):
        build_model({**FT, "num_blocks": 0})


def test_preset_sizes_scale_from_tiny_to_hundreds_of_millions():
    counts = {}
    for name, arch in FT_PRESETS.items():
        with torch.device("meta"):  # shapes only: `large` would need 1.2 GB of real memory
            counts[name] = num_parameters(FTTransformer(8, [5, 5, 5], 4, **arch))
    names = list(FT_PRESETS)
    assert names[0] == "tiny" and names[-1] == "large"
    assert all(counts[a] < counts[b] for a, b in zip(names, names[1:])), counts
    assert counts["tiny"] < 50_000
    assert 100e6 <= counts["large"] <= 1e9, counts
    # the per-block count follows (4 + 2 * ffn_mult) * d^2 to within the biases and norms
    d, blocks, mult = (FT_PRESETS["large"][k] for k in ("d_model", "num_blocks", "ffn_mult"))
    assert abs(counts["large"] - blocks * (4 + 2 * mult) * d * d) / counts["large"] < 0.01


def test_model_spec_families_and_backward_compatibility():
    schema = _schema()
    mlp = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    assert mlp == {"family": "mlp", "num_numeric": 5, "cardinalities": [4, 3], "num_classes": 3,
                   "hidden_dims": [16], "embed_dim": 3, "dropout": 0.0}
    ft = model_spec(schema, ModelConfig(dropout=0.1), "ft_transformer")
    assert ft == {"family": "ft_transformer", "num_numeric": 5, "cardinalities": [4, 3], "num_classes": 3,
                  **FT_PRESETS["tiny"], "dropout": 0.1}
    big = model_spec(schema, ModelConfig(), "ft_transformer", size="small", num_blocks=2)
    assert big["d_model"] == FT_PRESETS["small"]["d_model"] and big["num_blocks"] == 2
    assert json.loads(json.dumps(big)) == big  # JSON-able: the registry stores it
    assert isinstance(build_model(big), FAMILIES["ft_transformer"])
    with pytest.raises(ValueError, match="model.size"):
        model_spec(schema, ModelConfig(), "ft_transformer", size="huge")
    with pytest.raises(ValueError, match="unknown"):
        model_spec(schema, ModelConfig(), "ft_transformer", depth=3)
    with pytest.raises(ValueError, match="family"):
        model_spec(schema, ModelConfig(), "gbdt")


def test_state_dict_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model(FT).eval()
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    other = build_model(FT).eval()
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x_num, x_cat = _batch()
    torch.testing.assert_close(other(x_num, x_cat), model(x_num, x_cat), rtol=0, atol=0)


def test_balance_stages():
    assert balance_stages([1, 10, 10, 10, 10, 1], 2) == [(0, 3), (3, 6)]
    assert balance_stages([5, 1, 1, 1, 1, 1], 3) == [(0, 1), (1, 5), (5, 6)]
    assert balance_stages([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    assert balance_stages([4, 4, 4, 4], 1) == [(0, 4)]
    with pytest.raises(ValueError, match="train.parallel.pp"):
        balance_stages([1, 2], 3)


@pytest.mark.parametrize("spec", [FT, MLP], ids=["ft_transformer", "mlp"])
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_split_stages_chain_to_the_full_model(spec, pp):
    torch.manual_seed(0)
    model = build_model({**spec, "num_blocks": 4} if spec is FT else spec).eval()
    units = pipeline_units(model)
    assert units[0].name in ("tokenizer", "embeddings") and units[-1].name == "head"
    stages = [split_model(model, pp, i) for i in range(pp)]
    assert stages[0].is_first and stages[-1].is_last
    x_num, x_cat = _batch()
    h = (x_num, x_cat)
    for stage in stages:
        stage.eval()
        h = (stage(*h),)
    torch.testing.assert_close(h[0], model(x_num, x_cat), rtol=0, atol=0)
    # stages own disjoint keys, named as in the full model: together they are its state dict
    keys = [k for s in stages for k in s.state_dict()]
    assert len(keys) == len(set(keys)) and set(keys) == set(model.state_dict())
    # balanced: no stage holds more than the whole model's largest-unit-plus-even-share
    sizes = [num_parameters(s) for s in stages]
    assert max(sizes) <= num_parameters(model) / pp + max(u.num_params for u in units)
    shapes = [t.shape for t in example_inputs(model)]
    assert shapes == [torch.Size([1, 5]), torch.Size([1, 3])]


def test_tensor_parallel_plans():
    ft = build_model(FT)
    plan = tensor_parallel_plan(ft, 2)
    assert set(plan) == {f"blocks.{i}.{m}" for i in range(3)
                         for m in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")}
    assert type(plan["blocks.0.attn.q"]).__name__ == "ColwiseParallel"
    assert type(plan["blocks.0.attn.out"]).__name__ == "RowwiseParallel"
    with pytest.raises(ValueError, match="num_heads"):
        tensor_parallel_plan(ft, 3)
    mlp_plan = tensor_parallel_plan(build_model(MLP), 2)
    # body = [Linear, GELU, Dropout] x 3: the first pair is split, the odd third Linear stays replicated
    assert {k: type(v).__name__ for k, v in mlp_plan.items()} == {"body.0": "ColwiseParallel",
                                                                   "body.3": "RowwiseParallel"}
    with pytest.raises(ValueError, match="hidden layers"):
        tensor_parallel_plan(build_model({**MLP, "hidden_dims": [16]}), 2)
