"""Tier 1: the evaluation stage's trust figures on a model card (governance section, NIST AI RMF Map / Measure /
Manage), `raysys registry show` printing them, and the retrain job's promotion refusal on a failing check. A tiny
model trained in-process on a small synthetic dataset; no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raysys.config import preset
from raysys.data import Preprocessor, ensure_dataset, read_split
from raysys.models import build_model, model_spec
from raysys.registry import Registry
from raysys.registry.modelcard import build_model_card, render_markdown
from raysys.workflow.promotion import governance_gate
from raysys.workflow.stages import Prepared, _test_arrays
from raysys.workflow.trust_stage import governance, model_trust


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trustcard")
    cfg = preset("tiny").with_root(root)
    cfg.data.num_train_rows, cfg.data.num_val_rows, cfg.data.num_test_rows = 600, 100, 300
    cfg.governance.intended_use = "Route demo tickets to a queue."
    cfg.governance.out_of_scope_uses = ["credit or hiring decisions"]
    cfg.governance.epsilons, cfg.governance.pgd_steps, cfg.governance.max_rows = [0.1, 0.5], 3, 300
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    # mark c0 protected (as a user's schema.json would): per-group metrics on the card
    schema = schema.model_copy(update={"features": [f.model_copy(update={"protected": f.name == "c0"})
                                                    for f in schema.features]})
    prep = Prepared(schema, pre, "fp")
    spec = model_spec(schema, cfg.distill.student)
    torch.manual_seed(0)
    model = build_model(spec)
    x_num, x_cat, y = pre.transform_table(read_split(cfg.data.root, "train"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(torch.as_tensor(x_num), torch.as_tensor(x_cat)), torch.as_tensor(y)).backward()
        opt.step()
    model.eval()
    return cfg, prep, spec, model


def _card(cfg, prep, model, gov_cfg=None):
    test = _test_arrays(cfg, prep)
    trust = model_trust(cfg, prep, model, test)
    c = cfg if gov_cfg is None else cfg.model_copy(update={"governance": gov_cfg})
    gov = governance(c, prep, trust, teacher_trust=trust)
    return build_model_card(name=cfg.model_name, kind="student", schema=prep.schema, data_fingerprint="fp",
                            metrics={"accuracy": trust["robustness"]["clean_accuracy"], "num_samples": 300},
                            governance=gov, intended_use=cfg.governance.intended_use)


def test_the_card_shows_the_governance_sections(run):
    cfg, prep, _, model = run
    card = _card(cfg, prep, model)
    gov = card["governance"]
    assert gov["failed"] == [] and {c["check"] for c in gov["checks"]} >= {"robustness_drop", "membership_auc",
                                                                           "equalized_odds_gap"}
    assert set(gov["nist_ai_rmf"]) == {"map", "measure", "manage"}
    md = render_markdown(card)
    for text in ("## Governance (NIST AI RMF)", "### Map", "### Measure", "### Manage", "Route demo tickets",
                 "credit or hiring decisions", "PGD accuracy", "at epsilon 0.1", "membership-inference AUC",
                 "Protected feature `c0`", "equalized-odds gap", "trained without DP-SGD", "Robustness (teacher)"):
        assert text in md, text
    assert "Out of scope: credit or hiring decisions" in card["limitations"]


def test_registry_show_prints_the_sections(run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from raysys import cli
    from raysys.cli import app

    cfg, prep, spec, model = run
    reg = Registry(tmp_path / "registry")
    v = reg.register(cfg.model_name, state_dict=model.state_dict(), model_spec=spec, schema=prep.schema,
                     preprocessor=prep.preprocessor, metrics={}, config={}, lineage={},
                     model_card=_card(cfg, prep, model))
    reg.set_alias(cfg.model_name, "production", v)
    monkeypatch.setattr(cli.console, "width", 200)
    r = CliRunner().invoke(app, ["registry", "show", "production", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for text in ("Governance (NIST AI RMF)", "Map (context and uses)", "Measure (what raysys measured)",
                 "Manage (checks and what they stop)", "membership_auc", "credit or hiring decisions"):
        assert text in r.output, text


def test_a_candidate_failing_a_check_is_not_promoted(run, tmp_path):
    cfg, prep, spec, model = run
    reg = Registry(tmp_path / "registry")
    strict = cfg.governance.model_copy(deep=True)
    strict.thresholds.robustness_drop = 0.0  # any accuracy lost to PGD fails
    strict.thresholds.dp_epsilon = 8.0  # and it was trained without DP-SGD
    versions = {}
    for label, gov in (("ok", None), ("strict", strict)):
        versions[label] = reg.register(cfg.model_name, state_dict=model.state_dict(), model_spec=spec,
                                       schema=prep.schema, preprocessor=prep.preprocessor, metrics={}, config={},
                                       lineage={}, model_card=_card(cfg, prep, model, gov))
    assert governance_gate(reg, cfg.model_name, versions["ok"], True, "wins") == (True, "wins", [])
    wins, why, failed = governance_gate(reg, cfg.model_name, versions["strict"], True, "wins")
    assert not wins and [c["check"] for c in failed] == ["robustness_drop", "dp_epsilon"]
    assert "robustness_drop" in why and "not promoted" in why and "wins" in why
    # a loser stays a loser
    assert governance_gate(reg, cfg.model_name, versions["ok"], False, "loses")[0] is False
