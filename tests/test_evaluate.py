"""Tier 1: offline metrics on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from raysys.evaluate import agreement, classification_metrics, confusion_matrix, evaluate_model


def test_perfect_predictions():
    y = [0, 1, 2, 2, 1]
    m = classification_metrics(y, y, 3)
    assert m["accuracy"] == 1.0
    assert m["macro_precision"] == m["macro_recall"] == m["macro_f1"] == 1.0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert m["support"] == m["per_class"]["support"] == [1, 2, 2]
    assert m["num_samples"] == 5


def test_all_wrong():
    m = classification_metrics([0, 1, 2], [1, 2, 0], 3)
    assert m["accuracy"] == 0.0
    assert m["macro_precision"] == m["macro_recall"] == m["macro_f1"] == 0.0
    assert m["confusion_matrix"] == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_known_confusion_matrix():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 0, 2, 2]
    m = classification_metrics(y_true, y_pred, 3, class_names=["a", "b", "c"])
    # rows = true class
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 1, 0], [0, 0, 2]]
    # by hand: P = (2/3, 1/2, 2/3), R = (2/4, 1/2, 2/2), F1 = (4/7, 1/2, 4/5)
    assert m["per_class"]["precision"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert m["per_class"]["recall"] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert m["per_class"]["f1"] == pytest.approx([4 / 7, 1 / 2, 4 / 5])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_precision"] == pytest.approx(11 / 18)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(131 / 210)  # (4/7 + 1/2 + 4/5) / 3
    assert m["support"] == [4, 2, 2]
    assert m["classes"] == ["a", "b", "c"]
    json.dumps(m)


def test_class_never_predicted_counts_as_zero():
    # class 2 has support but is never predicted: precision 0 (zero division), recall 0, F1 0
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], 3)
    assert m["per_class"]["precision"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert m["per_class"]["recall"] == pytest.approx([1.0, 1.0, 0.0])
    assert m["per_class"]["f1"] == pytest.approx([1.0, 0.5, 0.0])
    assert m["macro_f1"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in (m["macro_precision"], m["macro_recall"], m["macro_f1"]))


def test_class_absent_everywhere_is_left_out_of_macro_averages():
    m = classification_metrics([0, 1, 1], [0, 1, 1], 4)
    assert m["macro_f1"] == 1.0
    assert m["per_class"]["f1"] == [1.0, 1.0, 0.0, 0.0]
    assert m["support"] == [1, 2, 0, 0]
    assert len(m["confusion_matrix"]) == 4


def test_numpy_inputs_and_json():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(y, p, 4)
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert np.array_equal(np.array(m["confusion_matrix"]), confusion_matrix(y, p, 4))
    assert sum(map(sum, m["confusion_matrix"])) == 200
    json.loads(json.dumps(m))


def test_bad_inputs():
    with pytest.raises(ValueError, match="y_pred"):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([0, 5], [0, 1], 2)
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([], [], 2)
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics([0], [0], 2, class_names=["a"])


def test_agreement():
    assert agreement([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    assert agreement(np.array([1, 1]), np.array([1, 1])) == 1.0
    with pytest.raises(ValueError):
        agreement([0, 1], [0])
    with pytest.raises(ValueError):
        agreement([], [])


class _Echo(nn.Module):
    """Logits = the numeric features, so the predictions are known in advance."""

    def forward(self, x_num, x_cat):
        return x_num


def test_evaluate_model():
    x_num = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    x_cat = np.zeros((4, 1), dtype=np.int64)
    y = np.array([0, 1, 1, 0])
    m = evaluate_model(_Echo(), x_num, x_cat, y, 3, batch_size=3)  # batch_size < rows: exercises batching
    ref = classification_metrics(y, [0, 1, 2, 0], 3)
    assert {k: m[k] for k in ref} == ref
    # log loss by hand: mean of -log softmax(x)[y]
    want = np.mean([-math.log(math.exp(r[t]) / sum(math.exp(v) for v in r)) for r, t in zip(x_num.tolist(), y)])
    assert m["log_loss"] == pytest.approx(want, rel=1e-5)
    json.dumps(m)
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_model(_Echo(), x_num, x_cat, y, 2)


def test_evaluate_model_on_real_model_agrees_with_argmax():
    from raysys.models import build_model

    torch.manual_seed(0)
    spec = {"family": "mlp", "num_numeric": 2, "cardinalities": [3], "num_classes": 3, "hidden_dims": [8]}
    model = build_model(spec)
    rng = np.random.default_rng(0)
    x_num = rng.standard_normal((50, 2)).astype(np.float32)
    x_cat = rng.integers(0, 3, (50, 1))
    y = rng.integers(0, 3, 50)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_num), torch.from_numpy(x_cat)).argmax(1).numpy()
    assert evaluate_model(model, x_num, x_cat, y, 3)["accuracy"] == pytest.approx((pred == y).mean())
