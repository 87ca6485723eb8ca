"""Benchmark: does distillation earn its place? On the synthetic demo data and on scikit-learn's bundled
digits data (real 8x8 handwritten digits, 1797 rows, 64 features, 10 classes).

    .venv/bin/python benchmarks/distill.py [--quick]

Per data set: train every candidate teacher (plain torch, one process: this measures distillation, not
Ray Train): the TabularMLP (~0.1M parameters) with ReLU and with exact GELU, the FT-Transformer
(`teacher.family: ft_transformer`, size tiny), an ensemble of five ReLU MLPs (Hinton et al. 2015's teacher)
and `mlp_large` (the `large` preset's 1024-1024-512-256 GELU body, ~1.7M parameters), each with its own
recipe (AdamW, linear warmup then cosine decay, best validation epoch kept; see TEACHERS: the recipes were
picked on VALIDATION accuracy by `--teacher-grid`, which reruns that search), and distill the one with the
highest held-out accuracy (`--teacher auto`; ties go to the earlier, cheaper one): on synthetic its
4,000-row validation split; on digits 5-fold cross-validation over the training + validation rows, since
its 269-row validation split moves 0.37 points per row and cannot rank candidates ~1 point apart
(`TEACHER_SELECTION`, `--teacher-selection`; `teacher_selection` reports every candidate's per-fold
accuracy, the paired differences and what the validation split alone would have picked). The teacher is the
best one we can train in the budget, whatever that does to the latency ratio (latency plays no part in the
choice); every candidate's accuracy, size and latency is reported (`teachers`,
`latency_speedup_by_teacher`) so a reader can judge. Then compute the chosen teacher's soft targets once
with Ray Data, run the ASHA + Optuna sweep over temperature, alpha, lr and student width/depth, and pick the
smallest student within `accuracy_gap` of the teacher. Then, on the test split:

The transfer set (`distill.transfer_multiplier`, here 4): besides the labeled training rows, the teacher
scores 4x as many UNLABELED rows made from the training split by MUNGE (Bucila et al. 2006, "Model
compression": each new row mixes a training row with its nearest neighbour, attribute by attribute), with
Ray Data like the other soft targets. They feed only the soft KD term; validation and test rows are never
used. A no-KD student (alpha = 0) cannot use unlabeled rows, so it trains on the labeled rows alone, with
the same labeled batches, steps, lr, epochs and seeds.

- teacher accuracy, chosen student accuracy, retention (student / teacher), param_ratio;
- latency with one torch thread, eager `inference_mode` calls exactly as the Serve replica makes them, the
  same path for every model, all models measured side by side in one process (blocks of calls interleaved
  over rounds, the same rows for each: `raysys.evaluate.compare_latency`): per row (one row per call, p50)
  and per row inside a batch of 64; `latency_speedup` = teacher / student per-row p50 at batch 1,
  `latency_speedup_batched` the same at batch 64; `call_floor_ms` is one bare nn.Linear called the same
  way, the per-call overhead no eager torch model can go below;
- `kd_minus_nokd_test_split`: the chosen student's architecture and lr retrained outside the sweep with its
  (T, alpha) and without distillation (alpha = 0, plain cross-entropy), same epochs, each keeping its best
  validation epoch, over 5 seeds; median test accuracy difference in points, with every seed's accuracies,
  the paired per-seed differences, their mean, standard error and min/max (`kd_minus_nokd_per_seed`).
  `kd_minus_nokd` is this figure on synthetic, and on digits the cross-validated mean below (when
  `--cv-repeats` > 0; `kd_minus_nokd_source` says which);
- `kd_vs_nokd_cv` (digits, `--cv-repeats`): one test split of 269 rows moves 0.37 points per row, so the
  same comparison is also made by repeated stratified 5-fold cross-validation over all 1797 rows: in each
  fold a fresh teacher (same family and recipe) and both students train on the other folds (15% of them
  held out for the best-epoch choice, transfer rows made from the fold's training rows only) and are
  tested on the held-out fold; pairs are per (repeat, fold, seed), the standard error is over folds (seeds
  averaged within a fold first). Hyperparameters come from the sweep, which only ever saw the standard
  split's validation rows;
- the dynamic-int8 variant's accuracy and latency;
- what precomputed soft targets saved: one epoch with the teacher run on every batch (online KD) vs one
  epoch reading stored logits, times the epochs the sweep ran, minus the Ray Data precompute.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import start_quiet_ray

from raysys.config import DataConfig, ModelConfig, PipelineConfig, preset  # noqa: E402
from raysys.data import Preprocessor, ensure_dataset, read_split  # noqa: E402
from raysys.distill import (  # noqa: E402
    StudentData,
    fit_student,
    load_student_data,
    precompute_teacher_logits,
    run_sweep,
)
from raysys.evaluate import compare_latency  # noqa: E402
from raysys.models import build_model, model_spec, num_parameters, predict_logits  # noqa: E402
from raysys.models.quantize import quantize_dynamic_int8  # noqa: E402

log = logging.getLogger("bench")
TRANSFER_MULTIPLIER = 4.0  # unlabeled MUNGE transfer rows per labeled training row (soft targets only)


def digits_dataset(root: Path):
    """scikit-learn's digits (shipped inside the package, no download) in the raysys dataset layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from raysys.data.byod import import_parquet

    out = root / "digits"
    if not (out / "schema.json").exists():
        d = load_digits()
        cols = {f"px{i}": d.data[:, i].astype(np.float64) for i in range(d.data.shape[1])}
        cols["digit"] = d.target.astype(np.int64)
        root.mkdir(parents=True, exist_ok=True)
        src = root / "digits_src.parquet"
        pq.write_table(pa.table(cols), src)
        import_parquet(src, out, label="digit", val_fraction=0.15, test_fraction=0.15, seed=0)
    return out


