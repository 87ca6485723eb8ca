"""Tier 1: the KD loss and the student loop, no Ray."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO

from raysys.distill import StudentData, fit_student, kd_loss
from raysys.models import build_model

# a 2 x 3 batch, worked out by hand below
S = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
T_ = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
LABELS = [0, 2]


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    z = sum(e)
    return [x / z for x in e]


def _hand_kd(temp, alpha):
    # KL(p_t || p_s) = sum_j p_t[j] * (log p_t[j] - log p_s[j]), averaged over the 2 rows
    kl = 0.0
    for rs, rt in zip(S, T_):
        ps, pt = _softmax(rs, temp), _softmax(rt, temp)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    kl /= len(S)
    ce = sum(-math.log(_softmax(r, 1.0)[y]) for r, y in zip(S, LABELS)) / len(S)
    return alpha * temp * temp * kl + (1 - alpha) * ce, temp * temp * kl, ce


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_kd_loss_matches_hand_computation():
    expected, soft_exp, hard_exp = _hand_kd(2.0, 0.5)
    # the same numbers, written out: KL = 0.0224727, T^2 KL = 0.0898908, CE = 0.9328130
    assert expected == pytest.approx(0.5113519, abs=1e-6)
    loss, soft, hard = kd_loss(_t(S), _t(T_), _t(LABELS, torch.int64), 2.0, 0.5, return_components=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert soft.item() == pytest.approx(soft_exp, abs=1e-6)
    assert hard.item() == pytest.approx(hard_exp, abs=1e-6)
    # other (T, alpha) pairs agree with the hand formula too
    for temp, alpha in [(1.0, 0.3), (4.0, 0.9), (0.5, 1.0)]:
        got = kd_loss(_t(S), _t(T_), _t(LABELS, torch.int64), temp, alpha).item()
        assert got == pytest.approx(_hand_kd(temp, alpha)[0], rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_teacher_is_ignored():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    ce = F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 3.0, 0.0), ce)
    assert torch.allclose(kd_loss(s, t * 7 + 1, y, 3.0, 0.0), ce)


def test_soft_term_zero_when_student_equals_teacher():
    s = torch.randn(8, 4)
    _, soft, _ = kd_loss(s, s.clone(), torch.zeros(8, dtype=torch.int64), 3.0, 1.0, return_components=True)
    assert soft.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_has_t_squared_scale():
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.zeros(4, dtype=torch.int64)
    grads = {}
    for temp in (1.0, 2.0, 10.0, 20.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, y, temp, 1.0).backward()
        # d/ds [T^2 KL(p_t || p_s) / B] = T * (softmax(s/T) - softmax(t/T)) / B
        want = temp * (torch.softmax(s0 / temp, 1) - torch.softmax(t / temp, 1)) / len(s0)
        assert torch.allclose(s.grad, want, atol=1e-6)
        assert t.grad is None
        grads[temp] = s.grad.norm().item()
    # thanks to T^2 the soft gradient stays the same size as T grows (without it: 4x smaller per doubling)
    assert grads[20.0] / grads[10.0] == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("temp, alpha, name", [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"),
                                               (float("nan"), 0.5, "temperature"), (2.0, -0.1, "alpha"),
                                               (2.0, 1.5, "alpha"), (2.0, float("nan"), "alpha")])
def test_bad_arguments_raise_value_error(temp, alpha, name):
    with pytest.raises(ValueError, match=name):
        kd_loss(_t(S), _t(T_), _t(LABELS, torch.int64), temp, alpha)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 2.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 2.0, 0.5)


# ----- the student loop -----

SPEC = {"family": "mlp", "num_numeric": 4, "cardinalities": [3, 2], "num_classes": 3, "hidden_dims": [16],
        "embed_dim": 2, "dropout": 0.0}


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    x_num = rng.standard_normal((n, 4)).astype(np.float32)
    x_cat = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], 1).astype(np.int64)
    w = np.array([[2.0, -1.0, 0.0], [0.0, 2.0, -1.0], [-1.0, 0.0, 2.0], [1.0, 1.0, -2.0]])
    logits = x_num @ w + np.array([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])[x_cat[:, 0]]
    return x_num, x_cat, logits.argmax(1), (3.0 * logits).astype(np.float32)


def _data():
    x, c, y, t = _synthetic(800, 0)
    vx, vc, vy, _ = _synthetic(300, 1)
    return StudentData(x_num=x, x_cat=c, y=y, teacher_logits=t, val_x_num=vx, val_x_cat=vc, val_y=vy)


@pytest.fixture
def one_thread():
    # tiny models: one intra-op thread is faster and does not fight other test processes for the cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**kw):
    return {"student_spec": SPEC, "temperature": 2.0, "alpha": 0.7, "num_epochs": 6, "batch_size": 64,
            "lr": 1e-2, "seed": 0, **kw}


def test_fit_student_improves_accuracy_and_reports_each_epoch(one_thread):
    data = _data()
    torch.manual_seed(0)  # fit_student seeds the same way, so this is its starting point
    init = build_model(SPEC)
    with torch.no_grad():
        init_acc = (init(torch.from_numpy(data.val_x_num), torch.from_numpy(data.val_x_cat)).argmax(1).numpy()
                    == data.val_y).mean()
    reports = []
    fit = fit_student(_config(), data, lambda m, state: reports.append((m, state.weights)))
    assert [m["epoch"] for m, _ in reports] == list(range(1, 7))
    for m, sd in reports:
        assert set(m) >= {"val_accuracy", "val_loss", "train_loss", "train_soft", "train_hard"}
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
        assert sd is not None and set(sd) == set(init.state_dict())
    assert fit.metrics == fit.history[-1] == reports[-1][0]
    assert fit.metrics["val_accuracy"] > 0.85
    assert fit.metrics["val_accuracy"] > init_acc + 0.3
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    # the returned weights are the last epoch's and rebuild the same model
    model = build_model(SPEC)
    model.load_state_dict(fit.state_dict)
    for k, v in reports[-1][1].items():
        assert torch.equal(v, fit.state_dict[k])


def test_fit_student_is_deterministic_and_validates_config(one_thread):
    data = _data()
    a = fit_student(_config(num_epochs=2), data)
    b = fit_student(_config(num_epochs=2), data)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    with pytest.raises(ValueError, match="temperature"):
        fit_student(_config(temperature=0.0), data)
    with pytest.raises(ValueError, match="student_spec"):
        fit_student({k: v for k, v in _config().items() if k != "student_spec"}, data)
    with pytest.raises(ValueError, match="num_classes"):
        fit_student(_config(student_spec={**SPEC, "num_classes": 4}), data)


@pytest.mark.parametrize("transfer,hint", [(False, False), (True, True)])
def test_fit_student_resumed_from_a_saved_epoch_ends_as_the_uninterrupted_run(one_thread, tmp_path, transfer, hint):
    """A trial that crashed goes on from its last checkpoint: what `EpochState.resumable()` gives, saved to a
    file and loaded back, plus the weights, continues with the same batches and optimizer state."""
    from raysys.statefile import load_state, save_state

    data = _data()
    config = _config(num_epochs=5)
    if transfer:  # unlabeled transfer rows, their own shuffling stream
        x, c, _, t = _synthetic(400, 2)
        data = dataclasses.replace(data, transfer_x_num=x, transfer_x_cat=c, transfer_logits=t)
    if hint:  # the hint loss: a trained regressor is part of the state
        hints = np.random.default_rng(3).standard_normal((len(data.y), 8)).astype(np.float32)
        data = dataclasses.replace(data, teacher_hints=hints)
        config["hint_weight"] = 0.5
    full = fit_student(config, data)
    saved = {}

    def report(m, state):
        if m["epoch"] == 2:
            save_state(tmp_path / "resume.safetensors", state.resumable())
            saved["weights"] = state.weights
            raise KeyboardInterrupt  # the crash: nothing after epoch 2 runs

    with pytest.raises(KeyboardInterrupt):
        fit_student(config, data, report)
    resume = {**load_state(tmp_path / "resume.safetensors"), "weights": saved["weights"]}
    assert resume["epoch"] == 2
    rest = fit_student(config, data, resume=resume)
    assert [m["epoch"] for m in rest.history] == [3, 4, 5]
    assert rest.history == full.history[2:]
    assert all(torch.equal(rest.state_dict[k], full.state_dict[k]) for k in full.state_dict)
    with pytest.raises(ValueError, match="resume.epoch"):
        fit_student(config, data, resume={**resume, "epoch": 6})


def test_student_data_checks_shapes():
    x, c, y, t = _synthetic(10, 0)
    with pytest.raises(ValueError, match="teacher_logits"):
        StudentData(x_num=x, x_cat=c, y=y, teacher_logits=t[:5], val_x_num=x, val_x_cat=c, val_y=y)


def test_precompute_teacher_logits_is_eval_mode_batched_and_restores_mode():
    from raysys.distill import precompute_teacher_logits

    torch.manual_seed(0)
    teacher = build_model({**SPEC, "dropout": 0.5})
    teacher.train()
    x, c, _, _ = _synthetic(50, 3)
    got = precompute_teacher_logits(teacher, x, c, batch_size=7)
    assert teacher.training  # mode restored
    teacher.eval()
    with torch.no_grad():
        want = teacher(torch.from_numpy(x), torch.from_numpy(c)).numpy()
    assert got.dtype == np.float32 and got.shape == (50, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # dropout off: eval mode was used


# ----- hint loss, online teacher, selection rule, summary table, quantization -----


def test_hint_loss_by_hand_and_capture():
    from raysys.distill.kd import HiddenCapture, hint_loss, hint_width, supports_hint

    reg = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        reg.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[1.0, 0.0, 0.0]])
    # regressed = (1, 2, 3); squared errors (0, 4, 9) -> mean 13/3
    assert hint_loss(s, t, reg).item() == pytest.approx(13 / 3)
    model = build_model(SPEC)
    assert supports_hint(model) and hint_width(model) == 16
    x, c, _, _ = _synthetic(5, 0)
    with HiddenCapture(model) as cap:
        model(torch.from_numpy(x), torch.from_numpy(c))
    assert cap.value.shape == (5, 16)
    assert not model.body._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="hint_weight"):
        HiddenCapture(torch.nn.Linear(2, 2))


def test_fit_student_with_hint_loss(one_thread):
    data = _data()
    torch.manual_seed(5)
    teacher = build_model({**SPEC, "hidden_dims": [24]})
    from raysys.distill.kd import HiddenCapture

    with torch.no_grad(), HiddenCapture(teacher) as cap:
        teacher(torch.from_numpy(data.x_num), torch.from_numpy(data.x_cat))
    data.teacher_hints = cap.value.numpy()
    fit = fit_student(_config(num_epochs=3, hint_weight=0.5), data)
    plain = fit_student(_config(num_epochs=3), data)
    assert fit.metrics["val_accuracy"] > 0.8
    assert set(fit.state_dict) == set(plain.state_dict)  # the regressor is not part of the student
    assert any(not torch.equal(fit.state_dict[k], plain.state_dict[k]) for k in fit.state_dict)
    data.teacher_hints = None
    with pytest.raises(ValueError, match="hint_weight"):
        fit_student(_config(hint_weight=0.5), data)


def test_online_teacher_equals_precomputed_soft_targets(one_thread):
    data = _data()
    torch.manual_seed(9)
    teacher = build_model({**SPEC, "hidden_dims": [24]}).eval()
    from raysys.distill import precompute_teacher_logits

    data.teacher_logits = precompute_teacher_logits(teacher, data.x_num, data.x_cat)
    a = fit_student(_config(num_epochs=2), data)
    b = fit_student(_config(num_epochs=2), data, teacher=teacher)
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=1e-5, atol=1e-6)


def _row(i, acc, params, lat):
    return {"trial_id": f"t{i}", "best_val_accuracy": acc, "num_parameters": params, "latency_ms_per_row": lat}


def test_pareto_front_and_selection_rule():
    from raysys.distill import pareto_front, select_student

    rows = [_row(0, 0.90, 5000, 0.010), _row(1, 0.89, 800, 0.004), _row(2, 0.85, 800, 0.005),
            _row(3, 0.91, 9000, 0.020), _row(4, 0.80, 300, 0.003)]
    # t2 is dominated by t1 (same size, more accurate, faster); everything else trades something off
    assert pareto_front(rows) == [0, 1, 3, 4]
    # teacher 0.91, gap 0.02 -> floor 0.89: t0, t1 and t3 qualify, t1 is the smallest
    i, rule = select_student(rows, 0.91, 0.02)
    assert i == 1 and "smallest" in rule and "0.8900" in rule
    # gap 0 -> only t3 (0.91) qualifies
    assert select_student(rows, 0.91, 0.0)[0] == 3
    # nobody within the gap -> the most accurate
    i, rule = select_student(rows, 0.99, 0.01)
    assert i == 3 and "none qualified" in rule
    # equal size: the more accurate wins
    assert select_student([_row(0, 0.8, 10, 1.0), _row(1, 0.85, 10, 2.0)], 0.9, 0.5)[0] == 1


def test_summary_table_csv_and_markdown():
    import csv
    import io

    from raysys.distill import summary_table

    trials = [{**_row(0, 0.9, 5000, 0.01), "temperature": 2.0, "alpha": 0.5, "lr": 0.01, "hidden_dims": [32, 32],
               "pareto": True, "chosen": True, "epochs_run": 4, "best_epoch": 3, "stopped_early": False,
               "error": None},
              {**_row(1, 0.8, 300, 0.003), "temperature": 8.0, "alpha": 0.3, "lr": 0.003, "hidden_dims": [16],
               "pareto": True, "chosen": False, "epochs_run": 1, "best_epoch": 1, "stopped_early": True,
               "error": None}]
    csv_text, md = summary_table(trials)
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [r["trial_id"] for r in rows] == ["t1", "t0"]  # smallest first
    assert rows[1]["hidden_dims"] == "32x32" and rows[1]["chosen"] == "True"
    assert md.count("\n") == 4 and "| t0 |" in md and "yes" in md


def test_dynamic_int8_quantization_and_spec_round_trip():
    from raysys.models.quantize import DYNAMIC_INT8, apply_quantization, quantize_dynamic_int8, split_spec

    torch.manual_seed(0)
    model = build_model({**SPEC, "hidden_dims": [64, 32]}).eval()
    q = quantize_dynamic_int8(model)
    assert any("quantized.dynamic" in type(m).__module__ for m in q.modules())
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)  # untouched
    x, c, _, _ = _synthetic(200, 2)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(c))
        out = q(torch.from_numpy(x), torch.from_numpy(c))
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.95
    assert (out - ref).abs().max() < 0.1
    from raysys.evaluate import count_parameters

    assert count_parameters(q) == count_parameters(model) == sum(p.numel() for p in model.parameters())
    spec, quant = split_spec({**SPEC, "quantization": DYNAMIC_INT8})
    assert quant == DYNAMIC_INT8 and "quantization" not in spec
    with torch.no_grad():  # deterministic: quantizing the same float weights again gives the same model
        assert torch.equal(apply_quantization(model, quant)(torch.from_numpy(x), torch.from_numpy(c)), out)
    with pytest.raises(ValueError, match="quantization"):
        split_spec({**SPEC, "quantization": "fp4"})


# ----- unlabeled transfer rows (MUNGE) -----


def test_kd_loss_unlabeled_rows_get_the_soft_term_only():
    from raysys.distill.kd import IGNORE_INDEX

    # a third, unlabeled row joins the hand-computed batch: the hard term stays the 2 labeled rows' CE,
    # the soft term averages the KL over all 3 rows
    extra_s, extra_t = [0.0, 1.0, 2.0], [1.0, 1.0, -1.0]
    s3, t3 = _t(S + [extra_s]), _t(T_ + [extra_t])
    labels = _t(LABELS + [IGNORE_INDEX], torch.int64)
    temp, alpha = 2.0, 0.5
    _, soft2, hard2 = _hand_kd(temp, alpha)
    ps, pt = _softmax(extra_s, temp), _softmax(extra_t, temp)
    kl3 = sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    soft3 = (soft2 * 2 + temp * temp * kl3) / 3
    loss, soft, hard = kd_loss(s3, t3, labels, temp, alpha, return_components=True)
    assert hard.item() == pytest.approx(hard2, abs=1e-6)
    assert soft.item() == pytest.approx(soft3, abs=1e-6)
    assert loss.item() == pytest.approx(alpha * soft3 + (1 - alpha) * hard2, abs=1e-6)
    # no labeled row at all: the hard term is 0 (not NaN) and the gradient still flows through the soft term
    s_req = s3.clone().requires_grad_(True)
    loss, soft, hard = kd_loss(s_req, t3, torch.full((3,), IGNORE_INDEX), temp, alpha, return_components=True)
    assert hard.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert s_req.grad.abs().sum() > 0


def _with_transfer(data, m, seed=7):
    x, c, _, t = _synthetic(m, seed)
    return StudentData(x_num=data.x_num, x_cat=data.x_cat, y=data.y, teacher_logits=data.teacher_logits,
                       val_x_num=data.val_x_num, val_x_cat=data.val_x_cat, val_y=data.val_y,
                       transfer_x_num=x, transfer_x_cat=c, transfer_logits=t)


def test_student_data_checks_transfer_rows():
    data = _data()
    assert data.num_transfer == 0
    assert _with_transfer(data, 50).num_transfer == 50
    x, c, _, t = _synthetic(20, 3)
    common = dict(x_num=data.x_num, x_cat=data.x_cat, y=data.y, teacher_logits=data.teacher_logits,
                  val_x_num=data.val_x_num, val_x_cat=data.val_x_cat, val_y=data.val_y)
    with pytest.raises(ValueError, match="together"):
        StudentData(**common, transfer_x_num=x, transfer_x_cat=c)
    with pytest.raises(ValueError, match="transfer_logits"):
        StudentData(**common, transfer_x_num=x, transfer_x_cat=c, transfer_logits=t[:, :2])
    with pytest.raises(ValueError, match="transfer_x_cat"):
        StudentData(**common, transfer_x_num=x, transfer_x_cat=c[:10], transfer_logits=t)


def test_transfer_rows_are_ignored_without_kd_and_used_with_it(one_thread):
    data = _data()
    with_t = _with_transfer(data, 400)
    # alpha = 0 (the no-KD baseline) never sees the unlabeled rows: bit-identical to training without them
    a = fit_student(_config(num_epochs=2, alpha=0.0), data)
    b = fit_student(_config(num_epochs=2, alpha=0.0), with_t)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    # with KD they change the result, deterministically
    c = fit_student(_config(num_epochs=2), data)
    d = fit_student(_config(num_epochs=2), with_t)
    e = fit_student(_config(num_epochs=2), with_t)
    assert any(not torch.equal(c.state_dict[k], d.state_dict[k]) for k in c.state_dict)
    assert all(torch.equal(d.state_dict[k], e.state_dict[k]) for k in d.state_dict)


def test_transfer_rows_carry_the_teacher_to_a_data_limited_student(one_thread):
    # 20 labeled rows, a quarter of them mislabeled, are too few; 2000 unlabeled rows with the teacher's
    # logits teach the rule
    x, c, y, t = _synthetic(20, 0)
    y = y.copy()
    y[:5] = (y[:5] + 1) % 3
    vx, vc, vy, _ = _synthetic(400, 1)
    small = StudentData(x_num=x, x_cat=c, y=y, teacher_logits=t, val_x_num=vx, val_x_cat=vc, val_y=vy)
    cfg = _config(num_epochs=30, batch_size=4, temperature=2.0, alpha=0.9)
    labeled_only = fit_student(cfg, small).metrics["val_accuracy"]
    with_transfer = fit_student(cfg, _with_transfer(small, 2000)).metrics["val_accuracy"]
    assert with_transfer > 0.95
    assert with_transfer > labeled_only + 0.1


def _raw_table(n, seed):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    return pa.table({"a": rng.normal(10.0, 2.0, n), "b": rng.normal(-5.0, 0.5, n),
                     "color": pa.array(rng.choice(["red", "green", "blue"], n)),
                     "label": rng.integers(0, 2, n)})


def _raw_schema():
    from raysys.data import DatasetSchema
    from raysys.data.schema import FeatureSpec

    return DatasetSchema(features=[FeatureSpec(name="a", kind="numeric"), FeatureSpec(name="b", kind="numeric"),
                                   FeatureSpec(name="color", kind="categorical",
                                               categories=["red", "green", "blue"])],
                         label="label", classes=["no", "yes"])


def test_nearest_neighbours_match_brute_force():
    from raysys.distill.transfer import nearest_neighbours

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 5)).astype(np.float32)
    d = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.array_equal(nearest_neighbours(pts, pts, exclude_self=True, chunk=64), d.argmin(1))
    q = rng.normal(size=(40, 5)).astype(np.float32)
    dq = ((q[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(nearest_neighbours(q, pts, exclude_self=False), dq.argmin(1))


def test_munge_rows_stay_on_the_data_and_are_deterministic():
    from raysys.data import Preprocessor
    from raysys.distill.transfer import munge, munge_arrays

    schema, table = _raw_schema(), _raw_table(200, 0)
    pre = Preprocessor.fit(schema, table)
    rows = munge(table, schema, pre, 500, seed=3)
    assert rows.column_names == ["a", "b", "color"] and rows.num_rows == 500  # features only, no label
    assert rows.equals(munge(table, schema, pre, 500, seed=3))
    assert not rows.equals(munge(table, schema, pre, 500, seed=4))
    assert set(rows.column("color").to_pylist()) <= {"red", "green", "blue"}
    # no swaps: every new row is a copy of a training row
    copies = munge(table, schema, pre, 100, swap_prob=0.0, seed=1)
    src = {(a, b, c) for a, b, c in zip(*(table.column(k).to_pylist() for k in ("a", "b", "color")))}
    assert all(r in src for r in zip(*(copies.column(k).to_pylist() for k in ("a", "b", "color"))))
    # swaps move values towards a neighbour: new rows differ from the sources but stay in the data's range
    a = rows.column("a").to_numpy()
    assert len(set(a.tolist()) - {r[0] for r in src}) > 100
    lo, hi = table.column("a").to_numpy().min(), table.column("a").to_numpy().max()
    assert np.quantile(a, 0.01) > lo - 2.0 and np.quantile(a, 0.99) < hi + 2.0
    x_num, x_cat = munge_arrays(table, schema, pre, 50, seed=3)
    assert x_num.shape == (50, 2) and x_cat.shape == (50, 1) and x_num.dtype == np.float32
    with pytest.raises(ValueError, match="swap_prob"):
        munge(table, schema, pre, 10, swap_prob=1.5)
    with pytest.raises(ValueError, match="num_transfer_rows"):
        munge(table, schema, pre, -1)


def test_trial_spec_samples_mlp_sizes_and_refuses_other_families():
    from raysys.distill.sweep import trial_spec

    assert trial_spec(SPEC, {"student_width": 8, "student_depth": 3})["hidden_dims"] == [8, 8, 8]
    assert trial_spec(SPEC, {"temperature": 2.0}) == SPEC
    ft = {"family": "ft_transformer", "num_numeric": 4, "cardinalities": [3, 2], "num_classes": 3, "d_model": 8,
          "num_blocks": 1, "num_heads": 2, "ffn_mult": 2.0, "dropout": 0.0}
    assert trial_spec(ft, {"temperature": 2.0}) == ft  # a grid over T and alpha keeps any family
    with pytest.raises(ValueError, match="distill.student.family"):
        trial_spec(ft, {"student_width": 8})



def _bench_distill():
    """benchmarks/distill.py as a module (it imports its sibling `_common`)."""
    import importlib.util
    import sys

    bench = REPO / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_distill", bench / "distill.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    return mod


def test_benchmark_paired_stats_by_hand():
    stats = _bench_distill().paired_stats([0.9, 0.8, 0.7], [0.88, 0.81, 0.67])
    # differences 2, -1, 3 points: mean 4/3, sample sd sqrt(13/3), se sd/sqrt(3)
    assert stats["mean"] == round(4 / 3, 3) and stats["se"] == round(math.sqrt(13 / 3) / math.sqrt(3), 3)
    assert (stats["median"], stats["min"], stats["max"]) == (2.0, -1.0, 3.0)
    assert (stats["positive"], stats["negative"], stats["n"]) == (2, 1, 3)


def _bench_schema():
    from raysys.data.schema import DatasetSchema

    return DatasetSchema.model_validate({
        "features": [{"name": f"n{i}", "kind": "numeric"} for i in range(4)]
        + [{"name": "a", "kind": "categorical", "categories": ["x", "y", "z"]},
           {"name": "b", "kind": "categorical", "categories": ["p", "q"]}],
        "label": "label", "classes": ["c0", "c1", "c2"]})


def test_benchmark_teacher_recipe_keeps_the_best_validation_epoch(one_thread):
    from raysys.config import ModelConfig

    bench = _bench_distill()
    schema = _bench_schema()
    x, c, y, _ = _synthetic(600, 0)
    vx, vc, vy, _ = _synthetic(200, 1)
    for model_cfg in (ModelConfig(hidden_dims=[16]), ModelConfig(family="ft_transformer", d_model=8, num_blocks=1,
                                                                  num_heads=2)):
        recipe = bench.Recipe(lr=3e-3, weight_decay=1e-4, epochs=4, batch_size=64, warmup=0.25)
        model, info = bench.train_teacher(schema, model_cfg, recipe, (x, c, y), (vx, vc, vy))
        assert not model.training and 0 <= info["best_epoch"] < 4
        # the returned weights are the best epoch's: their validation accuracy is the reported one
        assert bench.test_accuracy(model, (vx, vc, vy)) == pytest.approx(info["val_accuracy"], abs=1e-4)
        assert info["val_accuracy"] > 0.6  # learned the rule (chance is ~1/3)


def test_benchmark_ensemble_teacher_is_the_members_mean_log_probability(one_thread):
    from raysys.config import ModelConfig
    from raysys.models import model_spec, num_parameters

    bench = _bench_distill()
    schema = _bench_schema()
    x, c, y, _ = _synthetic(300, 0)
    vx, vc, vy, _ = _synthetic(100, 1)
    for activation in ("relu", "gelu"):
        cfg = ModelConfig(hidden_dims=[16, 8], dropout=0.1, activation=activation)
        members = []
        for seed in range(3):
            torch.manual_seed(seed)
            members.append(build_model(model_spec(schema, cfg)).eval())
        ens = bench.MLPEnsemble(members)
        xn, xc = torch.from_numpy(vx), torch.from_numpy(vc)
        with torch.inference_mode():
            want = torch.stack([torch.log_softmax(m(xn, xc), dim=1) for m in members]).mean(0)
            torch.testing.assert_close(ens(xn, xc), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ens(xn[:1], xc[:1]), want[:1], rtol=1e-5, atol=1e-6)  # one row per call
        assert num_parameters(ens) == sum(num_parameters(m) for m in members)
    # recipe.members > 1 trains that many members from seeds 100 * seed + i and stacks them
    recipe = bench.Recipe(lr=3e-3, weight_decay=1e-4, epochs=2, batch_size=64, members=2)
    model, info = bench.train_teacher(schema, ModelConfig(hidden_dims=[16]), recipe, (x, c, y), (vx, vc, vy))
    one, one_info = bench.train_teacher(schema, ModelConfig(hidden_dims=[16]), dataclasses.replace(recipe, members=1),
                                        (x, c, y), (vx, vc, vy), seed=1)
    assert isinstance(model, bench.MLPEnsemble) and model.num_members == 2 and not model.training
    assert info["member_val_accuracy"][1] == one_info["val_accuracy"]  # member 1 = seed 1
    assert info["val_accuracy"] == pytest.approx(bench.test_accuracy(model, (vx, vc, vy)), abs=1e-4)


def test_benchmark_cv_teacher_choice_ties_go_to_the_earlier_candidate():
    bench = _bench_distill()
    out = bench.choose_by_cv({"small": [0.9, 0.8], "big": [0.8, 0.9], "worse": [0.85, 0.8]})
    assert out["chosen"] == "small"  # same mean as "big": the earlier (cheaper) one
    assert out["accuracy_mean"] == {"small": 0.85, "big": 0.85, "worse": 0.825}
    # paired per fold against the chosen one, in points: big -10, +10; worse -5, 0
    assert out["vs_chosen_points"]["big"]["mean"] == 0.0 and out["vs_chosen_points"]["big"]["min"] == -10.0
    assert out["vs_chosen_points"]["worse"]["mean"] == -2.5 and out["vs_chosen_points"]["worse"]["negative"] == 1
    assert "small" not in out["vs_chosen_points"]
    assert bench.choose_by_cv({"a": [0.7, 0.7], "b": [0.7, 0.75]})["chosen"] == "b"


def test_benchmark_stratified_folds_hold_each_row_out_once_and_fit_on_the_fold_training_rows():
    import pyarrow as pa

    bench = _bench_distill()
    schema = _bench_schema()
    n = 90
    rng = np.random.default_rng(0)
    cols = {"n0": np.arange(n, dtype=np.float64)}  # the row id, recoverable from the standardized arrays
    cols.update({f"n{i}": rng.standard_normal(n) for i in range(1, 4)})
    cols["a"] = rng.choice(["x", "y", "z"], n)
    cols["b"] = rng.choice(["p", "q"], n)
    cols["label"] = np.array(["c0", "c1", "c2"])[np.arange(n) % 3]
    table = pa.table(cols)
    held_ids, folds = [], 0
    for _, tr_table, pre, tr, va, held in bench.stratified_folds(schema, table, folds=3, val_fraction=0.2):
        folds += 1
        # the preprocessor was fitted on the fold's training rows, and nothing else
        assert pre.mean[0] == pytest.approx(float(np.mean(tr_table.column("n0").to_numpy())))
        tr_ids, va_ids, ho_ids = (np.rint(a[0][:, 0] * pre.std[0] + pre.mean[0]).astype(int) for a in (tr, va, held))
        assert sorted(tr_ids) == sorted(tr_table.column("n0").to_numpy().astype(int))
        assert len(ho_ids) == n // 3 and len(va_ids) == round(0.2 * (n - n // 3))
        assert not (set(tr_ids) & set(ho_ids) or set(va_ids) & set(ho_ids) or set(tr_ids) & set(va_ids))
        assert len(set(tr_ids) | set(va_ids) | set(ho_ids)) == n
        assert np.bincount(held[2], minlength=3).tolist() == [10, 10, 10]  # stratified
        held_ids.extend(ho_ids.tolist())
    assert folds == 3 and sorted(held_ids) == list(range(n))  # every row held out exactly once


def test_fit_student_on_read_only_arrays_warns_nothing(tmp_path):
    """Tune trials get the shared data from Ray's object store as read-only arrays; training only gathers
    from them, so torch's "NumPy array is not writable" UserWarning (printed once per trial process) was
    noise. Run in a fresh interpreter: torch emits that warning once per process."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import warnings
        import numpy as np
        warnings.simplefilter("error")  # any warning fails the run
        from raysys.distill import StudentData, fit_student
        rng = np.random.default_rng(0)
        def ro(a):
            a.setflags(write=False)
            return a
        n = 200
        x = ro(rng.standard_normal((n, 4)).astype(np.float32))
        c = ro(rng.integers(0, 2, (n, 1)).astype(np.int64))
        y = ro((x[:, 0] > 0).astype(np.int64))
        t = ro(np.stack([-x[:, 0], x[:, 0]], 1).astype(np.float32))
        data = StudentData(x_num=x, x_cat=c, y=y, teacher_logits=t, val_x_num=x, val_x_cat=c, val_y=y,
                           transfer_x_num=x, transfer_x_cat=c, transfer_logits=t)
        spec = {"family": "mlp", "num_numeric": 4, "cardinalities": [2], "num_classes": 2, "hidden_dims": [8],
                "embed_dim": 2, "dropout": 0.0, "activation": "relu"}
        fit = fit_student({"student_spec": spec, "temperature": 2.0, "alpha": 0.5, "num_epochs": 2,
                           "batch_size": 32, "lr": 1e-2}, data)
        print("val", fit.history[-1]["val_accuracy"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val" in proc.stdout


def test_default_concurrency_caps_a_local_cluster_at_the_host_cores():
    from raysys.distill.sweep import default_concurrency

    # a one-node local Ray started with 4 logical CPUs on a 2-core host: 2 one-thread trials, not 4
    assert default_concurrency(4.0, single_local_node=True, host_cores=2) == 2
    assert default_concurrency(2.0, single_local_node=True, host_cores=8) == 2
    # a multi-node (or remote) cluster: its logical CPUs, whatever this host has
    assert default_concurrency(12.0, single_local_node=False, host_cores=2) == 12
    assert default_concurrency(0.0, single_local_node=False, host_cores=2) == 1


def test_a_trial_checkpoints_every_epoch_its_selection_would_prefer(monkeypatch, tmp_path):
    """A trial checkpoints an epoch that beats its best so far on val_accuracy, or ties it with a lower val_loss:
    the order the sweep picks a trial's best checkpoint by. A tiny validation split (wine's 26 rows) reaches
    accuracy 1.0 in the first epochs; checkpointing on accuracy alone kept epoch 1 of 75 as the student, 8
    points below the teacher on test. The best so far survives a restore from the latest checkpoint."""
    from ray import tune

    from raysys.distill.student import EpochState
    from raysys.distill.sweep import trial

    reports: list[tuple[int, bool]] = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None:
            dest = tmp_path / f"ckpt{metrics['epoch']}"
            dest.mkdir()
            for f in ("model.safetensors", "resume.safetensors", "meta.json"):
                (dest / f).write_bytes(Path(checkpoint.path, f).read_bytes())
        reports.append((metrics["epoch"], checkpoint is not None))

    monkeypatch.setattr(tune, "report", report)
    params = {"student_spec": {"family": "mlp"}, "temperature": 2.0, "alpha": 0.5, "lr": 1e-3}
    weights = {"w": torch.zeros(2)}
    state = {"epoch": 0, "rng": torch.zeros(1)}
    rep = trial._Reporter(params, set(), None)
    epochs = [(0.5, 1.0), (1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (0.9, 0.1), (1.0, 0.2)]
    for e, (acc, loss) in enumerate(epochs):
        rep({"epoch": e, "val_accuracy": acc, "val_loss": loss}, EpochState(e, weights, lambda: state))
    assert reports == [(0, True), (1, True), (2, True), (3, False), (4, False), (5, True)]

    resumed = trial._Reporter(params, set(), trial._restore(tune.Checkpoint.from_directory(str(tmp_path / "ckpt2")))[1])
    reports.clear()
    resumed({"epoch": 3, "val_accuracy": 1.0, "val_loss": 0.4}, EpochState(3, weights, lambda: state))
    resumed({"epoch": 4, "val_accuracy": 1.0, "val_loss": 0.25}, EpochState(4, weights, lambda: state))
    assert reports == [(3, False), (4, True)]
