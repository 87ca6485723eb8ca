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


# ----- against scikit-learn on the same inputs -----------------------------------------------------------

sk = pytest.importorskip("sklearn.metrics")


def _random_case(seed: int, n: int = 300, k: int = 4, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    if ties:
        logits = np.round(logits, 1)  # many equal scores: exercises the tie-averaged ranks
    from raysys.evaluate import softmax

    return y, softmax(logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    y, p = _random_case(seed)
    pred = p.argmax(1)
    m = classification_metrics(y, pred, 4)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    prec, rec, f1, sup = sk.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose(m["per_class"]["precision"], prec)
    np.testing.assert_allclose(m["per_class"]["recall"], rec)
    np.testing.assert_allclose(m["per_class"]["f1"], f1)
    assert m["support"] == sup.tolist()
    for avg, key in [("precision", "macro_precision"), ("recall", "macro_recall"), ("f1", "macro_f1")]:
        want = getattr(sk, f"{avg}_score" if avg != "f1" else "f1_score")(y, pred, average="macro", zero_division=0)
        assert m[key] == pytest.approx(want)
    np.testing.assert_array_equal(m["confusion_matrix"], sk.confusion_matrix(y, pred, labels=range(4)))


def test_macro_with_a_class_absent_matches_sklearn_default_labels():
    y = np.array([0, 0, 1, 1, 1, 0])
    pred = np.array([0, 1, 1, 1, 0, 0])  # class 2 and 3 absent from both
    m = classification_metrics(y, pred, 4)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))
    assert m["macro_precision"] == pytest.approx(sk.precision_score(y, pred, average="macro", zero_division=0))


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_ovr_matches_sklearn(ties):
    from raysys.evaluate import roc_auc_ovr

    y, p = _random_case(3, ties=ties)
    got = roc_auc_ovr(y, p, 4)
    assert got["macro"] == pytest.approx(sk.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for k in range(4):
        assert got["per_class"][k] == pytest.approx(sk.roc_auc_score(y == k, p[:, k]))
    # a class with no rows has no AUC and is left out of the macro average
    y2 = np.where(y == 3, 0, y)
    got2 = roc_auc_ovr(y2, p, 4)
    assert got2["per_class"][3] is None
    assert got2["macro"] == pytest.approx(np.mean([sk.roc_auc_score(y2 == k, p[:, k]) for k in range(3)]))


def test_calibration_matches_sklearn_calibration_curve_and_hand_ece():
    from sklearn.calibration import calibration_curve

    from raysys.evaluate import calibration

    y, p = _random_case(4, n=500)
    cal = calibration(y, p, num_bins=10)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    full = [b for b in cal["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in full], prob_true)
    np.testing.assert_allclose([b["confidence"] for b in full], prob_pred)
    assert sum(b["count"] for b in cal["bins"]) == 500
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in full)
    assert cal["ece"] == pytest.approx(ece)
    assert cal["mce"] == pytest.approx(max(abs(b["accuracy"] - b["confidence"]) for b in full))
    # a perfectly confident, always-right model is perfectly calibrated
    perfect = calibration([0, 1, 2], np.eye(3), num_bins=5)
    assert perfect["ece"] == 0.0 and perfect["bins"][-1]["count"] == 3


def test_log_loss_matches_sklearn():
    y, p = _random_case(5)
    logits = np.log(p).astype(np.float32)
    m = evaluate_model(_Echo(), logits, np.zeros((len(y), 1), dtype=np.int64), y, 4)
    assert m["log_loss"] == pytest.approx(sk.log_loss(y, p, labels=range(4)), rel=1e-5)


def test_slice_metrics_by_hand_and_worst_flagged():
    from raysys.evaluate import slice_metrics

    cols = {"color": np.array(["r", "r", "g", "g", "g", "b"]), "x": np.array([0.1, 1.5, 2.5, -1.0, 0.5, 3.0])}
    y = np.array([0, 1, 0, 1, 0, 1])
    pred = np.array([0, 1, 1, 0, 0, 1])
    out = slice_metrics(cols, y, pred, 2, {"numeric_bins": {"x": [0.0, 2.0]}, "min_rows": 2},
                        categorical=["color"])
    by = {s["slice"]: s for s in out["slices"]}
    assert set(by) == {"color = r", "color = g", "color = b", "x < 0", "0 <= x < 2", "x >= 2"}
    assert by["color = r"]["accuracy"] == 1.0 and by["color = g"]["accuracy"] == pytest.approx(1 / 3)
    assert by["x < 0"]["num_rows"] == 1 and by["0 <= x < 2"]["num_rows"] == 3
    assert by["x >= 2"]["accuracy"] == 0.5
    # worst = lowest accuracy with >= min_rows rows ("x < 0" has accuracy 0 but only one row)
    assert out["worst"]["slice"] == "color = g" and by["color = g"]["worst"]
    assert sum(s["worst"] for s in out["slices"]) == 1
    q = slice_metrics(cols, y, pred, 2, {"categorical": [], "num_quantile_bins": 2})
    assert sum(s["num_rows"] for s in q["slices"]) == 6 and all(s["feature"] == "x" for s in q["slices"])
    with pytest.raises(ValueError, match="no column 'nope'"):
        slice_metrics(cols, y, pred, 2, {"categorical": ["nope"]})
    json.dumps(out)


def test_full_evaluation_has_every_section():
    from raysys.evaluate import full_evaluation, measure_latency, softmax

    rng = np.random.default_rng(0)
    x_num = rng.standard_normal((40, 3)).astype(np.float32)
    x_cat = np.zeros((40, 1), dtype=np.int64)
    y = x_num.argmax(1)
    teacher_logits = x_num.copy()
    teacher_logits[:4] = -teacher_logits[:4]  # the teacher disagrees on (up to) 4 rows
    m = full_evaluation(_Echo(), x_num, x_cat, y, 3, teacher_logits=teacher_logits,
                        raw_columns={"c": np.array(["a", "b"] * 20)}, categorical=["c"], latency_repeats=5,
                        latency_batch_size=8)
    assert m["accuracy"] == 1.0
    assert m["roc_auc"]["macro"] == pytest.approx(sk.roc_auc_score(y, softmax(x_num), multi_class="ovr"))
    assert m["teacher_agreement"] == pytest.approx((teacher_logits.argmax(1) == y).mean())
    assert {s["slice"] for s in m["slices"]["slices"]} == {"c = a", "c = b"}
    lat = m["latency"]
    assert lat["per_batch_ms"]["batch_size"] == 8 and lat["per_row_ms"]["p99"] >= lat["per_row_ms"]["p50"] > 0
    assert m["num_parameters"] == 0
    json.loads(json.dumps(m))
    with pytest.raises(ValueError):
        measure_latency(_Echo(), x_num[:0], x_cat[:0])


class _Recorder(nn.Module):
    """Records the first row index of every call (x_num[:, 0] holds the row number)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def forward(self, x_num, x_cat):
        self.calls.append((int(x_num[0, 0]), len(x_num)))
        return x_num


def test_compare_latency_interleaves_the_same_rows_for_every_model():
    from raysys.evaluate import compare_latency

    x_num = np.arange(100, dtype=np.float32)[:, None].repeat(2, 1)
    x_cat = np.zeros((100, 1), dtype=np.int64)
    a, b = _Recorder(), _Recorder()
    out = compare_latency({"a": a, "b": b}, x_num, x_cat, batch_sizes=(1, 8), rounds=3, block=4, warmup=2)
    # every model sees the same slices, in the same order: (warmup + block) calls per round and batch size
    assert a.calls == b.calls and len(a.calls) == 2 * 3 * (2 + 4)
    assert [size for _, size in a.calls] == [1] * 18 + [8] * 18
    assert all(0 <= start <= 100 - size for start, size in a.calls)
    for name in ("a", "b"):
        for key, size in (("batch1", 1), ("batch8", 8)):
            row = out["per_row_ms"][name][key]
            assert row["batch_size"] == size and row["p99"] >= row["p50"] > 0
    assert out["threads"] == torch.get_num_threads() and out["block"] == 4
    json.loads(json.dumps(out))
    big = compare_latency({"a": _Recorder()}, x_num[:5], x_cat[:5], batch_sizes=(64,), rounds=1, block=1)
    assert big["per_row_ms"]["a"]["batch64"]["batch_size"] == 5  # capped at the rows there are
    with pytest.raises(ValueError, match="no models"):
        compare_latency({}, x_num, x_cat)
    with pytest.raises(ValueError, match="no rows"):
        compare_latency({"a": a}, x_num[:0], x_cat[:0])
    with pytest.raises(ValueError, match=">= 1"):
        compare_latency({"a": a}, x_num, x_cat, batch_sizes=(0,))
