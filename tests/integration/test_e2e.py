"""Tier 3: the whole loop on a real local Ray, tiny preset: data -> Ray Train teacher -> Tune distillation
-> registry -> Ray Serve endpoint over real HTTP -> drift monitor."""

from __future__ import annotations

import pytest
import requests

from raysys.registry import Registry
from raysys.workflow.stages import absolute, run_pipeline
from raysys.workflow.traffic import exercise_endpoint, traffic_rows


@pytest.mark.integration
def test_whole_loop(ray_cluster, serve_port, tiny_cfg):
    import ray
    from ray import serve

    from serve.app import deploy

    cfg = absolute(tiny_cfg)
    cfg.serve.port = serve_port
    cfg.serve.app_name = "raysys-e2e"
    cfg.serve.route_prefix = "/e2e"

    result = run_pipeline(cfg)
    # the teacher learned the rule: clearly better than always answering the most common class
    assert result.teacher_metrics["accuracy"] > result.majority_accuracy + 0.25, result.summary()
    assert result.student_metrics["accuracy"] > result.majority_accuracy + 0.15, result.summary()
    assert result.best_distill_config["temperature"] in cfg.distill.temperatures
    reg = Registry(cfg.registry_uri)
    assert reg.get_alias(cfg.model_name, "production") == result.student_version
    loaded = reg.load(cfg.model_name, "production")
    assert loaded.lineage["parent_teacher"].endswith(f":v{result.teacher_version}")
    assert loaded.reference_profile is not None
    # every registered version carries a model card: the teacher's too (its own kind, use and figures)
    from raysys.workflow.stages import TEACHER_SUFFIX

    _, t_card, t_md = reg.model_card(cfg.model_name + TEACHER_SUFFIX, result.teacher_version)
    assert t_card is not None and t_card["kind"] == "teacher", t_card
    assert t_card["metrics"]["test"]["accuracy"] == round(result.teacher_metrics["accuracy"], 4)
    assert t_card["data"]["fingerprint"] == result.data_fingerprint
    assert t_card["training"]["train"]["strategy"] == cfg.train.strategy
    assert "distilled" in t_card["intended_use"] and "# Model card" in t_md
    assert reg.model_card(cfg.model_name, result.student_version)[1]["kind"] == "student"

    url = deploy(cfg)
    try:
        assert url.endswith(f":{serve_port}/e2e")
        rows = traffic_rows(cfg, 3, seed=11)
        r = requests.post(f"{url}/v1/predict", json={"instances": rows}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["predictions"]) == 3
        assert all(p in loaded.schema.classes for p in body["predictions"])
        assert abs(sum(body["probabilities"][0]) - 1) < 1e-4
        assert body["model_version"] == result.student_version

        bad = [dict(rows[0], x3="high")]
        r = requests.post(f"{url}/v1/predict", json={"instances": bad}, timeout=30)
        assert r.status_code == 422
        assert "instances[0].x3" in r.text

        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200

        out = exercise_endpoint(cfg, url, shift_sigma=1.5)
        assert out["bad_request"]["status"] == 422
        assert out["normal_traffic"]["statuses"] == {200: out["normal_traffic"]["requests"]}
        thr = cfg.monitor.psi_threshold
        normal = out["normal_report"]["features"]
        assert all(st["psi"] < thr for st in normal.values()), normal
        drifted = out["drift_report"]["features"]
        feat = out["drift_feature"]
        assert drifted[feat]["psi"] > thr and drifted[feat]["drifted"], drifted
        others = {k: v["psi"] for k, v in drifted.items() if k != feat}
        assert all(v < thr for v in others.values()), others
        assert any(feat in str(a) for a in out["drift_report"]["alerts"])
    finally:
        serve.delete(cfg.serve.app_name)
        try:
            ray.kill(ray.get_actor("raysys_monitor", namespace="raysys"))
        except ValueError:
            pass