def make_cfg(root: Path, name: str, quick: bool) -> PipelineConfig:
    cfg = preset("demo").with_root(root / name)
    if name == "digits":
        cfg.data = DataConfig(root=str(digits_dataset(root)), source="parquet")
        cfg.distill = cfg.distill.model_copy(update=dict(
            num_epochs=20 if quick else 40, batch_size=64, student_widths=[8, 16, 32], student_depths=[1, 2],
            lr_range=(1e-3, 3e-2)))
    else:
        if quick:
            cfg.data = cfg.data.model_copy(update=dict(num_train_rows=6000, num_val_rows=1500, num_test_rows=2000))
        # widths up to 64: with a 0.1M-parameter teacher (0.885 val) no 32-wide student came within the gap and
        # 64x64 is ~6% of it; against the chosen mlp_large (0.894 val) no student here comes within the 1-point
        # gap, so the sweep's rule falls back to its most accurate trial (reported in `sweep.selection_rule`)
        cfg.distill = cfg.distill.model_copy(update=dict(
            num_epochs=8 if quick else 15, student_widths=[16, 32, 64], student_depths=[1, 2]))
    cfg.distill = cfg.distill.model_copy(update=dict(
        search="optuna", scheduler="asha", num_samples=6 if quick else 12, grace_period=1, reduction_factor=3,
        accuracy_gap=0.01, max_concurrent_trials=None, transfer_multiplier=TRANSFER_MULTIPLIER))
    return cfg


@dataclass(frozen=True)
class Recipe:
    """How a teacher is trained: AdamW (weight decay on >= 2-D weights only, not embeddings or the feature
    tokenizer), linear warmup over `warmup` of the steps, then cosine decay to 0; best validation epoch kept."""

    lr: float
    weight_decay: float
    epochs: int
    batch_size: int = 128
    warmup: float = 0.05
    members: int = 1  # > 1: an ensemble of that many copies trained from different seeds (MLPEnsemble)


# Teacher candidates per data set: (architecture, recipe), cheapest first (ties on validation accuracy go to
# the earlier one). Recipes picked on VALIDATION accuracy with `--teacher-grid` (lr in {1e-3, 3e-3} x
# epochs in {E/2, E} per candidate, seed 0; weight decay 1e-5 vs 1e-3 made no difference in a first pass);
# the test split played no part. The FT-Transformer is the tiny preset (see the report for larger ones).
# Besides the ~0.1M-parameter MLPs, two bigger teachers of the kind distillation is for (too costly to
# serve): `mlp_large`, the `large` preset's teacher body (hidden 1024-1024-512-256, exact GELU; dropout 0.1,
# 0.3 on digits' 1259 training rows), ~1.7M parameters; and `mlp_relu_x5`, Hinton et al.'s (2015) original
# teacher, an ensemble: five `mlp_relu`s from five seeds, log-probabilities averaged (the ReLU ensemble beat
# the GELU one on validation on both data sets in the grid). Which one is distilled is decided by held-out
# accuracy alone (TEACHER_SELECTION below, run_dataset); latency plays no part in the choice.
_MLP = dict(hidden_dims=[256, 256, 128], embed_dim=8)
_LARGE = dict(hidden_dims=[1024, 1024, 512, 256], embed_dim=8, activation="gelu")
TEACHERS: dict[str, dict[str, tuple[ModelConfig, Recipe]]] = {
    "synthetic": {
        "mlp_relu": (ModelConfig(**_MLP, activation="relu"), Recipe(lr=3e-3, weight_decay=1e-5, epochs=10)),
        "mlp_gelu": (ModelConfig(**_MLP, activation="gelu"), Recipe(lr=3e-3, weight_decay=1e-5, epochs=10)),
        "ft_transformer": (ModelConfig(family="ft_transformer", size="tiny"),
                           Recipe(lr=1e-3, weight_decay=1e-5, epochs=40)),
        "mlp_relu_x5": (ModelConfig(**_MLP, activation="relu"),
                        Recipe(lr=3e-3, weight_decay=1e-5, epochs=20, members=5)),
        "mlp_large": (ModelConfig(**_LARGE, dropout=0.1), Recipe(lr=1e-3, weight_decay=1e-5, epochs=10)),
    },
    "digits": {
        # 1259 training rows: the MLP needs dropout to generalise (an overfit teacher teaches its errors)
        "mlp_relu": (ModelConfig(**_MLP, dropout=0.2, activation="relu"), Recipe(lr=1e-3, weight_decay=1e-5, epochs=60)),
        "mlp_gelu": (ModelConfig(**_MLP, dropout=0.2, activation="gelu"), Recipe(lr=3e-3, weight_decay=1e-5, epochs=60)),
        "ft_transformer": (ModelConfig(family="ft_transformer", size="tiny"),
                           Recipe(lr=3e-3, weight_decay=1e-5, epochs=60)),
        "mlp_relu_x5": (ModelConfig(**_MLP, dropout=0.2, activation="relu"),
                        Recipe(lr=3e-3, weight_decay=1e-5, epochs=60, members=5)),
        "mlp_large": (ModelConfig(**_LARGE, dropout=0.3), Recipe(lr=1e-3, weight_decay=1e-5, epochs=60)),
    },
}


