"""Tier 3: teacher training on the session's local Ray cluster (2 Ray Train workers, gloo DDP). A worker killed
mid-epoch resuming from its last checkpoint: tests/integration/test_chaos_ray.py (zero3 ranks on two nodes)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from raysys.data import Preprocessor, ensure_dataset, read_split
from raysys.models import predict_logits
from raysys.train import TeacherResult, train_teacher
from raysys.train.checkpoint import META_FILE, MODEL_FILE, read_meta

pytestmark = pytest.mark.integration


def _data(cfg):
    schema = ensure_dataset(cfg.data)
    return schema, Preprocessor.fit_split(schema, cfg.data.root)


def test_use_gpu_on_this_gpu_less_cluster_fails_naming_the_key_before_any_worker(ray_cluster, tiny_cfg):
    """A config asking for GPUs on a cluster without any: a ValueError naming train.use_gpu and the fix, not a
    CUDA traceback in a worker nor a fit() that waits forever for GPUs; no run directory is left."""
    import ray

    cfg = tiny_cfg
    cfg.train.use_gpu = True
    schema, pre = _data(cfg)
    assert not ray.cluster_resources().get("GPU")
    with pytest.raises(ValueError, match=r"train\.use_gpu: .* this Ray cluster has 0 GPU\(s\); set "
                                         r"train\.use_gpu: false"):
        train_teacher(cfg, schema, pre)
    assert not os.path.exists(os.path.join(cfg.run_dir, "teacher"))  # refused before Ray Train made the run


@pytest.mark.timeout(300)
def test_train_teacher_tiny(ray_cluster, tiny_cfg):
    import signal

    cfg = tiny_cfg
    assert cfg.train.num_workers == 2
    schema, pre = _data(cfg)
    before = signal.getsignal(signal.SIGINT)
    res = train_teacher(cfg, schema, pre)
    # Ray Train's fit() installs its own SIGINT handler and leaves it: Ctrl-C after training must not reach it
    assert signal.getsignal(signal.SIGINT) is before

    assert isinstance(res, TeacherResult) and res.run_name == "teacher"
    assert [m["epoch"] for m in res.metrics] == list(range(cfg.train.num_epochs))
    for m in res.metrics:
        assert {"epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s", "elapsed_s"} <= set(m)
        assert m["resumes"] == 0 and m["samples_per_s"] > 0
        # the workers saw the controller's report-collection interval raysys set for the run
        assert m["report_poll_interval_s"] == float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
                                                    or cfg.train.report_poll_interval_s)
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]

    val = read_split(cfg.data.root, "validation")
    x_num, x_cat, y = pre.transform_table(val)
    majority = np.bincount(y).max() / len(y)
    final = res.metrics[-1]["val_accuracy"]
    # 4 balanced classes: majority ~0.25-0.3; the tiny teacher reaches ~0.72 in 6 epochs
    assert final > max(0.6, majority + 0.2), (final, majority)

    assert MODEL_FILE in os.listdir(res.checkpoint_dir)
    meta = read_meta(res.checkpoint_dir)
    assert meta["epoch"] == cfg.train.num_epochs - 1 and meta["model_spec"] == res.model_spec
    assert meta["extra"]["preprocessor"] == pre.to_dict()
    # the reported numbers are global: all-reduced across both ranks' halves of the validation split,
    # so they match the saved weights evaluated in one process on the whole split
    model = res.load_model()
    acc = float((predict_logits(model, x_num, x_cat).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(final, abs=1.5 / len(y))

    # resume=True on a finished run trains nothing and returns the stored result
    again = train_teacher(cfg, schema, pre, run_name=res.run_name, resume=True)
    assert again.run_name == res.run_name and again.metrics == res.metrics
    assert (again.state_dict()["head.weight"] == res.state_dict()["head.weight"]).all()
    assert META_FILE in os.listdir(again.checkpoint_dir)


@pytest.mark.timeout(420)
def test_a_dp_sgd_teacher_on_two_ranks_reports_epsilon_and_resumes_with_its_accounting(ray_cluster, tiny_cfg):
    """`train.dp` in the Ray Train loop: two ranks of Poisson batches over the whole split (round(rows / batch)
    steps an epoch), epsilon per epoch from the accountant, learning through the noise; a resume continues the
    step count, so the accounting of the 3rd epoch is that of 3 epochs of steps."""
    pytest.importorskip("opacus")
    from raysys.config import DPConfig
    from raysys.trust.dp import dp_accounting, steps_per_epoch

    cfg = tiny_cfg
    cfg.train.dp = DPConfig(noise_multiplier=0.7, max_grad_norm=1.0)
    cfg.train.num_epochs = 2
    schema, pre = _data(cfg)
    first = train_teacher(cfg, schema, pre, run_name="teacher-dp")
    rows = round(cfg.train.batch_size / first.metrics[0]["dp"]["sample_rate"])  # every rank's rows together
    assert abs(rows - len(read_split(cfg.data.root, "train"))) <= cfg.train.num_workers  # equal split drops < world
    per_epoch = steps_per_epoch(rows, cfg.train.batch_size)
    assert [m["dp"]["steps"] for m in first.metrics] == [per_epoch, 2 * per_epoch]
    assert 0 < first.metrics[0]["dp"]["epsilon"] < first.metrics[1]["dp"]["epsilon"]

    cfg.train.num_epochs = 3
    # a resume under other DP-SGD settings is refused on the driver: its epsilon would not cover the first epochs
    cfg.train.dp = DPConfig(noise_multiplier=2.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="train.dp: cannot resume from .*trained with DP-SGD settings"):
        train_teacher(cfg, schema, pre, run_name="teacher-dp", resume=True)
    cfg.train.dp = DPConfig(noise_multiplier=0.7, max_grad_norm=1.0)
    again = train_teacher(cfg, schema, pre, run_name="teacher-dp", resume=True)
    assert [m["resumes"] for m in again.metrics] == [0, 0, 1]
    last = again.metrics[-1]["dp"]
    assert last == dp_accounting(cfg.train.dp, sample_rate=last["sample_rate"], steps=3 * per_epoch, epochs=3)
    val = read_split(cfg.data.root, "validation")
    y = pre.transform_table(val)[2]
    majority = np.bincount(y).max() / len(y)
    assert again.metrics[-1]["val_accuracy"] > majority + 0.1  # it learns through the clipping and noise
    # what the registry gets: the plain model's weights (no Opacus wrapper names), which predict as reported
    model = again.load_model()
    x_num, x_cat, y = pre.transform_table(val)
    acc = float((predict_logits(model, x_num, x_cat).argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(again.metrics[-1]["val_accuracy"], abs=0.02)
