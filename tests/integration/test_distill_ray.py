"""Tier 3: the distillation sweep on the session's local Ray cluster (tiny preset).

The teacher is trained here with a plain torch loop so these tests do not depend on raysys.train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysys.data import Preprocessor, ensure_dataset, read_split
from raysys.distill import precompute_teacher_logits, run_sweep
from raysys.evaluate import agreement, evaluate_model
from raysys.models import build_model, model_spec

pytestmark = pytest.mark.integration


def _teacher(cfg, num_epochs=5):
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    x_num, x_cat, y = (torch.from_numpy(a) for a in pre.transform_table(read_split(cfg.data.root, "train")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is faster on a shared 2-core box
    try:
        return schema, pre, _fit(_seeded_model(model_spec(schema, cfg.teacher)), x_num, x_cat, y, num_epochs)
    finally:
        torch.set_num_threads(threads)


def _seeded_model(spec):
    torch.manual_seed(0)
    return build_model(spec)


def _fit(model, x_num, x_cat, y, num_epochs):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(num_epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x_num[idx], x_cat[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def _split(cfg, pre, name):
    return pre.transform_table(read_split(cfg.data.root, name))


def test_sweep_fifo_finds_a_good_student(ray_cluster, tiny_cfg):
    import signal

    cfg = tiny_cfg
    schema, pre, teacher = _teacher(cfg)
    before = signal.getsignal(signal.SIGINT)
    res = run_sweep(cfg, schema, pre, teacher, run_name="distill-fifo")
    # Ray Tune's fit() installs a SIGINT handler that swallows the next Ctrl-C and leaves it installed
    assert signal.getsignal(signal.SIGINT) is before

    grid = [(t, a) for t in cfg.distill.temperatures for a in cfg.distill.alphas]
    assert len(res.trials) == len(grid)
    assert sorted((t["temperature"], t["alpha"]) for t in res.trials) == sorted(grid)
    assert (res.best_config["temperature"], res.best_config["alpha"]) in grid
    assert all(t["error"] is None and t["epochs_run"] == cfg.distill.num_epochs for t in res.trials)
    assert res.best_val_accuracy == max(t["best_val_accuracy"] for t in res.trials)
    # one architecture, one latency figure: the Pareto front and the choice do not turn on timing noise
    assert len({t["latency_ms_per_row"] for t in res.trials}) == 1 and res.trials[0]["latency_ms_per_row"] > 0
    assert res.results_dir.startswith(cfg.run_dir)
    json.dumps(res.summary())
    # the checkpoint is safetensors + JSON, nothing pickled
    ckpt = Path(res.best_checkpoint_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "resume.safetensors"]
    from raysys.statefile import load_state

    assert load_state(ckpt / "resume.safetensors")["epoch"] == res.best_epoch  # where a retried trial goes on
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["temperature"], meta["alpha"]) == (res.best_config["temperature"], res.best_config["alpha"])
    assert meta["metrics"]["epoch"] == res.best_epoch

    # the best weights load into the student architecture and reproduce the reported accuracy
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    assert res.student_spec == model_spec(schema, cfg.distill.student)
    vx_num, vx_cat, vy = _split(cfg, pre, "validation")
    val = evaluate_model(student, vx_num, vx_cat, vy, schema.num_classes)
    assert val["accuracy"] == pytest.approx(res.best_val_accuracy, abs=2e-3)

    # well above the majority class on held-out test rows, and mostly agreeing with the teacher
    tx_num, tx_cat, ty = _split(cfg, pre, "test")
    majority = np.bincount(ty).max() / len(ty)
    test = evaluate_model(student, tx_num, tx_cat, ty, schema.num_classes)
    assert test["accuracy"] > majority + 0.25, (test["accuracy"], majority)
    teacher_pred = precompute_teacher_logits(teacher, tx_num, tx_cat).argmax(1)
    student_pred = np.asarray(student(torch.from_numpy(tx_num), torch.from_numpy(tx_cat)).argmax(1))
    assert agreement(teacher_pred, student_pred) > 0.65  # 0.74 when written
    assert res.teacher_val_accuracy > majority + 0.25


def test_sweep_asha_completes_without_deadlock(ray_cluster, tiny_cfg):
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(scheduler="asha", temperatures=[1.0, 4.0], alphas=[0.3, 0.9],
                                                     num_epochs=4, grace_period=2, max_concurrent_trials=2))
    schema, pre, teacher = _teacher(cfg, num_epochs=3)
    res = run_sweep(cfg, schema, pre, teacher, run_name="distill-asha")
    assert len(res.trials) == 4
    assert all(t["error"] is None for t in res.trials)
    # ASHA never stops a trial before its grace period (2 epochs here)
    assert all(2 <= t["epochs_run"] <= 4 for t in res.trials)
    assert (res.best_config["temperature"], res.best_config["alpha"]) in [(1.0, 0.3), (1.0, 0.9), (4.0, 0.3),
                                                                           (4.0, 0.9)]
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    assert res.scheduler == "asha"


def test_a_killed_trial_is_retried_from_its_checkpoint(ray_cluster, tiny_cfg, caplog):
    # a real crash: the trial's actor process is SIGKILLed mid-run (as when a node is lost); Tune retries the
    # trial (distill.max_trial_failures) and it goes on after its last checkpoint instead of from epoch 1
    import logging
    import os
    import signal
    import time

    from ray import tune

    epochs, kill_at = 150, 10
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(
        search="grid", temperatures=[2.0], alphas=[0.5], scheduler="fifo", num_epochs=epochs,
        max_concurrent_trials=1, max_trial_failures=1))
    schema, pre, teacher = _teacher(cfg, num_epochs=1)
    killed: dict = {}

    class KillTheTrialProcess(tune.Callback):
        """Runs in this driver as each result arrives. The trial waits in `report` until Tune has taken its
        result, so the kill lands at epoch `kill_at`, not at whatever epoch a poller happens to see."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not killed and result["epoch"] >= kill_at:
                assert any(Path(trial.path).glob("checkpoint_*/meta.json")), "no checkpoint yet to go on from"
                os.kill(result["pid"], signal.SIGKILL)  # the PID Tune recorded for this trial's own process
                killed.update(pid=result["pid"], epoch=result["epoch"])

    with caplog.at_level(logging.INFO, logger="raysys.distill.sweep"):
        res = run_sweep(cfg, schema, pre, teacher, run_name="distill-killed", callbacks=[KillTheTrialProcess()])
    assert killed and killed["epoch"] < epochs, killed
    # the killed process's CPU comes back to the cluster (the rest of the session's tests need it)
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], ray.available_resources()
    (trial,) = res.trials
    assert trial["error"] is None and trial["epochs_run"] == epochs, trial
    rows = [json.loads(line) for line in Path(trial["path"], "result.json").read_text().splitlines()]
    assert {r["pid"] for r in rows} >= {killed["pid"]} and len({r["pid"] for r in rows}) == 2
    retried = [r for r in rows if r["pid"] != killed["pid"]]
    # the retry went on after a checkpointed epoch, not from 1, and Tune's iteration count agrees with it
    checkpointed = {json.loads(m.read_text())["metrics"]["epoch"] for m in Path(trial["path"]).glob("checkpoint_*/meta.json")}
    assert 1 < retried[0]["epoch"] <= killed["epoch"] + 1 and retried[0]["epoch"] - 1 in checkpointed, \
        (retried[0]["epoch"], killed, checkpointed)
    assert retried[-1]["epoch"] == epochs
    assert all(r["training_iteration"] == r["epoch"] for r in retried)
    # the progress log says so: the retry, then the trial's end
    lines = [r.getMessage() for r in caplog.records]
    assert any("failed after" in line and "retrying it from its latest checkpoint" in line for line in lines)
    assert any(line.startswith("distill: trial 1/1") and "finished after 150/150" in line for line in lines)
    assert res.best_val_accuracy == trial["best_val_accuracy"] > 0


