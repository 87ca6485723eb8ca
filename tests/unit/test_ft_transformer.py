"""Tier 1: the FT-Transformer teacher, its spec, and the process-group-free parts of pipeline and tensor
parallelism (stage split, parameter balance, TP plans). No Ray, no process group."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from raysys.config import FT_SIZES, ModelConfig, preset
from raysys.data.schema import DatasetSchema
from raysys.models import FAMILIES, FT_PRESETS, build_model, model_spec, num_parameters
from raysys.models.ft_transformer import FTTransformer
from raysys.models.mlp import ACTIVATIONS, CategoricalEmbeddings, TabularMLP
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
    # activation gelu (what specs meant before the field existed): byte-for-byte the spec earlier versions wrote
    mlp = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3, activation="gelu"))
    assert mlp == {"family": "mlp", "num_numeric": 5, "cardinalities": [4, 3], "num_classes": 3,
                   "hidden_dims": [16], "embed_dim": 3, "dropout": 0.0}
    assert model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3)) == {**mlp, "activation": "relu"}
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


def test_model_config_chooses_the_family():
    """The config alone picks the family and the FT size, with overrides; mlp configs keep their spec."""
    schema = _schema()
    assert set(FT_SIZES) == set(FT_PRESETS)  # config.py cannot import torch: the names are kept equal here
    ft = model_spec(schema, ModelConfig(family="ft_transformer", size="small", num_blocks=2, dropout=0.1))
    assert ft == {"family": "ft_transformer", "num_numeric": 5, "cardinalities": [4, 3], "num_classes": 3,
                  **FT_PRESETS["small"], "num_blocks": 2, "dropout": 0.1}
    assert model_spec(schema, ModelConfig(family="ft_transformer"))["d_model"] == FT_PRESETS["tiny"]["d_model"]
    over = model_spec(schema, ModelConfig(family="ft_transformer", d_model=48, num_heads=6, ffn_mult=3))
    assert (over["d_model"], over["num_heads"], over["ffn_mult"]) == (48, 6, 3.0)
    model = build_model(over)
    assert isinstance(model, FTTransformer) and model.blocks[0].mlp.fc1.out_features == 144
    # an mlp teacher's settings are ignored by an ft_transformer, so switching the family is one key
    teacher = preset("demo").teacher.model_copy(update={"family": "ft_transformer"})
    assert model_spec(schema, teacher)["family"] == "ft_transformer"
    # an explicit family argument still wins over the config (the benchmark's and tests' old call style)
    assert model_spec(schema, ModelConfig(), "mlp")["family"] == "mlp"


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="size: only apply to family 'ft_transformer'"):
        ModelConfig(size="small")
    with pytest.raises(ValueError, match="d_model, num_heads: only apply"):
        ModelConfig(d_model=64, num_heads=4)
    with pytest.raises(ValueError, match="num_heads: 4 does not divide d_model 30"):
        ModelConfig(family="ft_transformer", d_model=30, num_heads=4)
    for bad in ({"family": "gbdt"}, {"family": "ft_transformer", "size": "huge"}, {"activation": "tanh"},
                {"family": "ft_transformer", "ffn_mult": 0}):
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else list(bad)[-1]):
            ModelConfig(**bad)
    with pytest.raises(ValueError, match="model.activation"):
        build_model({"family": "mlp", "num_numeric": 2, "cardinalities": [], "num_classes": 2, "hidden_dims": [4],
                     "activation": "tanh"})


def _per_feature_state(model: TabularMLP, cards) -> dict[str, torch.Tensor]:
    """The state dict the earlier layout (one nn.Embedding per feature in a ModuleList) had for `model`."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("embeddings.")}
    start = 0
    for j, c in enumerate(cards):
        state[f"embeddings.{j}.weight"] = model.embeddings.weight[start:start + c].detach().clone()
        start += c
    return state


def test_mlp_one_embedding_table_equals_per_feature_lookups_and_loads_old_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model(MLP).eval()
    emb = model.embeddings
    assert isinstance(emb, CategoricalEmbeddings) and isinstance(emb, torch.nn.ModuleList)
    assert list(emb.state_dict()) == ["weight"] and emb.weight.shape == (4 + 3 + 6, 4)
    x_num, x_cat = _batch()
    # the fused lookup is the per-feature lookups side by side (what the MLP pipeline stage computes)
    per_feature = torch.cat([e(x_cat[:, j]) for j, e in enumerate(emb)], 1)
    torch.testing.assert_close(emb(x_cat), per_feature, rtol=0, atol=0)
    assert [e.embedding_dim for e in emb] == [4, 4, 4] and len(emb) == 3
    # feature j's index i is row offset_j + i: the same index of different features reads different rows
    torch.testing.assert_close(emb[1](torch.tensor([2])), emb.weight[4 + 2][None], rtol=0, atol=0)
    # weights registered before the one-table layout load (strictly) and give the same logits
    old = _per_feature_state(model, [4, 3, 6])
    save_file(old, str(tmp_path / "old.safetensors"))
    other = build_model(MLP).eval()
    other.load_state_dict(load_file(str(tmp_path / "old.safetensors")), strict=True)
    torch.testing.assert_close(other(x_num, x_cat), model(x_num, x_cat), rtol=0, atol=0)
    # a half-old state dict is not silently patched up
    del old["embeddings.2.weight"]
    with pytest.raises(RuntimeError, match="embeddings"):
        build_model(MLP).load_state_dict(old, strict=True)


def test_mlp_without_categorical_features_and_copies():
    import copy

    spec = {**MLP, "cardinalities": []}
    model = build_model(spec).eval()
    assert model.embeddings.weight is None and len(model.embeddings) == 0
    assert not any(k.startswith("embeddings") for k in model.state_dict())
    x_num = torch.randn(3, 5)
    assert model(x_num, torch.zeros(3, 0, dtype=torch.int64)).shape == (3, 3)
    # a deep copy's feature views read the copy's table, not the original's
    full = build_model(MLP)
    twin = copy.deepcopy(full)
    with torch.no_grad():
        twin.embeddings.weight.add_(1.0)
    assert twin.embeddings[0]._owner is twin.embeddings
    assert not torch.equal(twin.embeddings[0](torch.tensor([0])), full.embeddings[0](torch.tensor([0])))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activation_is_in_the_spec_and_missing_means_exact_gelu(activation):
    schema = _schema()
    spec = model_spec(schema, ModelConfig(hidden_dims=[8, 8], activation=activation))
    model = build_model(spec)
    acts = [m for m in model.body if not isinstance(m, (torch.nn.Linear, torch.nn.Dropout))]
    assert len(acts) == 2 and all(type(a) is type(ACTIVATIONS[activation]()) for a in acts)
    if activation == "gelu_tanh":
        assert acts[0].approximate == "tanh"
    # a stored spec without the key (written before the field existed) builds the exact-GELU model it was
    legacy = build_model({k: v for k, v in spec.items() if k != "activation"})
    assert all(isinstance(m, torch.nn.GELU) and m.approximate == "none" for m in legacy.body
               if not isinstance(m, torch.nn.Linear))
