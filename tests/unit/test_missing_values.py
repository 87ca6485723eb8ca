"""Tier 1: nulls end to end. `raysys data import` keeps them and marks their columns nullable; the
Preprocessor imputes (train median / most frequent category, fitted on train only) and adds an is-missing
indicator per nullable numeric feature; its JSON state travels through the registry; the endpoint's parsing
accepts JSON null for a nullable feature and imputes it the same way, and answers 422 for any other null."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys.config import ModelConfig
from raysys.data import DatasetSchema, Preprocessor, SchemaError, read_split
from raysys.data.byod import import_parquet
from raysys.models import build_model, model_spec
from raysys.registry import Registry
from serve.parsing import RequestError, validate_request

N = 600


def _raw_table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10, 1, N)
    age = rng.integers(18, 90, N).astype(float)
    city = rng.choice(["lyon", "nice", "paris"], N, p=[0.2, 0.2, 0.6])
    label = np.where(income > np.median(income), "high", "low")
    income_nulls, age_nulls, city_nulls = rng.random(N) < 0.2, rng.random(N) < 0.1, rng.random(N) < 0.15
    return pa.table({
        "income": pa.array(income, mask=income_nulls),
        "age": pa.array(age.astype(np.int64), mask=age_nulls),  # an integer column with nulls
        "city": pa.array(city.tolist(), mask=city_nulls),
        "height": pa.array(rng.normal(170, 10, N)),  # no nulls: stays non-nullable
        "label": pa.array(label.tolist()),
    })


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("nulls")
    pq.write_table(_raw_table(), d / "raw.parquet")
    schema = import_parquet(d / "raw.parquet", d / "ds", label="label")
    return d / "ds", schema


def test_import_keeps_nulls_and_marks_their_columns_nullable(imported):
    root, schema = imported
    assert {f.name: f.nullable for f in schema.features} == {"income": True, "age": True, "city": True,
                                                              "height": False}
    assert schema.missing_indicators == ["income", "age"] and schema.num_model_numeric == 5
    assert DatasetSchema.load(root) == schema
    assert "nullable" not in json.loads(schema.to_json())["features"][3]  # written only when set
    assert read_split(root, "train").column("income").null_count > 0
    assert schema.feature("city").categories == ["lyon", "nice", "paris"]


def test_import_can_refuse_nulls_and_always_refuses_a_null_label(tmp_path):
    pq.write_table(_raw_table(), tmp_path / "raw.parquet")
    with pytest.raises(SchemaError, match="income: .* null values") as e:
        import_parquet(tmp_path / "raw.parquet", tmp_path / "out", label="label", missing="refuse")
    assert e.value.field == "income"
    t = _raw_table()
    t = t.set_column(4, "label", pa.array(t.column("label").to_pylist()[:-1] + [None]))
    pq.write_table(t, tmp_path / "nolabel.parquet")
    with pytest.raises(SchemaError, match="label: 1 rows have no label"):
        import_parquet(tmp_path / "nolabel.parquet", tmp_path / "out2", label="label")


def test_preprocessor_imputes_with_train_statistics_and_adds_indicators(imported):
    root, schema = imported
    pre = Preprocessor.fit_split(schema, root)
    train = read_split(root, "train")
    income = train.column("income").to_numpy(zero_copy_only=False)
    assert pre.fill["income"] == pytest.approx(float(np.nanmedian(income)))  # train only
    cities = [c for c in train.column("city").to_pylist() if c is not None]
    assert pre.fill["city"] == max(set(cities), key=cities.count)
    test = read_split(root, "test")
    x_num, x_cat, y = pre.transform_table(test)
    assert x_num.shape == (test.num_rows, 5) and np.isfinite(x_num).all()
    null_income = test.column("income").is_null().to_numpy(zero_copy_only=False)
    assert null_income.any()
    assert np.array_equal(x_num[:, 3], null_income.astype(np.float32))  # the income indicator
    j = [f.name for f in schema.numeric].index("income")
    expected = (pre.fill["income"] - pre.mean[j]) / pre.std[j]
    assert np.allclose(x_num[null_income, j], expected, atol=1e-5)
    null_city = test.column("city").is_null().to_numpy(zero_copy_only=False)
    assert (x_cat[null_city, 0] == schema.feature("city").categories.index(pre.fill["city"])).all()
    raw = pre.raw_numeric(test)
    assert np.isfinite(raw).all() and raw.shape == (test.num_rows, 3)
    # the model takes the indicator columns
    model = build_model(model_spec(schema, ModelConfig(hidden_dims=[8])))
    assert model(torch.from_numpy(x_num), torch.from_numpy(x_cat)).shape == (test.num_rows, 2)


def test_state_round_trips_through_the_registry_and_old_states_still_load(imported, tmp_path):
    root, schema = imported
    pre = Preprocessor.fit_split(schema, root)
    spec = model_spec(schema, ModelConfig(hidden_dims=[8]))
    reg = Registry(str(tmp_path / "reg"))
    v = reg.register("m", state_dict=build_model(spec), model_spec=spec, schema=schema, preprocessor=pre,
                     metrics={}, config={}, lineage={})
    loaded = reg.load("m", v)
    assert loaded.preprocessor.fill == pre.fill and loaded.schema.missing_indicators == ["income", "age"]
    assert loaded.preprocessor.to_dict() == json.loads(json.dumps(pre.to_dict()))
    # a state saved before nulls were allowed: mean/std only, for a schema without nullable features
    old_schema = DatasetSchema.model_validate({**json.loads(schema.to_json()), "features": [
        {k: v for k, v in f.items() if k != "nullable"} for f in json.loads(schema.to_json())["features"]]})
    old = Preprocessor.from_dict(old_schema, {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    assert old.fill == {} and old.standardize(np.ones((2, 3), np.float32)).shape == (2, 3)
    with pytest.raises(ValueError, match="missing_indicators"):
        Preprocessor.from_dict(schema, {**pre.to_dict(), "missing_indicators": ["age"]})


def test_endpoint_parsing_imputes_json_null_like_training_and_refuses_other_nulls(imported):
    root, schema = imported
    pre = Preprocessor.fit_split(schema, root)
    row = {"income": None, "age": 40, "city": None, "height": 171.5}
    got = validate_request(json.dumps({"instances": [row]}), schema, pre, max_instances=10)
    table = pa.table({"income": pa.array([None], pa.float64()), "age": pa.array([40], pa.int64()),
                      "city": pa.array([None], pa.string()), "height": pa.array([171.5])})
    x_num, x_cat = pre.transform_table(table, with_label=False)
    assert np.allclose(got.x_num, x_num) and np.array_equal(got.x_cat, x_cat)
    assert got.x_num[0, 3] == 1.0 and got.x_num[0, 4] == 0.0  # income missing, age present
    assert got.x_num_raw[0, 0] == pytest.approx(pre.fill["income"])  # the monitor sees the imputed value
    cols = validate_request(json.dumps({"columns": ["income", "age", "city", "height"],
                                        "data": [[1000.0, None, "nice", 160.0]]}), schema, pre, max_instances=10)
    assert cols.x_num[0, 4] == 1.0 and cols.x_num_raw[0, 1] == pytest.approx(pre.fill["age"])
    with pytest.raises(RequestError) as e:
        validate_request(json.dumps({"instances": [{**row, "height": None}]}), schema, pre, max_instances=10)
    assert e.value.status == 422 and e.value.field == "instances[0].height" and "not nullable" in e.value.message
    with pytest.raises(RequestError) as e:
        validate_request('{"instances": [{"income": NaN, "age": 1, "city": "nice", "height": 1}]}', schema, pre,
                         max_instances=10)
    assert e.value.field == "instances[0].income"  # NaN is still refused: only null means missing


def test_the_quality_report_counts_the_nulls_and_runs_every_check_on_them(imported):
    from raysys.config import QualityConfig
    from raysys.data.quality import check_dataset

    root, schema = imported
    report = check_dataset(root, QualityConfig())
    nulls = report["checks"]["missing_values"]["details"]
    assert set(nulls) == {"income", "age", "city"}
    assert 0.1 < nulls["income"]["train"]["share"] < 0.3 and report["checks"]["missing_values"]["level"] is None
    assert all(c["level"] != "off" and c["value"] is not None for c in report["checks"].values())