_DRIVER = """
import json, sys
import ray
from safetensors.torch import load_file
from raysys.config import PipelineConfig
from raysys.data import Preprocessor, ensure_dataset
from raysys.distill import run_sweep
from raysys.models import build_model

address, cfg_file, teacher_file = sys.argv[1:4]
cfg = PipelineConfig.model_validate_json(open(cfg_file).read())
schema = ensure_dataset(cfg.data)
pre = Preprocessor.fit_split(schema, cfg.data.root)
spec = json.loads(open(teacher_file + ".json").read())
teacher = build_model(spec)
teacher.load_state_dict(load_file(teacher_file))
ray.init(address=address)
run_sweep(cfg, schema, pre, teacher, run_name="distill-interrupted")
"""


@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_an_interrupted_sweep_goes_on_where_it_stopped(ray_cluster, tiny_cfg, tmp_path, caplog, search):
    # the sweep's driver (a separate process on the same cluster, as a `ray job submit` entrypoint) is
    # SIGKILLed after two of its four trials finished; resume=True goes on with the same sweep and keeps them
    # (with Optuna the searcher's state comes back too: it suggests the two trials it had not)
    import logging
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import save_file

    from raysys.distill.sweep.tuner import storage_path as _storage_path

    epochs = 100  # ~3 s a trial
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(
        search=search, temperatures=[1.0, 2.0, 3.0, 4.0], alphas=[0.5], num_samples=4, student_widths=[16],
        student_depths=[1], scheduler="fifo", num_epochs=epochs, max_concurrent_trials=1))
    schema, pre, teacher = _teacher(cfg, num_epochs=1)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    (tmp_path / "teacher.safetensors.json").write_text(json.dumps(model_spec(schema, cfg.teacher)))
    exp = Path(_storage_path(cfg.run_dir)) / "distill-interrupted"

    def finished() -> list[Path]:  # Tune closes a trial's result.json when the trial ends
        return [p.parent for p in exp.glob("*/result.json") if len(p.read_text().splitlines()) == epochs]

    # experiment-state snapshots every second (Tune's default is at least every 10 s)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, ray_cluster.address_info["address"],
                               str(tmp_path / "cfg.json"), str(tmp_path / "teacher.safetensors")],
                              env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(finished()) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"the driver ended early: {driver.stderr.read().decode()[-3000:]}"
        done_before = finished()
        assert len(done_before) == 2, "two trials did not finish in time"
        time.sleep(1.5)  # an experiment snapshot that knows them
        done_at_kill = finished()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stderr.close()
    pids_before = {p.name: {json.loads(line)["pid"] for line in (p / "result.json").read_text().splitlines()}
                   for p in done_before}

    with pytest.raises(ValueError, match="no sweep 'distill-nope'"):
        run_sweep(cfg, schema, pre, teacher, run_name="distill-nope", resume=True)
    with pytest.raises(ValueError, match="not a sweep name"):
        run_sweep(cfg, schema, pre, teacher, run_name="../distill-interrupted", resume=True)
    with caplog.at_level(logging.INFO, logger="raysys.distill.sweep"):
        res = run_sweep(cfg, schema, pre, teacher, run_name="distill-interrupted", resume=True)
    assert len(res.trials) == 4 and len({t["temperature"] for t in res.trials}) == 4
    if search == "grid":
        assert sorted(t["temperature"] for t in res.trials) == [1.0, 2.0, 3.0, 4.0]
    # the trials left when it was killed ran (at least one), and progress counted on from those it finished
    assert len(done_at_kill) < 4, "every trial finished before the driver was killed: raise `epochs`"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill: trial ")]
    assert 4 - len(done_at_kill) <= len(lines) <= 4 - len(done_before), (lines, len(done_at_kill))
    assert sorted(line.split()[2] for line in lines) == [f"{k}/4" for k in range(5 - len(lines), 5)], lines
    assert all(t["error"] is None and t["epochs_run"] == epochs for t in res.trials), res.trials
    for p in done_before:  # kept, not run again
        rows = (p / "result.json").read_text().splitlines()
        assert len(rows) == epochs and {json.loads(line)["pid"] for line in rows} == pids_before[p.name]
    assert res.best_val_accuracy == max(t["best_val_accuracy"] for t in res.trials)


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_sweep_honours_max_concurrent_trials(ray_cluster, tiny_cfg, search):
    # one trial at a time: with actor reuse every trial then runs in the same actor process. Random search
    # once ignored the limit (Tune drops max_concurrent_trials for a search *generator* such as
    # BasicVariantGenerator), running a trial per free CPU beside a tuned sweep that ran the configured number
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(
        search=search, scheduler="fifo", num_samples=3, num_epochs=1, student_widths=[8], student_depths=[1],
        max_concurrent_trials=1))
    schema, pre, teacher = _teacher(cfg, num_epochs=1)
    res = run_sweep(cfg, schema, pre, teacher, run_name=f"distill-one-at-a-time-{search}")
    assert len(res.trials) == 3 and all(t["error"] is None for t in res.trials)
    assert res.max_concurrent_trials == 1
    pids = {json.loads(line)["pid"] for t in res.trials
            for line in Path(t["path"], "result.json").read_text().splitlines()}
    assert len(pids) == 1, f"trials ran in {len(pids)} processes at max_concurrent_trials=1"


