"""Trust checks on the demo data, in one process (no Ray): what each check finds and what it costs.

1. Label issues: the data quality check's confident learning (raysys.data.quality_labels) on the demo task's
   training rows with no noise of their own, after `noise` of the labels are flipped to another class at random:
   precision and recall of the flagged rows against the flipped ones, at 5% and 10%.
2. The demo teacher and student (the demo presets' architectures, trained with plain torch: the student
   distilled from the teacher's logits): accuracy under FGSM / PGD at the stated epsilon (standardized units)
   and under category flips, and the membership-inference AUC (loss threshold; reference-model attack with a
   reference trained on the validation rows).
3. The same teacher and student trained with DP-SGD (Opacus): epsilon at delta, membership-inference AUC, and
   the accuracy DP-SGD costs.

Prints one JSON object as its last line. `--train-rows` etc. shrink it for a quick look.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys.config import DPConfig, GovernanceConfig, preset  # noqa: E402
from raysys.data import Preprocessor  # noqa: E402
from raysys.data.quality_labels import find_label_issues, out_of_fold_probabilities  # noqa: E402
from raysys.data.synthetic import SyntheticTask  # noqa: E402
from raysys.models import build_model, model_spec  # noqa: E402
from raysys.trust import trust_figures  # noqa: E402
from raysys.trust.membership import membership_report  # noqa: E402


def _design(x_num: np.ndarray, x_cat: np.ndarray, cards: list[int]) -> np.ndarray:
    parts = [x_num.astype(np.float32)]
    for j, c in enumerate(cards):
        parts.append(np.eye(c, dtype=np.float32)[x_cat[:, j]])
    return np.concatenate(parts, 1)


def label_issue_scores(x: np.ndarray, y: np.ndarray, k: int, noise: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < noise
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, k, flipped.sum())) % k
    t0 = time.perf_counter()
    probs = out_of_fold_probabilities(x, noisy, k, num_folds=4, epochs=15, seed=seed)
    flagged, _ = find_label_issues(noisy, probs)
    tp = int((flagged & flipped).sum())
    return {"noise": noise, "flipped": int(flipped.sum()), "flagged": int(flagged.sum()),
            "precision": round(tp / max(int(flagged.sum()), 1), 4), "recall": round(tp / max(int(flipped.sum()), 1), 4),
            "seconds": round(time.perf_counter() - t0, 2)}


def train(spec: dict, data: tuple, *, epochs: int, lr: float, batch: int, seed: int, teacher_logits=None,
          temperature: float = 2.0, alpha: float = 0.7):
    torch.manual_seed(seed)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    xn, xc, y = (torch.as_tensor(a) for a in data)
    tl = None if teacher_logits is None else torch.as_tensor(teacher_logits)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            logits = model(xn[idx], xc[idx])
            loss = F.cross_entropy(logits, y[idx])
            if tl is not None:
                soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(tl[idx] / temperature, 1),
                                log_target=True, reduction="batchmean") * temperature ** 2
                loss = alpha * soft + (1 - alpha) * loss
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def logits_of(model, data: tuple) -> np.ndarray:
    return model(torch.as_tensor(data[0]), torch.as_tensor(data[1])).numpy()


def _figures(model, gov, test, tr, schema, reference=None, privacy=None) -> dict:
    t0 = time.perf_counter()
    fig = trust_figures(model, gov, test=test, train=tr, num_classes=schema.num_classes,
                        cardinalities=schema.cardinalities, num_perturbed=len(schema.numeric), privacy=privacy)
    rob, mia = fig["robustness"], fig["membership"]
    out = {"clean_accuracy": round(rob["clean_accuracy"], 4),
           "pgd_accuracy_at_epsilon": round(rob["accuracy_at_epsilon"], 4),
           "fgsm_accuracy_at_epsilon": round(rob["fgsm_accuracy_at_epsilon"], 4),
           "accuracy_at_flip_rate": round(rob["accuracy_at_flip_rate"], 4),
           "pgd_curve": {str(p["epsilon"]): round(p["pgd_accuracy"], 4) for p in rob["curve"]},
           "membership_auc": round(mia["loss_threshold"]["auc"], 4), "check_seconds": fig["seconds"]}
    if reference is not None:
        n = gov.max_rows
        ref = membership_report(model, tuple(a[:n] for a in tr), tuple(a[:n] for a in test), reference=reference)
        out["membership_auc_reference_model"] = round(ref["reference_model"]["auc"], 4)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _dp_train(spec, data, dp, *, epochs, lr, batch, seed, soft=None):
    from raysys.trust.dp import train_dp

    t0 = time.perf_counter()
    model, acct = train_dp(build_model(spec), *data, dp, epochs=epochs, batch_size=batch, lr=lr, seed=seed,
                           soft_targets=soft, alpha=0.7)
    return model, acct, round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-rows", type=int, default=20_000)
    ap.add_argument("--label-rows", type=int, default=6_000, help="Training rows of the label-issue runs.")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--dp-epochs", type=int, default=5)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=0.1, help="The stated PGD epsilon (standardized units).")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = preset("demo")
    cfg.data = cfg.data.model_copy(update={"label_noise": 0.0, "num_train_rows": args.train_rows})
    task = SyntheticTask(cfg.data)
    schema = task.schema()
    tables = {s: task.sample(n, [0, i]) for i, (s, n) in enumerate(
        (("train", args.train_rows), ("validation", 4000), ("test", 4000)), start=1)}
    pre = Preprocessor.fit(schema, tables["train"])
    tr, val, test = (pre.transform_table(tables[s]) for s in ("train", "validation", "test"))
    out: dict = {"benchmark": "trust", "setup": {"train_rows": args.train_rows, "test_rows": 4000, "threads": 1,
                                                  "torch": torch.__version__, "epsilon": args.epsilon}}
    x = _design(*tr[:2], schema.cardinalities)[: args.label_rows]
    out["label_issues"] = {f"noise_{int(n * 100)}pct": label_issue_scores(x, tr[2][: args.label_rows],
                                                                         schema.num_classes, n, seed=5)
                           for n in (0.05, 0.10)}
    gov = GovernanceConfig(epsilons=[0.05, 0.1, 0.25, 0.5], epsilon=args.epsilon, max_rows=2000)
    t_spec, s_spec = model_spec(schema, cfg.teacher), model_spec(schema, cfg.distill.student)
    t0 = time.perf_counter()
    teacher = train(t_spec, tr, epochs=args.teacher_epochs, lr=cfg.train.lr, batch=256, seed=0)
    t_secs = round(time.perf_counter() - t0, 2)
    soft = logits_of(teacher, tr).astype(np.float32)
    t0 = time.perf_counter()
    student = train(s_spec, tr, epochs=args.student_epochs, lr=cfg.distill.lr, batch=256, seed=0, teacher_logits=soft)
    s_secs = round(time.perf_counter() - t0, 2)
    ref = train(s_spec, val, epochs=args.student_epochs, lr=cfg.distill.lr, batch=256, seed=1)  # never saw train
    out["teacher"] = {**_figures(teacher, gov, test, tr, schema), "train_seconds": t_secs}
    out["student"] = {**_figures(student, gov, test, tr, schema, reference=ref), "train_seconds": s_secs}
    dp = DPConfig(noise_multiplier=args.noise_multiplier, max_grad_norm=1.0, delta=1e-5)
    dpt, t_acct, t_dsecs = _dp_train(t_spec, tr, dp, epochs=args.dp_epochs, lr=cfg.train.lr, batch=256, seed=0)
    dps, s_acct, s_dsecs = _dp_train(s_spec, tr, dp, epochs=args.dp_epochs, lr=cfg.distill.lr, batch=256, seed=0,
                                     soft=soft)
    for name, model, acct, secs, base in (("teacher_dp", dpt, t_acct, t_dsecs, out["teacher"]),
                                          ("student_dp", dps, s_acct, s_dsecs, out["student"])):
        fig = _figures(model, gov, test, tr, schema, privacy=acct)
        out[name] = {**fig, "epsilon": round(acct["epsilon"], 3), "delta": acct["delta"],
                     "noise_multiplier": acct["noise_multiplier"], "max_grad_norm": acct["max_grad_norm"],
                     "epochs": acct["epochs"], "train_seconds": secs,
                     "accuracy_cost": round(base["clean_accuracy"] - fig["clean_accuracy"], 4),
                     "train_time_ratio_vs_non_dp": round(secs / base["train_seconds"] * 1.0, 2)}
    out["summary"] = {
        "label_issue_precision_recall": {k: [v["precision"], v["recall"]] for k, v in out["label_issues"].items()},
        "teacher_accuracy_clean_vs_pgd": [out["teacher"]["clean_accuracy"], out["teacher"]["pgd_accuracy_at_epsilon"]],
        "student_accuracy_clean_vs_pgd": [out["student"]["clean_accuracy"], out["student"]["pgd_accuracy_at_epsilon"]],
        "membership_auc_teacher_without_with_dp": [out["teacher"]["membership_auc"], out["teacher_dp"]["membership_auc"]],
        "membership_auc_student_without_with_dp": [out["student"]["membership_auc"], out["student_dp"]["membership_auc"]],
        "dp_epsilon_teacher_student": [out["teacher_dp"]["epsilon"], out["student_dp"]["epsilon"]],
        "dp_accuracy_cost_teacher_student": [out["teacher_dp"]["accuracy_cost"], out["student_dp"]["accuracy_cost"]],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
