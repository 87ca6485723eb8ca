"""Tier 3: the whole loop as users run it: `ray start --head` with token authentication, then `ray job submit
-- python jobs/pipeline.py` (data -> Ray Train teacher -> Tune distillation -> registry -> Ray Serve endpoint over
real HTTP -> drift monitor).

The cluster is a real `ray start` cluster in its own process group, temp dir and HOME (so its token and
address file never touch the developer's), stopped by killing that group; the job runs the tiny preset
end to end, including the Serve endpoint and the drift report; the test then checks what it left: what the
teacher and student learned, the registry (aliases, lineage, model cards) and the endpoint.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests
from helpers import REPO
from helpers.cluster import BIN
from helpers.cluster import token_cluster as start_token_cluster

from raysys.config import preset
from raysys.registry import Registry
from raysys.workflow.stages import TEACHER_SUFFIX
from raysys.workflow.traffic import traffic_rows
from serve.ingress import free_port


def _wait_http(url: str, timeout_s: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def token_cluster(tmp_path):
    with start_token_cluster(tmp_path, prefix="rsj-", cwd=str(tmp_path)) as cluster:
        yield cluster


@pytest.mark.integration
def test_job_submit_runs_the_loop_with_token_auth(token_cluster, tmp_path):
    dash = token_cluster["dashboard"]
    # token auth is on: the dashboard's job API refuses a request without the token
    r = _wait_http(f"{dash}/api/jobs/")
    assert r.status_code == 401, r.text[:200]

    serve_port = free_port()
    root = tmp_path / "root"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={dash}", f"--working-dir={REPO}", "--",
           "python", "jobs/pipeline.py", "--preset", "tiny", "--root", str(root), "--port", str(serve_port)]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd, env=token_cluster["env"], capture_output=True, text=True, timeout=600)
        log = out.stdout + out.stderr
        # the dashboard answers before the node's job agent is up (Ray asks the client to retry), and a busy
        # dashboard may drop the working-dir upload: both are retried, as a user would
        transient = "No available agent" in log or "ServerDisconnectedError" in log
        if not transient or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "alerts: x0" in log, log[-3000:]
    assert "bad request -> HTTP 422" in log and "instances[0]." in log  # the field named

    # what the job learned: clearly better than always answering the most common class
    summary = json.loads(next(line for line in reversed(log.splitlines()) if line.startswith('{"endpoint"')))
    majority = summary["majority_class_accuracy"]
    assert summary["teacher_test_accuracy"] > majority + 0.25, summary
    assert summary["student_test_accuracy"] > majority + 0.15, summary
    cfg = preset("tiny")
    assert summary["best_distill_config"]["temperature"] in cfg.distill.temperatures

    # the registry: production is the student, whose lineage names the teacher; both carry a model card
    reg = Registry(str(root / "registry"))
    model = cfg.model_name
    student = reg.get_alias(model, "production")
    loaded = reg.load(model, "production")
    teacher = int(summary["teacher"].rsplit(":v", 1)[1])
    assert loaded.lineage["parent_teacher"].endswith(f":v{teacher}") and loaded.reference_profile is not None
    _, t_card, t_md = reg.model_card(model + TEACHER_SUFFIX, teacher)
    assert t_card is not None and t_card["kind"] == "teacher", t_card
    assert t_card["metrics"]["test"]["accuracy"] == summary["teacher_test_accuracy"]
    assert t_card["training"]["train"]["strategy"] == cfg.train.strategy
    assert "distilled" in t_card["intended_use"] and "# Model card" in t_md
    assert reg.model_card(model, student)[1]["kind"] == "student"

    # the endpoint the job deployed keeps serving after the job ended
    url = summary["endpoint"]
    assert url == f"http://127.0.0.1:{serve_port}", url  # the tiny preset serves at the root
    r = requests.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == student == 1
    rows = traffic_rows(cfg, 3, seed=11)
    r = requests.post(f"{url}/v1/predict", json={"instances": rows}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 3 and all(p in loaded.schema.classes for p in body["predictions"])
    assert abs(sum(body["probabilities"][0]) - 1) < 1e-4 and body["model_version"] == student

    # a client without the token is refused
    no_token = dict(token_cluster["env"])
    no_token.pop("RAY_AUTH_MODE")
    no_token["HOME"] = str(tmp_path)
    denied = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={dash}"], env=no_token,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