def test_default_concurrency_on_the_local_cluster_is_one_trial_per_core(ray_cluster, tiny_cfg):
    import os

    import ray

    from raysys.distill.sweep.tuner import max_concurrent as _max_concurrent

    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(max_concurrent_trials=None))
    cores = len(os.sched_getaffinity(0))
    logical = int(ray.cluster_resources()["CPU"])
    assert _max_concurrent(cfg) == min(logical, cores)
    cfg.distill = cfg.distill.model_copy(update=dict(max_concurrent_trials=3))
    assert _max_concurrent(cfg) == 3  # the config wins


def test_soft_targets_with_ray_data_match_the_teacher_and_are_reused(ray_cluster, tiny_cfg):
    from raysys.distill import compute_soft_targets, read_soft_targets, teacher_key

    cfg = tiny_cfg
    schema, pre, teacher = _teacher(cfg, num_epochs=1)
    # local_max_macs=0: Ray Data even for these few rows (tests/unit/test_soft_targets_unit.py: in process)
    st = compute_soft_targets(cfg.data.root, schema, pre, teacher, num_actors=2, hints=True, local_max_macs=0)
    assert not st.reused and st.num_actors == 2
    assert st.num_rows == {"train": cfg.data.num_train_rows, "validation": cfg.data.num_val_rows}
    assert Path(st.path).parent == Path(cfg.data.root) / "soft_targets"  # beside the data
    x_num, x_cat, y, logits, hints = read_soft_targets(st, "train", pre)
    assert logits.shape == (cfg.data.num_train_rows, schema.num_classes)
    assert hints.shape == (cfg.data.num_train_rows, cfg.teacher.hidden_dims[-1])
    # rows travel with their logits (no join), so the teacher on the stored rows gives the stored logits
    np.testing.assert_allclose(precompute_teacher_logits(teacher, x_num, x_cat), logits, rtol=1e-4, atol=1e-5)
    # the whole split is there (same labels as the source split, in some order)
    _, _, y_src = _split(cfg, pre, "train")
    assert np.array_equal(np.sort(y), np.sort(y_src))
    again = compute_soft_targets(cfg.data.root, schema, pre, teacher, num_actors=2, hints=True)
    assert again.reused and again.path == st.path
    # a different teacher (or the same one without hints) gets its own set
    key = teacher_key(teacher)
    assert st.key == key + "-h"
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    assert teacher_key(teacher) != key