# How `--teacher auto` picks among the candidates, per data set (accuracy only, whatever it does to the
# latency ratio; ties go to the earlier, cheaper candidate). Synthetic: its 4,000-row validation split.
# Digits: 5-fold cross-validation over the 1,528 training + validation rows (each candidate trained five
# times, scored on every one of those rows once; the test split plays no part): its validation split has
# 269 rows, one row moves accuracy 0.37 points, and the candidates' accuracies there are within ~1 point
# (mlp_relu and mlp_gelu tie at 0.9926), so one split of that size cannot rank them.
TEACHER_SELECTION = {"synthetic": "validation", "digits": "cv"}


class MLPEnsemble(torch.nn.Module):
    """Inference-only ensemble of same-architecture TabularMLPs: forward = the mean of the members'
    log-softmax (the log of their geometric-mean probabilities, a valid logit vector for KD).

    The members' weights are stacked, so one call runs every member at once (one batched matmul per layer,
    `baddbmm`) instead of a Python loop over members: at batch 1 on one thread that was ~1.6x faster
    (5 x mlp_relu: ~200 us vs ~330 us per call), i.e. the teacher gets the faster of the two forms.
    """

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        first = members[0]
        self.num_members, self.num_categorical = len(members), first.num_categorical
        if self.num_categorical:
            self.embedding = torch.nn.Parameter(torch.stack([m.embeddings.weight.detach() for m in members]))
            self.register_buffer("offsets", first.embeddings.offsets.clone())
        linears = [[layer for layer in m.body if isinstance(layer, torch.nn.Linear)] + [m.head] for m in members]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([ls[i].weight.detach().t() for ls in linears]).contiguous())
             for i in range(len(linears[0]))])
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in linears]))
             for i in range(len(linears[0]))])
        self.act = next(layer for layer in first.body if not isinstance(layer, (torch.nn.Linear, torch.nn.Dropout)))
        self.eval()

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        h = x_num.expand(self.num_members, *x_num.shape)
        if self.num_categorical:
            h = torch.cat([h, self.embedding[:, x_cat + self.offsets].flatten(2)], dim=2)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = self.act(torch.baddbmm(b, h, w))
        return torch.log_softmax(torch.baddbmm(self.biases[-1], h, self.weights[-1]), dim=-1).mean(0)


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and "embedding" not in name and "tokenizer" not in name


