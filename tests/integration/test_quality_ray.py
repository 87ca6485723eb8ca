"""Tier 3 (issue 23): a table with nulls, imported, checked and trained on with Ray Train (the nulls reach the
workers through Ray Data and are imputed there), registered with its data quality summary on the card, and a
request with JSON null scored by the registered model the way the endpoint parses it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.data import SyntheticTask
from raysys.data.byod import import_parquet
from raysys.models import predict_logits
from raysys.registry import Registry
from serve.parsing import validate_request

pytestmark = pytest.mark.integration


def _table_with_nulls(cfg, n: int) -> pa.Table:
    task = SyntheticTask(cfg.data)
    t = task.sample(n, [cfg.data.seed, 1])
    rng = np.random.default_rng(3)
    x0 = t.column("x0").to_numpy()
    c0 = t.column("c0").to_pylist()
    t = t.set_column(t.schema.get_field_index("x0"), "x0", pa.array(x0, mask=rng.random(n) < 0.15))
    t = t.set_column(t.schema.get_field_index("c0"), "c0", pa.array([None if m else v for v, m in
                                                                    zip(c0, rng.random(n) < 0.1)]))
    return t.set_column(t.schema.get_field_index("label"), "label",
                        pa.array([task.classes[i] for i in t.column("label").to_pylist()]))


@pytest.mark.timeout(600)
def test_nulls_from_import_through_ray_train_to_a_scored_request(ray_cluster, tiny_cfg, tmp_path):
    from raysys.workflow.stages import absolute, stage_data, stage_quality, stage_teacher

    pq.write_table(_table_with_nulls(tiny_cfg, 4000), tmp_path / "raw.parquet")
    schema = import_parquet(tmp_path / "raw.parquet", tmp_path / "ds", label="label")
    assert schema.missing_indicators == ["x0"] and schema.feature("c0").nullable
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.root, cfg.data.source = str(tmp_path / "ds"), "parquet"
    cfg.train.num_epochs = 2
    cfg = absolute(cfg)
    prep = stage_data(cfg)
    summary = stage_quality(cfg, prep)
    assert summary["status"] in ("ok", "warn") and summary["values"]["missing_values"] > 0.1
    _, version, metrics = stage_teacher(cfg, prep)
    assert metrics["accuracy"] > 0.4  # 4 classes; 2 epochs on 2,800 rows

    loaded = Registry(cfg.registry_uri).load(cfg.model_name + "-teacher", version)
    assert loaded.preprocessor.fill.keys() == {"x0", "c0"}
    card = loaded.model_card
    assert card["data"]["quality"]["status"] == summary["status"] and card["lineage"]["data_quality"]
    row = {f.name: (None if f.name in ("x0", "c0") else (1.0 if f.kind == "numeric" else f.categories[0]))
           for f in loaded.schema.features}
    req = validate_request(json.dumps({"instances": [row]}), loaded.schema, loaded.preprocessor, max_instances=4)
    probs = predict_logits(loaded.model, req.x_num, req.x_cat).softmax(1).numpy()
    assert probs.shape == (1, 4) and np.isfinite(probs).all()