def test_sweep_asha_optuna_over_size_picks_by_rule(ray_cluster, tiny_cfg, caplog, capsys):
    import csv
    import logging

    from raysys.distill import select_student

    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(
        search="optuna", scheduler="asha", num_samples=4, num_epochs=3, grace_period=1, reduction_factor=2,
        student_widths=[8, 32], student_depths=[1], max_concurrent_trials=2, accuracy_gap=0.05,
        hint_weight=0.1,  # same family as the teacher: the hint loss runs in every trial
        transfer_multiplier=0.5))  # and unlabeled transfer rows join every KD batch
    schema, pre, teacher = _teacher(cfg, num_epochs=3)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="raysys.distill.sweep"):
        res = run_sweep(cfg, schema, pre, teacher, run_name="distill-optuna")
    assert res.search == "optuna" and res.scheduler == "asha" and res.sweep_id == "distill-optuna"
    # progress: one log line per trial, saying how it ended, instead of Tune's console tables
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill: trial ")]
    assert sorted(line.split()[2] for line in lines) == ["1/4", "2/4", "3/4", "4/4"], lines
    assert {line.split()[3] for line in lines} == {str(t["trial_id"]) for t in res.trials}
    assert sum("stopped early after" in line for line in lines) == sum(t["stopped_early"] for t in res.trials)
    out = capsys.readouterr().out
    assert "Trial status:" not in out and "started with configuration" not in out, out[-2000:]
    assert len(res.trials) == 4 and all(t["error"] is None for t in res.trials)
    for t in res.trials:
        assert 1 <= t["temperature"] <= 20 and 0.1 <= t["alpha"] <= 0.9
        assert t["hidden_dims"] in ([8], [32]) and t["num_parameters"] > 0 and t["latency_ms_per_row"] > 0
    # the choice follows the stated rule over the trials' best checkpoints
    rows = [t for t in res.trials if t["best_val_accuracy"] is not None]
    i, _ = select_student(rows, res.teacher_val_accuracy, cfg.distill.accuracy_gap)
    assert rows[i]["chosen"] and sum(t["chosen"] for t in res.trials) == 1
    assert res.best_config["hidden_dims"] == res.student_spec["hidden_dims"] == rows[i]["hidden_dims"]
    assert res.pareto and all(t["pareto"] for t in res.trials if str(t["trial_id"]) in res.pareto)
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    # browsable results beside Tune's own files
    d = Path(res.results_dir)
    assert (d / "summary.md").read_text().startswith("# distillation sweep distill-optuna")
    assert len(list(csv.DictReader((d / "summary.csv").open()))) == 4
    assert json.loads((d / "sweep_summary.json").read_text())["selection_rule"] == res.selection_rule
    assert list(d.glob("*/result.json"))  # Tune's per-trial results
    assert res.soft_targets["teacher_passes_avoided"] >= 3
    assert res.soft_targets["hint_width"] == cfg.teacher.hidden_dims[-1]
    assert res.soft_targets["transfer"]["num_rows"] == cfg.data.num_train_rows // 2


