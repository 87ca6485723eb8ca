"""Small worlds the monitor and retrain tests share: the small synthetic task, rows drawn from it, and a
registry holding a student trained on it."""

from __future__ import annotations

import numpy as np
import torch

from helpers.serving import MODEL
from raysys.config import DataConfig, ModelConfig
from raysys.data import DriftSpec, Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec, predict_logits
from raysys.monitor.profile import ReferenceProfile
from raysys.registry import Registry

# what the retrain job trains with: seconds per stage on a busy 2-core box
RETRAIN_CONFIG = {
    "teacher": {"hidden_dims": [32, 32], "embed_dim": 3},
    "train": {"num_workers": 1, "num_epochs": 6, "batch_size": 64, "timeout_s": 60},
    "distill": {"student": {"hidden_dims": [16], "embed_dim": 3}, "search": "grid", "temperatures": [2.0],
                "alphas": [0.5], "num_epochs": 15, "batch_size": 64, "scheduler": "fifo",
                "max_concurrent_trials": 1, "soft_target_actors": 1, "quantize": False,
                "evaluation": {"latency_repeats": 5}},
    "monitor": {"calibration_rows": 10_000},
}


SMALL_TASK = DataConfig(num_numeric=4, num_categorical=2, num_categories=3, num_classes=3, seed=11)


def sample_rows(task: SyntheticTask, schema, n: int, seed, drift: DriftSpec | None = None):
    """n raw rows without the label (JSON-able dicts) and their true classes (indices)."""
    table = task.sample(n, seed, drift)
    labels = [int(v) for v in table.column(schema.label).to_pylist()]
    return table.drop_columns([schema.label]).to_pylist(), labels


def small_task_world():
    """The small synthetic task, its schema, 1,000 reference rows and the preprocessor fitted on them."""
    task = SyntheticTask(SMALL_TASK)
    schema = task.schema()
    table = task.sample(1000, [11, 7])
    return task, schema, table, Preprocessor.fit(schema, table)


def train_student_registry(root, *, epochs: int = 15) -> tuple[Registry, SyntheticTask, object]:
    """A registry at `root` with v1 (alias production) = a small TabularMLP trained on the synthetic task
    (accuracy well above chance), registered as the pipeline does: reference profile from the training
    features, held-out predictions and labels (calibration, held-out accuracy). Returns (registry, task,
    schema)."""
    task = SyntheticTask(SMALL_TASK)
    schema = task.schema()
    train, val = task.sample(8000, [11, 1]), task.sample(4000, [11, 2])
    pre = Preprocessor.fit(schema, train)
    xn, xc, y = (torch.as_tensor(a) for a in pre.transform_table(train))
    xc, y = xc.long(), y.long()
    spec = model_spec(schema, ModelConfig(hidden_dims=[32, 32], embed_dim=3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(spec)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):  # 15: ~5 s on one core; held-out accuracy ~0.89 (chance 0.33)
            model.train()
            for idx in torch.randperm(len(y), generator=gen).split(128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xn[idx], xc[idx]), y[idx]).backward()
                opt.step()
        vx, vc, vy = pre.transform_table(val)
        v_proba = predict_logits(model, vx, vc).double().softmax(1).numpy()
    finally:
        torch.set_num_threads(threads)
    profile = ReferenceProfile.from_arrays(schema, pre.raw_numeric(train), xc.numpy(), num_bins=10)
    profile.add_predictions(v_proba, np.asarray(vy))
    assert profile.prediction.accuracy > 0.8
    reg = Registry(root)
    reg.register(MODEL, state_dict=model.state_dict(), model_spec=spec, schema=schema, preprocessor=pre,
                 metrics={"accuracy": profile.prediction.accuracy}, config={}, lineage={"note": "test student"},
                 reference_profile=profile.to_dict())
    reg.set_alias(MODEL, "production", 1)
    return reg, task, schema


def stand_in_world(cfg: DataConfig, *, ert: float):
    """A synthetic task read through an identity preprocessor, and a stand-in "model" whose predicted
    probabilities are a noisy one-hot of the label (informative but imperfect, and whose accuracy does not
    depend on the inputs; `temperature` > 1 makes it less confident, as a shift that costs accuracy does).
    Returns (task, schema, arrays(n, seed, drift=None, temperature=1.0) -> (x_num, x_cat, y, proba), a
    reference profile calibrated at `ert`)."""
    task = SyntheticTask(cfg)
    schema = task.schema()
    ident = Preprocessor(schema, [0.0] * cfg.num_numeric, [1.0] * cfg.num_numeric)
    k = cfg.num_classes

    def arrays(n, seed, drift=None, temperature=1.0):
        x_num, x_cat, y = ident.transform_table(task.sample(n, seed, drift))
        rng = np.random.default_rng(seed if isinstance(seed, int) else seed[-1])
        logits = (2.0 * np.eye(k)[y] + rng.normal(0, 1.0, (n, k))) / temperature
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return x_num, x_cat, y, proba

    x, c, y, p = arrays(8000, 1)
    xh, ch, yh, ph = arrays(4000, 2)
    prof = ReferenceProfile.from_arrays(schema, x, c, num_bins=10, pred=p.argmax(1))
    prof.add_predictions(ph, yh)
    prof.calibrate(xh, ch, ph, ert=ert, num_rows=60_000)
    return task, schema, arrays, prof