def train_teacher(schema, model_cfg: ModelConfig, recipe: Recipe, train, val, *, seed: int = 0):
    """A plain single-process teacher on (x_num, x_cat, y) arrays; returns (model in eval mode, info).

    `recipe.members` > 1: that many members, member i trained alone from seed `100 * seed + i` (each keeps
    its own best validation epoch), then stacked into an `MLPEnsemble`."""
    if recipe.members > 1:
        t0 = time.perf_counter()
        one = dataclasses.replace(recipe, members=1)
        fits = [train_teacher(schema, model_cfg, one, train, val, seed=100 * seed + i) for i in range(recipe.members)]
        model = MLPEnsemble([m for m, _ in fits])
        return model, {"val_accuracy": round(test_accuracy(model, val), 4), "val_nll": round(val_nll(model, val), 4),
                       "member_val_accuracy": [info["val_accuracy"] for _, info in fits],
                       "best_epoch": [info["best_epoch"] for _, info in fits],
                       "train_s": round(time.perf_counter() - t0, 1)}
    x_num, x_cat, y = (torch.as_tensor(a) for a in train)
    torch.manual_seed(seed)
    model = build_model(model_spec(schema, model_cfg))
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if _decays(n, p)], "weight_decay": recipe.weight_decay},
                             {"params": [p for n, p in named if not _decays(n, p)], "weight_decay": 0.0}],
                            lr=recipe.lr)
    total = recipe.epochs * math.ceil(len(y) / recipe.batch_size)
    warm = max(1, int(recipe.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = -1.0, None, -1
    t0 = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            loss = F.cross_entropy(model(x_num[idx], x_cat[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = test_accuracy(model, val)
        if acc > best:
            best, best_epoch, best_state = acc, epoch, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), {"val_accuracy": round(best, 4), "val_nll": round(val_nll(model, val), 4),
                          "best_epoch": best_epoch, "train_s": round(time.perf_counter() - t0, 1)}


def teacher_grid(name: str, root: Path) -> list[dict]:
    """The recipe search behind TEACHERS: every candidate x lr x epochs, selection on validation accuracy."""
    cfg = make_cfg(root, name, False)
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    train, val, test = (pre.transform_table(read_split(cfg.data.root, s)) for s in ("train", "validation", "test"))
    rows = []
    for family, (model_cfg, base) in TEACHERS[name].items():
        for lr, epochs in itertools.product((1e-3, 3e-3), sorted({base.epochs // 2, base.epochs})):
            recipe = dataclasses.replace(base, lr=lr, epochs=epochs)
            model, info = train_teacher(schema, model_cfg, recipe, train, val)
            rows.append({"dataset": name, "teacher": family, **dataclasses.asdict(recipe), **info,
                         "test_accuracy": round(test_accuracy(model, test), 4)})
            log.info("[%s] teacher grid %s", name, json.dumps(rows[-1]))
    return rows


def test_accuracy(model, arrays) -> float:
    x, c, y = arrays
    return float((predict_logits(model, x, c).argmax(1).numpy() == y).mean())


def val_nll(model, arrays) -> float:
    """Cross-entropy of the model's probabilities on the true labels (reported only: the teacher is chosen on
    accuracy)."""
    x, c, y = arrays
    return float(F.cross_entropy(predict_logits(model, x, c), torch.as_tensor(y)))


def best_epoch_fit(config: dict, data: StudentData, **kw):
    """fit_student keeping the best validation epoch's weights (what the sweep's checkpoints do)."""
    best = {"acc": -1.0, "state": None}

    def report(m, state):
        if m["val_accuracy"] > best["acc"]:
            best.update(acc=m["val_accuracy"], state=state.weights)

    fit_student(config, data, report, **kw)
    model = build_model(config["student_spec"])
    model.load_state_dict(best["state"])
    return model.eval()


class CallFloor(torch.nn.Module):
    """One Linear on the numeric features: the least an eager model call costs (dispatch, no real compute)."""

    def __init__(self, num_numeric: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(num_numeric, num_classes)

    def forward(self, x_num, x_cat):
        return self.linear(x_num)


def latency_table(models: dict[str, torch.nn.Module], x, c) -> dict[str, dict[str, float]]:
    """Per-row latency of every model, measured side by side (raysys.evaluate.compare_latency: blocks of 50
    calls per model, interleaved over 20 rounds, the same rows for every model, one torch thread):
    per_row_p50_ms / per_row_p99_ms at batch 1 (one row per call, how a request is scored alone) and
    per_row_in_batch64_ms (a batch-64 call's p50 divided by 64, what a row costs when Serve batches)."""
    torch.set_num_threads(1)
    res = compare_latency(models, x, c, batch_sizes=(1, 64), rounds=20, block=50, warmup=5)["per_row_ms"]
    return {name: {"per_row_p50_ms": round(r["batch1"]["p50"], 5), "per_row_p99_ms": round(r["batch1"]["p99"], 5),
                   "per_row_in_batch64_ms": round(r["batch64"]["p50"], 5)} for name, r in res.items()}


def epoch_seconds(config: dict, data: StudentData, teacher=None, repeats: int = 3) -> float:
    cfg1 = {**config, "num_epochs": 1}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit_student(cfg1, data, teacher=teacher)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_stats(a: list[float], b: list[float]) -> dict:
    """Mean, standard error, median and range of the paired differences a - b, in accuracy points."""
    d = [100 * (x - y) for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": round(statistics.fmean(d), 3), "se": round(se, 3), "median": round(statistics.median(d), 3),
            "min": round(min(d), 2), "max": round(max(d), 2), "positive": sum(x > 0 for x in d),
            "negative": sum(x < 0 for x in d), "n": len(d)}


def stratified_folds(schema, table, *, folds: int, repeats: int = 1, val_fraction: float = 0.15, seed: int = 0):
    """Repeated stratified k-fold over the rows of `table`: yields (k, train_table, pre, train, val, held_out):
    `train`, `val` and `held_out` are (x_num, x_cat, y) arrays made by a Preprocessor fitted on the fold's
    training rows only; `val` is `val_fraction` of the other folds (stratified), held out for best-epoch
    choices, and `held_out` is fold k, the rows the fold is scored on; `pre` is that Preprocessor. Every row
    is held out once per repeat."""
    import pyarrow as pa
    from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

    labels = schema.label_indices(table.column(schema.label).to_numpy(zero_copy_only=False))
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    for k, (rest, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        tr_idx, va_idx = train_test_split(rest, test_size=val_fraction, stratify=labels[rest], random_state=seed + k)
        tr_table = table.take(pa.array(tr_idx))
        pre = Preprocessor.fit(schema, tr_table)
        yield (k, tr_table, pre, pre.transform_table(tr_table),
               *(pre.transform_table(table.take(pa.array(i))) for i in (va_idx, held)))


def cv_teacher_scores(schema, table, candidates: dict[str, tuple[ModelConfig, Recipe]], *, folds: int = 5) -> dict:
    """Each candidate teacher's held-out accuracy by stratified k-fold over `table` (the training and
    validation splits: the test split plays no part): in fold k every candidate trains (seed k) on the
    same rows with its own recipe and is scored on the same held-out fold. Returns the per-fold accuracies,
    their means, each candidate's paired per-fold difference to the best mean, and `chosen`: the highest
    mean (ties go to the earlier, cheaper candidate)."""
    acc: dict[str, list[float]] = {f: [] for f in candidates}
    t0 = time.perf_counter()
    for k, _, _, tr, va, held in stratified_folds(schema, table, folds=folds):
        for family, (model_cfg, recipe) in candidates.items():
            model, _ = train_teacher(schema, model_cfg, recipe, tr, va, seed=k)
            acc[family].append(test_accuracy(model, held))
        log.info("teacher cv fold %d/%d: %s", k + 1, folds, {f: round(a[-1], 4) for f, a in acc.items()})
    return {"method": f"stratified {folds}-fold cross-validation over the training + validation rows",
            "rows": table.num_rows, "folds": folds, **choose_by_cv(acc), "wall_s": round(time.perf_counter() - t0, 1)}


def choose_by_cv(acc: dict[str, list[float]]) -> dict:
    """The candidate with the highest mean per-fold accuracy (the first one on a tie), every candidate's mean
    and its paired per-fold difference to the chosen one in points (mean, standard error, min/max)."""
    means = {f: statistics.fmean(a) for f, a in acc.items()}
    chosen = max(acc, key=lambda f: means[f])  # max keeps the first maximum: ties go to the earlier candidate
    return {"chosen": chosen,
            "accuracy_mean": {f: round(m, 4) for f, m in means.items()},
            "accuracy_per_fold": {f: [round(x, 4) for x in a] for f, a in acc.items()},
            "vs_chosen_points": {f: paired_stats(a, acc[chosen]) for f, a in acc.items() if f != chosen}}


def cv_kd_vs_nokd(cfg: PipelineConfig, schema, model_cfg: ModelConfig, recipe: Recipe, student: dict, *,
                  repeats: int, folds: int = 5, seeds: int = 2, val_fraction: float = 0.15) -> dict:
    """KD vs no-KD by repeated stratified k-fold over every row of the data set (train + validation + test).

    Per fold: the preprocessor, a fresh teacher (`model_cfg`, `recipe`) and both students see only the
    other folds (`val_fraction` of them, stratified, held out for best-epoch choices; MUNGE transfer rows
    made from the rest); the held-out fold is their test set. `student`: spec, lr, T, alpha, epochs, batch.
    """
    import pyarrow as pa

    from raysys.distill.transfer import munge_arrays

    table = pa.concat_tables([read_split(cfg.data.root, s) for s in ("train", "validation", "test")])
    pairs, fold_means, teacher_accs = [], [], []
    t0 = time.perf_counter()
    for k, tr_table, pre, tr, va, te in stratified_folds(schema, table, folds=folds, repeats=repeats,
                                                         val_fraction=val_fraction):
        teacher, _ = train_teacher(schema, model_cfg, recipe, tr, va, seed=k)
        teacher_accs.append(test_accuracy(teacher, te))
        tx_num, tx_cat = munge_arrays(tr_table, schema, pre, round(TRANSFER_MULTIPLIER * len(tr[2])), seed=k)
        data = StudentData(x_num=tr[0], x_cat=tr[1], y=tr[2], teacher_logits=precompute_teacher_logits(
            teacher, tr[0], tr[1]), val_x_num=va[0], val_x_cat=va[1], val_y=va[2], transfer_x_num=tx_num,
            transfer_x_cat=tx_cat, transfer_logits=precompute_teacher_logits(teacher, tx_num, tx_cat))
        base = {"student_spec": student["spec"], "num_epochs": student["epochs"], "batch_size": student["batch"],
                "lr": student["lr"]}
        fold = []
        for seed in range(seeds):
            kd = test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": student["temperature"],
                                               "alpha": student["alpha"]}, data), te)
            nokd = test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": 1.0, "alpha": 0.0}, data), te)
            pairs.append({"repeat": k // folds, "fold": k % folds, "seed": seed, "kd": round(kd, 4),
                          "nokd": round(nokd, 4), "diff_points": round(100 * (kd - nokd), 2)})
            fold.append(100 * (kd - nokd))
        fold_means.append(statistics.fmean(fold))
        log.info("cv fold %d/%d: teacher %.4f, kd-nokd %s points", k + 1, folds * repeats, teacher_accs[-1],
                 [round(x, 2) for x in fold])
    se = statistics.stdev(fold_means) / math.sqrt(len(fold_means))
    return {"folds": folds, "repeats": repeats, "seeds_per_fold": seeds, "rows": table.num_rows,
            "test_rows_per_fold": table.num_rows // folds,
            "kd_accuracy_mean": round(statistics.fmean(p["kd"] for p in pairs), 4),
            "nokd_accuracy_mean": round(statistics.fmean(p["nokd"] for p in pairs), 4),
            "kd_minus_nokd_mean": round(statistics.fmean(fold_means), 3), "kd_minus_nokd_se_over_folds": round(se, 3),
            "retention_mean": round(statistics.fmean(p["kd"] for p in pairs) / statistics.fmean(teacher_accs), 4),
            "kd_minus_nokd_pairs": paired_stats([p["kd"] for p in pairs], [p["nokd"] for p in pairs]),
            "teacher_accuracy_mean": round(statistics.fmean(teacher_accs), 4), "pairs": pairs,
            "wall_s": round(time.perf_counter() - t0, 1)}


def run_dataset(name: str, root: Path, quick: bool, seeds: int, teacher_choice: str = "auto",
                cv_repeats: int = 0, teacher_selection: str = "auto") -> dict:
    cfg = make_cfg(root, name, quick)
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    torch.set_num_threads(1)
    train, val, test = (pre.transform_table(read_split(cfg.data.root, s)) for s in ("train", "validation", "test"))
    candidates = list(TEACHERS[name]) if teacher_choice == "auto" else [teacher_choice]
    teachers, reports, recipes = {}, {}, {}
    for family in candidates:
        model_cfg, recipe = TEACHERS[name][family]
        if quick:
            recipe = dataclasses.replace(recipe, epochs=max(1, recipe.epochs // 2))
        recipes[family] = recipe
        model, info = train_teacher(schema, model_cfg, recipe, train, val)
        teachers[family] = model
        reports[family] = {"spec": model_spec(schema, model_cfg), "recipe": dataclasses.asdict(recipe), **info,
                           "test_accuracy": round(test_accuracy(model, test), 4), "params": num_parameters(model)}
        log.info("[%s] %s teacher: %s", name, family, json.dumps(reports[family]))
    # the best teacher on validation; ties go to the earlier (cheaper) candidate: max keeps the first maximum
    val_choice = chosen = max(candidates, key=lambda f: reports[f]["val_accuracy"])
    selection = {"method": "validation split accuracy", "rows": int(len(val[2])), "chosen": chosen}
    if (TEACHER_SELECTION[name] if teacher_selection == "auto" else teacher_selection) == "cv" and len(candidates) > 1:
        import pyarrow as pa

        rows = pa.concat_tables([read_split(cfg.data.root, s) for s in ("train", "validation")])
        selection = cv_teacher_scores(schema, rows, {f: (TEACHERS[name][f][0], recipes[f]) for f in candidates})
        chosen = selection["chosen"]
        log.info("[%s] teacher chosen by cross-validation: %s", name, json.dumps(selection))
    selection["validation_split_choice"] = val_choice
    teacher = teachers[chosen]
    cfg.teacher = TEACHERS[name][chosen][0]
    t_acc = reports[chosen]["test_accuracy"]

    t0 = time.perf_counter()
    sweep = run_sweep(cfg, schema, pre, teacher, run_name=f"bench-{name}")
    sweep_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    student = build_model(sweep.student_spec)
    student.load_state_dict(sweep.best_state_dict)
    student.eval()
    s_acc = test_accuracy(student, test)

    # KD vs no KD: the chosen architecture and recipe, retrained outside the sweep, several seeds
    data, _, targets = load_student_data(cfg, pre, teacher)
    base = {"student_spec": sweep.student_spec, "num_epochs": cfg.distill.num_epochs,
            "batch_size": cfg.distill.batch_size, "lr": sweep.best_config["lr"]}
    # the KD runs also see the unlabeled transfer rows (soft term only); alpha = 0 ignores them by construction
    kd, nokd = [], []
    for seed in range(seeds):
        kd.append(test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": sweep.best_config["temperature"],
                                                "alpha": sweep.best_config["alpha"]}, data), test))
        nokd.append(test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": 1.0, "alpha": 0.0}, data),
                                  test))
    cv = None
    if cv_repeats > 0:
        cv = cv_kd_vs_nokd(cfg, schema, cfg.teacher, recipes[chosen],
            {"spec": sweep.student_spec, "lr": sweep.best_config["lr"], "epochs": cfg.distill.num_epochs,
             "batch": cfg.distill.batch_size, "temperature": sweep.best_config["temperature"],
             "alpha": sweep.best_config["alpha"]}, repeats=cv_repeats)

    q = quantize_dynamic_int8(student)
    q_acc = test_accuracy(q, test)
    lat = latency_table({**{f"teacher:{f}": m for f, m in teachers.items()}, "student": student, "int8": q,
                         "call_floor": CallFloor(test[0].shape[1], schema.num_classes)}, test[0], test[1])
    for family in teachers:
        reports[family]["latency_ms"] = lat[f"teacher:{family}"]
    t_lat, s_lat, q_lat, floor = reports[chosen]["latency_ms"], lat["student"], lat["int8"], lat["call_floor"]

    # soft targets: what running the teacher inside every trial epoch would have cost
    kd_cfg = {**base, "seed": 0, "temperature": sweep.best_config["temperature"], "alpha": sweep.best_config["alpha"]}
    t0 = time.perf_counter()
    precompute_teacher_logits(teacher, data.x_num, data.x_cat)
    precompute_teacher_logits(teacher, data.val_x_num, data.val_x_cat)
    in_process_s = time.perf_counter() - t0
    e_pre = epoch_seconds(kd_cfg, data)
    e_online = epoch_seconds(kd_cfg, data, teacher=teacher)
    sweep_epochs = sum(t["epochs_run"] for t in sweep.trials)
    ray_data_s = float(sweep.soft_targets["compute_seconds"])
    online_extra = sweep_epochs * (e_online - e_pre)  # teacher time the trials would have spent

    t_params, s_params = num_parameters(teacher), num_parameters(student)
    kd_split = round(100 * (statistics.median(kd) - statistics.median(nokd)), 2)  # test split, median of seeds
    out = {
        "rows": {"train": int(len(data.y)), "validation": int(len(data.val_y)), "test": int(len(test[2]))},
        "num_classes": schema.num_classes,
        "teacher_choice": chosen, "teacher_selection": selection, "teacher_accuracy": round(t_acc, 4),
        "teacher_params": t_params,
        "teachers": reports,
        "best_student_accuracy": round(s_acc, 4), "student_params": s_params,
        "student_hidden_dims": sweep.student_spec["hidden_dims"], "best_config": sweep.best_config,
        "retention": round(s_acc / t_acc, 4), "param_ratio": round(s_params / t_params, 4),
        "latency_speedup": round(t_lat["per_row_p50_ms"] / s_lat["per_row_p50_ms"], 2),
        "latency_speedup_batched": round(t_lat["per_row_in_batch64_ms"] / s_lat["per_row_in_batch64_ms"], 2),
        "latency_speedup_by_teacher": {f: {"batch1": round(r["latency_ms"]["per_row_p50_ms"] / s_lat["per_row_p50_ms"], 2),
                                           "batch64": round(r["latency_ms"]["per_row_in_batch64_ms"]
                                                            / s_lat["per_row_in_batch64_ms"], 2)}
                                       for f, r in reports.items()},
        "teacher_latency_ms": t_lat, "call_floor_ms": floor, "student_latency_ms": s_lat,
        "kd_accuracy_median": round(statistics.median(kd), 4), "nokd_accuracy_median": round(statistics.median(nokd), 4),
        # with cross-validation (digits) the headline is its mean over folds: 1,797 held-out rows x 2 repeats
        # instead of one 269-row split (see kd_vs_nokd_cv); both are printed
        "kd_minus_nokd": cv["kd_minus_nokd_mean"] if cv else kd_split,
        "kd_minus_nokd_source": "cv" if cv else "test_split",
        "kd_minus_nokd_test_split": kd_split,
        "kd_accuracies": [round(a, 4) for a in kd], "nokd_accuracies": [round(a, 4) for a in nokd],
        "kd_minus_nokd_per_seed": [round(100 * (a - b), 2) for a, b in zip(kd, nokd)],
        "kd_minus_nokd_min_max": [round(100 * min(a - b for a, b in zip(kd, nokd)), 2),
                                  round(100 * max(a - b for a, b in zip(kd, nokd)), 2)],
        "kd_minus_nokd_stats": paired_stats(kd, nokd),
        "kd_vs_nokd_cv": cv,
        "transfer": sweep.soft_targets.get("transfer"),
        "int8": {"accuracy": round(q_acc, 4), "latency_ms": q_lat,
                 "speedup_vs_float_student": round(s_lat["per_row_p50_ms"] / q_lat["per_row_p50_ms"], 2)},
        "soft_targets": {"ray_data_compute_s": round(ray_data_s, 2), "in_process_compute_s": round(in_process_s, 3),
                         "epoch_s_precomputed": round(e_pre, 4), "epoch_s_online_teacher": round(e_online, 4),
                         "sweep_epochs": sweep_epochs,
                         "online_teacher_extra_s": round(online_extra, 2),
                         "saved_s_vs_online_ray_data": round(online_extra - ray_data_s, 2),
                         "saved_s_vs_online_in_process": round(online_extra - in_process_s, 2),
                         "trial_epoch_speedup": round(e_online / e_pre, 2)},
        "sweep": {"trials": len(sweep.trials), "wall_s": round(sweep_s, 1), "teacher_val_accuracy":
                  round(sweep.teacher_val_accuracy, 4), "chosen_val_accuracy": round(sweep.best_val_accuracy, 4),
                  "selection_rule": sweep.selection_rule, "pareto_size": len(sweep.pareto),
                  "summary_md": sweep.summary_files.get("markdown")},
        "targets_met": {"retention>=0.97": s_acc / t_acc >= 0.97, "param_ratio<=0.10": s_params / t_params <= 0.10,
                        "latency_speedup>=5": t_lat["per_row_p50_ms"] / s_lat["per_row_p50_ms"] >= 5,
                        "kd_beats_nokd": (cv["kd_minus_nokd_mean"] if cv else kd_split) > 0,
                        "kd_beats_nokd_test_split": kd_split > 0,
                        **({"kd_beats_nokd_cv": cv["kd_minus_nokd_mean"] > 0} if cv else {})},
    }
    log.info("[%s] %s", name, json.dumps(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data and sweeps (a smoke run)")
    p.add_argument("--datasets", default="synthetic,digits")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the KD vs no-KD comparison")
    p.add_argument("--root", default=None, help="work directory (default: a temp dir)")
    p.add_argument("--teacher", default="auto", choices=["auto", *TEACHERS["synthetic"]],
                   help="auto: train every candidate teacher, distill the one with the highest held-out accuracy "
                        "(see --teacher-selection)")
    p.add_argument("--teacher-selection", default="auto", choices=["auto", "validation", "cv"],
                   help="how --teacher auto picks among the candidates: validation split accuracy, or 5-fold "
                        "cross-validation over the training + validation rows; auto: per data set, "
                        "TEACHER_SELECTION (cv on digits, validation on synthetic)")
    p.add_argument("--cv-repeats", type=int, default=2,
                   help="repeats of the stratified 5-fold KD vs no-KD comparison on digits (0: off)")
    p.add_argument("--teacher-grid", action="store_true",
                   help="only rerun the teacher recipe search behind TEACHERS and print its table")
    args = p.parse_args(argv)
    if args.teacher_grid:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="raysys-bench-distill-") as tmp:
            root = Path(args.root) if args.root else Path(tmp)
            rows = [r for name in args.datasets.split(",") for r in teacher_grid(name, root)]
        print(json.dumps({"teacher_grid": rows}))
        return 0
    import ray

    load_start = [round(x, 2) for x in os.getloadavg()]
    start_quiet_ray(("ray", "ray.tune", "ray.data", "ray.train"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysys-bench-distill-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        results = {name: run_dataset(name, root, args.quick, args.seeds, args.teacher,
                                     args.cv_repeats if name == "digits" else 0, args.teacher_selection)
                   for name in args.datasets.split(",")}
    ray.shutdown()
    setup = {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
             "cpus": os.cpu_count(), "threads_for_latency": 1, "quick": args.quick, "seeds": args.seeds, "teacher": args.teacher,
             "teacher_selection": args.teacher_selection,
             "cv_repeats_digits": args.cv_repeats,
             "latency": "raysys.evaluate.compare_latency: every teacher candidate, the student, its int8 variant "
                        "and a bare Linear measured side by side in one process, 20 rounds x 50 timed calls each "
                        "(5 warmup calls per block), the same rows for all, 1 torch thread, eager "
                        "model(x_num, x_cat) in inference_mode (the Serve replica's call, same for every model); "
                        "latency_speedup = teacher/student per-row p50 at batch 1 (one row per call), "
                        "latency_speedup_batched = the same from batch-64 calls",
             "load_average_1_5_15": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
             "transfer_set": f"labeled training rows + {TRANSFER_MULTIPLIER:g}x as many unlabeled MUNGE rows made "
                             "from the training split, scored by the teacher with Ray Data (soft term only); the "
                             "no-KD student trains on the labeled rows with the same batches, steps, lr and seeds",
             "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({**results, "setup": setup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