def test_transfer_rows_scored_with_ray_data_match_the_teacher_and_are_reused(ray_cluster, tiny_cfg, monkeypatch):
    from raysys.distill import load_student_data, teacher_scoring

    monkeypatch.setattr(teacher_scoring, "LOCAL_SCORE_MAX_MACS", 0)  # Ray Data even for these few rows
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(transfer_multiplier=0.25))
    schema, pre, teacher = _teacher(cfg, num_epochs=1)
    data, _, st = load_student_data(cfg, pre, teacher)
    info = st.meta["transfer"]
    assert st.num_actors >= 1 and json.loads((Path(info["path"]) / "meta.json").read_text())["num_actors"] >= 1
    want = round(0.25 * cfg.data.num_train_rows)
    assert data.num_transfer == info["num_rows"] == want and not info["reused"]
    assert Path(info["path"]).parent == Path(st.path).parent  # beside the soft targets, not inside them
    # the stored logits are the teacher's on the stored rows
    np.testing.assert_allclose(precompute_teacher_logits(teacher, data.transfer_x_num, data.transfer_x_cat),
                               data.transfer_logits, rtol=1e-4, atol=1e-5)
    # new rows, not copies of the training split (MUNGE perturbs about half of each row's attributes)
    train = {tuple(r) for r in np.round(data.x_num, 5).tolist()}
    assert sum(tuple(r) in train for r in np.round(data.transfer_x_num, 5).tolist()) < want // 4
    again, _, st2 = load_student_data(cfg, pre, teacher)
    assert st2.meta["transfer"]["reused"] and st2.meta["transfer"]["path"] == info["path"]
    np.testing.assert_array_equal(np.sort(again.transfer_logits, axis=0), np.sort(data.transfer_logits, axis=0))


# A trainable whose score is known in advance (x, plus a little per epoch), so the promotions are too, and the
# Tuner that runs it: one trial at a time in grid order x = 4, 3, 2, 1; rungs at epochs 2 and 4 of 8, reduction
# factor 2 (a rung of at most 4 trials promotes at most 2). Source text, so that a driver process can run it too.
_PROMO_SWEEP = """
import json, tempfile, time
from pathlib import Path

from ray import tune

from raysys.distill.asha import KeepResultsOnPause, PauseAwareVariantGenerator, PromotionASHA, SchedulerState


def trainable(config):
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["epoch"] + 1
    for epoch in range(start, 9):
        time.sleep(config["pace"] if config["x"] <= 2 else 0.0)
        metrics = {"score": config["x"] + 0.01 * epoch, "epoch": epoch, "resumed": ckpt is not None}
        if epoch not in (2, 4):  # like the sweep's trials: checkpoints at the rungs (and on improvement)
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def make_tuner(storage, pace=0.0):
    sched = PromotionASHA(max_t=8, grace_period=2, reduction_factor=2, num_trials=4, max_concurrent=1)
    search = PauseAwareVariantGenerator(sched, max_concurrent=1)
    return tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                      param_space={"x": tune.grid_search([4, 3, 2, 1]), "pace": pace},
                      tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=sched, search_alg=search),
                      run_config=tune.RunConfig(name="promo", storage_path=storage, verbose=0,
                                                callbacks=[KeepResultsOnPause(sched), SchedulerState(sched)]))
"""

