"""Tier 1: the trust checks (raysys.trust) on a tiny model trained in-process on SyntheticTask rows, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysys.config import DataConfig, GovernanceConfig, ModelConfig
from raysys.data import Preprocessor
from raysys.data.synthetic import SyntheticTask
from raysys.models import build_model, model_spec
from raysys.trust import failed_checks, governance_section, run_checks, trust_figures
from raysys.trust.fairness import fairness_report, group_metrics
from raysys.trust.membership import advantage, binary_auc, loss_threshold_attack, membership_report
from raysys.trust.robustness import fgsm, flip_categories, pgd, robustness_report


def _train(x_num, x_cat, y, spec, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xn, xc, yt = torch.as_tensor(x_num), torch.as_tensor(x_cat), torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(xn[idx], xc[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world():
    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=4, num_classes=3, seed=3)
    task = SyntheticTask(cfg)
    schema = task.schema()
    train_t, test_t = task.sample(3000, [3, 1]), task.sample(1000, [3, 3])
    pre = Preprocessor.fit(schema, train_t)
    train, test = pre.transform_table(train_t), pre.transform_table(test_t)
    spec = model_spec(schema, ModelConfig(hidden_dims=[64, 64]))
    torch.set_num_threads(1)
    model = _train(*train, spec, epochs=6)
    return {"schema": schema, "spec": spec, "train": train, "test": test, "model": model,
            "raw_test": {n: test_t.column(n).to_numpy(zero_copy_only=False) for n in test_t.column_names}}


def test_the_model_learned_something(world):
    x_num, x_cat, y = world["test"]
    acc = (world["model"](torch.as_tensor(x_num), torch.as_tensor(x_cat)).argmax(1).numpy() == y).mean()
    assert acc > 0.6


def test_fgsm_and_pgd_stay_in_the_ball_and_leave_the_indicators(world):
    x_num, x_cat, y = (torch.as_tensor(a) for a in world["test"])
    xn = torch.cat([x_num[:200], torch.ones(200, 1)], 1)  # an extra "indicator" column past the features
    model = world["model"]

    class WithIndicator(torch.nn.Module):
        def forward(self, a, b):
            return model(a[:, :-1], b) + 0 * a[:, -1:]

    m = WithIndicator()
    for adv in (fgsm(m, xn, x_cat[:200], y[:200], 0.3, num_perturbed=4),
                pgd(m, xn, x_cat[:200], y[:200], 0.3, steps=5, num_perturbed=4)):
        d = adv - xn
        assert d[:, :4].abs().max() <= 0.3 + 1e-6
        assert torch.equal(adv[:, 4], xn[:, 4])
    assert (fgsm(m, xn, x_cat[:200], y[:200], 0.3, num_perturbed=4) - xn)[:, :4].abs().min() == pytest.approx(0.3)


def test_attacks_lower_accuracy_and_pgd_is_at_least_as_strong(world):
    x_num, x_cat, y = world["test"]
    rep = robustness_report(world["model"], x_num, x_cat, y, epsilons=[1e-6, 0.25, 1.0], epsilon=0.25,
                            flip_rates=[0.5, 1.0], flip_rate=0.5, cardinalities=world["schema"].cardinalities,
                            pgd_steps=5)
    curve = {p["epsilon"]: p for p in rep["curve"]}
    assert curve[1e-6]["pgd_accuracy"] == pytest.approx(rep["clean_accuracy"], abs=0.005)
    assert curve[1.0]["pgd_accuracy"] < curve[0.25]["pgd_accuracy"] < rep["clean_accuracy"]
    for p in rep["curve"]:
        assert p["pgd_accuracy"] <= p["fgsm_accuracy"] + 0.02
    assert rep["drop_at_epsilon"] == pytest.approx(rep["clean_accuracy"] - curve[0.25]["pgd_accuracy"])
    flips = {p["rate"]: p["accuracy"] for p in rep["category_flips"]}
    assert flips[1.0] < rep["clean_accuracy"]
    assert rep["flip_drop"] == pytest.approx(rep["clean_accuracy"] - flips[0.5])


def test_category_flips_change_the_asked_share_to_other_categories():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (20_000, 2))
    assert np.array_equal(flip_categories(x, [5, 5], 0.0, rng), x)
    every = flip_categories(x, [5, 5], 1.0, rng)
    assert (every != x).all() and every.min() >= 0 and every.max() <= 4
    some = flip_categories(x, [5, 5], 0.2, rng)
    assert abs((some != x).mean() - 0.2) < 0.01
    assert np.array_equal(flip_categories(x, [5, 1], 1.0, rng)[:, 1], x[:, 1])  # nothing to flip to


def test_auc_and_advantage_by_hand():
    assert binary_auc([3, 4], [1, 2]) == 1.0
    assert binary_auc([1, 2], [3, 4]) == 0.0
    assert binary_auc([1, 1], [1, 1]) == 0.5
    assert binary_auc([2, 0], [1]) == 0.5
    assert advantage([3, 4], [1, 2]) == 1.0
    assert advantage([1, 1], [1, 1]) == 0.0
    r = loss_threshold_attack([0.1, 0.2], [0.5, 0.9])  # members have the lower loss
    assert r["auc"] == 1.0 and r["member_mean_loss"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="at least one"):
        binary_auc([], [1])


def test_membership_leaks_from_an_overfit_model_not_from_unseen_rows(world):
    x_num, x_cat, y = world["train"]
    few = (x_num[:150], x_cat[:150], np.random.default_rng(0).integers(0, 3, 150))  # random labels: memorised
    overfit = _train(*few, world["spec"], epochs=60)
    others = (x_num[150:300], x_cat[150:300], np.random.default_rng(1).integers(0, 3, 150))
    assert membership_report(overfit, few, others)["auc"] > 0.8
    # two samples the model never saw: nothing to tell apart
    t = world["test"]
    unseen = membership_report(world["model"], tuple(a[:500] for a in t), tuple(a[500:] for a in t))
    assert abs(unseen["loss_threshold"]["auc"] - 0.5) < 0.06
    # the reference-model attack runs where a reference exists (here: the model itself, so no signal)
    ref = membership_report(overfit, few, others, reference=overfit)["reference_model"]
    assert ref["auc"] == 0.5


def test_group_metrics_by_hand():
    g = np.array(["a"] * 4 + ["b"] * 4)
    t = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    p = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    m = group_metrics(g, t, p, 2, min_rows=1)
    a, b = m["groups"]
    assert (a["group"], a["accuracy"], b["accuracy"]) == ("a", 1.0, 0.25)
    assert a["selection_rate"][1] == 0.5 and b["selection_rate"][1] == 0.75
    assert a["tpr"][1] == 1.0 and b["tpr"][1] == 0.5 and a["fpr"][1] == 0.0 and b["fpr"][1] == 1.0
    assert m["equalized_odds_gap"] == 1.0 and m["selection_rate_gap"] == 0.25 and m["accuracy_gap"] == 0.75
    # a group too small to compare is shown but left out of the gaps
    assert group_metrics(g, t, p, 2, min_rows=5)["equalized_odds_gap"] == 0.0
    q = group_metrics(np.arange(8, dtype=float), t, p, 2, min_rows=1)
    assert len(q["groups"]) == 4 and sum(x["num_rows"] for x in q["groups"]) == 8
    with pytest.raises(ValueError, match="protected feature 'z'"):
        fairness_report({"g": g}, ["z"], t, p, 2)


def test_figures_checks_and_the_governance_section(world):
    schema = world["schema"]
    gov = GovernanceConfig(epsilons=[0.1, 0.5], pgd_steps=3, flip_rates=[0.1], max_rows=400,
                           intended_use="demo scoring", out_of_scope_uses=["credit decisions"])
    fig = trust_figures(world["model"], gov, test=world["test"], train=world["train"], num_classes=3,
                        cardinalities=schema.cardinalities, num_perturbed=len(schema.numeric),
                        raw_columns=world["raw_test"], protected=["c0"])
    assert fig["robustness"]["num_rows"] == 400 and fig["membership"]["loss_threshold"]["num_members"] == 400
    assert fig["privacy"]["epsilon"] is None and set(fig["seconds"]) == {"robustness", "membership", "fairness"}
    names = [c["check"] for c in run_checks(fig, gov)]
    assert names == ["robustness_drop", "category_flip_drop", "membership_auc", "equalized_odds_gap",
                     "selection_rate_gap"]  # no DP bound set: epsilon is not checked
    sec = governance_section(gov, fig, protected=["c0"])
    assert sec["failed"] == [] and failed_checks({"governance": sec}) == []
    assert sec["nist_ai_rmf"]["map"]["out_of_scope_uses"] == ["credit decisions"]
    strict = gov.model_copy(update={"thresholds": gov.thresholds.model_copy(
        update={"robustness_drop": 0.0, "dp_epsilon": 10.0})})
    sec = governance_section(strict, fig)
    assert sec["failed"] == ["robustness_drop", "dp_epsilon"]
    assert [c["check"] for c in failed_checks({"governance": sec})] == ["robustness_drop", "dp_epsilon"]
    assert failed_checks({}) == [] and failed_checks(None) == []