_PROMO_DRIVER = """
import sys

import ray

address, storage = sys.argv[1:3]
ns = {"__name__": "promo_sweep"}
exec(sys.stdin.read(), ns)
ray.init(address=address)
ns["make_tuner"](storage, pace=1.5).fit()
"""


def _promo_sweep() -> dict:
    ns = {"__name__": "promo_sweep"}  # not an importable module: Ray pickles its functions by value
    exec(_PROMO_SWEEP, ns)
    return ns


def _promo_rows(grid) -> dict[int, list[dict]]:
    return {r.config["x"]: [json.loads(line) for line in Path(r.path, "result.json").read_text().splitlines()]
            for r in grid}


def test_promotion_asha_pauses_promotes_and_resumes_trials_in_a_real_tune_run(ray_cluster, tmp_path):
    # x=4 waits at rung 2 until x=3 arrives, is promoted (resumed from its rung checkpoint) and waits at rung 4;
    # x=2 and x=1 have two above them at rung 2 and stop; x=3 is promoted from rung 2, loses to x=4 at rung 4 and
    # waits; x=4, at the end with nothing else to run, goes on to epoch 8; x=3 is stopped
    grid = _promo_sweep()["make_tuner"](str(tmp_path)).fit()
    epochs = {r.config["x"]: int(r.metrics["epoch"]) for r in grid}
    assert epochs == {4: 8, 3: 4, 2: 2, 1: 2}, epochs
    assert not grid.errors
    rows = _promo_rows(grid)
    # a promoted trial goes on from the epoch it was paused at (no epoch trained twice, none skipped), and its
    # result file keeps every row across the pauses (Tune copies it back from storage on resume)
    for x, rs in rows.items():
        assert [r["epoch"] for r in rs] == list(range(1, epochs[x] + 1)), (x, rs)
        assert [r["training_iteration"] for r in rs] == [r["epoch"] for r in rs]
    assert [r["resumed"] for r in rows[4]] == [False] * 2 + [True] * 6  # paused at rung 2 and again at rung 4
    assert [r["resumed"] for r in rows[3]] == [False] * 2 + [True] * 2


def test_an_interrupted_promotion_sweep_resumes_with_its_rungs(ray_cluster, tmp_path):
    # the driver is SIGKILLed while x=4 waits at rung 4, x=3 at rung 2 and x=2 runs (x <= 2 train slowly);
    # the resumed sweep must end as the uninterrupted one. With a fresh scheduler (Tune saves none) the waiting
    # trials came back as new ones and went on to their next rungs before anything was compared
    import os
    import signal
    import subprocess
    import sys
    import time

    from ray import tune

    exp = tmp_path / "promo"

    def rows_of(x: int) -> int:
        for f in exp.glob(f"*x={x}*/result.json"):
            return len(f.read_text().splitlines())
        return 0

    driver = subprocess.Popen([sys.executable, "-c", _PROMO_DRIVER, ray_cluster.address_info["address"],
                               str(tmp_path)], env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        driver.stdin.write(_PROMO_SWEEP.encode())
        driver.stdin.close()
        deadline = time.monotonic() + 180
        while not (rows_of(4) == 4 and rows_of(3) == 2) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"the driver ended early: {driver.stderr.read().decode()[-3000:]}"
        assert rows_of(4) == 4 and rows_of(3) == 2, "x=4 and x=3 did not reach their rungs in time"
        time.sleep(1.5)  # an experiment snapshot (every second here) that has them waiting
        assert rows_of(2) < 2 and rows_of(1) == 0, "x=2 reached its rung before the kill: raise the pace"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stderr.close()

    ns = _promo_sweep()
    grid = tune.Tuner.restore(str(exp), trainable=tune.with_resources(ns["trainable"], {"cpu": 1})).fit()
    epochs = {r.config["x"]: int(r.metrics["epoch"]) for r in grid}
    assert epochs == {4: 8, 3: 4, 2: 2, 1: 2}, epochs
    assert not grid.errors
    rows = _promo_rows(grid)
    # x=4 and x=3 went on from their rung checkpoints, each epoch once
    assert [r["epoch"] for r in rows[4]] == list(range(1, 9)), rows[4]
    assert [r["epoch"] for r in rows[3]] == list(range(1, 5)), rows[3]
    assert [r["resumed"] for r in rows[4]] == [False] * 2 + [True] * 6
