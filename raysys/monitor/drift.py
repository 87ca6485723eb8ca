"""The window tests: is the live window drawn from the reference? Per numeric feature KS against the
reference CDF, per categorical feature chi-squared, per class on the predictions; PSI and Jensen-Shannon
beside them; p-values adjusted across features."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import chdtrc

from raysys.monitor.profile import CAT_PROP_FLOOR
from raysys.monitor.refbins import SegmentedRefs
from raysys.monitor.stats import DEFAULT_EPS, adjust_pvalues, psi


class WindowTester:
    """Vectorised window tests of one profile: per numeric feature PSI and Jensen-Shannon on the coarse
    reference-quantile bins and KS against the binned reference CDF (the fine grid); per categorical feature
    PSI, JS and Pearson's chi-squared; per class KS on the predicted probabilities and chi-squared on the
    predicted classes (black-box shift detection). p-values are adjusted across features (BH or
    Bonferroni) and a feature is drifted when its adjusted p-value is below `alpha`; the dataset drifts
    when any feature does (for BH this is Simes' global test)."""

    def __init__(self, profile):
        self.profile = profile
        self.num = SegmentedRefs(profile.numeric)
        self.pred = SegmentedRefs(profile.prediction.per_class) if profile.prediction is not None else None
        self.cat_k = np.array([c.num_bins for c in profile.categorical], dtype=np.int64)
        self.cat_off = np.concatenate([[0], np.cumsum(self.cat_k)[:-1]]).astype(np.int64)
        props = [np.maximum(c.ref_props, CAT_PROP_FLOOR) for c in profile.categorical]
        self.cat_props = np.concatenate([p / p.sum() for p in props]) if props else np.zeros(0)
        self.cat_raw = np.concatenate([c.ref_props for c in profile.categorical]) if props else np.zeros(0)

    def _categorical(self, x_cat: np.ndarray) -> dict[str, np.ndarray]:
        n, k = x_cat.shape
        if not k:
            z = np.zeros(0)
            return {"psi": z, "js": z, "chi2": z, "chi2_p": z, "counts": []}
        counts = np.bincount((x_cat + self.cat_off).ravel(), minlength=int(self.cat_k.sum())).astype(np.float64)
        exp = self.cat_props * n
        chi = np.add.reduceat((counts - exp) ** 2 / np.maximum(exp, 1e-12), self.cat_off)
        p = chdtrc(np.maximum(self.cat_k - 1, 1), chi) if n else np.ones(k)
        # PSI and Jensen-Shannon of every feature at once (the same formulas as `psi`, `jensen_shannon`)
        kr = np.repeat(self.cat_k, self.cat_k)
        ref = self.cat_raw / np.repeat(np.add.reduceat(self.cat_raw, self.cat_off), self.cat_k)
        cur = counts / max(n, 1)
        eps = DEFAULT_EPS
        pc, pr = (cur + eps) / (1 + kr * eps), (ref + eps) / (1 + kr * eps)
        psi_v = np.add.reduceat((pc - pr) * np.log(pc / pr), self.cat_off) if n else np.zeros(k)
        m = (cur + ref) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(cur > 0, cur * np.log(cur / m), 0.0) + np.where(ref > 0, ref * np.log(ref / m), 0.0)
        js = np.add.reduceat(terms, self.cat_off) / 2 if n else np.zeros(k)
        return {"psi": psi_v, "js": js, "chi2": chi, "chi2_p": p,
                "counts": [counts[o:o + b] for o, b in zip(self.cat_off, self.cat_k)]}

    def test(self, x_num: np.ndarray, x_cat: np.ndarray, *, proba: np.ndarray | None = None,
             pred: np.ndarray | None = None, alpha: float = 0.01, method: str = "bh",
             armed: bool = True) -> dict[str, Any]:
        prof = self.profile
        n = len(x_num)
        num = self.num.stats(np.asarray(x_num, dtype=np.float64).reshape(n, len(prof.numeric)), prof.num_rows,
                             exact=True)
        cat = self._categorical(np.asarray(x_cat, dtype=np.int64).reshape(n, len(prof.categorical)))
        pvals = np.concatenate([num["ks_p"], cat["chi2_p"]])
        adj = adjust_pvalues(pvals, method)
        drifted = (adj < alpha) & armed & (n > 0)
        features: dict[str, dict[str, Any]] = {}
        n_num = len(prof.numeric)
        for j, ref in enumerate(prof.numeric):
            features[ref.name] = {"kind": "numeric", "test": "ks", "statistic": float(num["ks"][j]),
                                  "p_value": float(num["ks_p"][j]), "p_adjusted": float(adj[j]),
                                  "threshold": alpha, "psi": float(num["psi"][j]), "js": float(num["js"][j]),
                                  "drifted": bool(drifted[j])}
        for j, ref in enumerate(prof.categorical):
            i = n_num + j
            features[ref.name] = {"kind": "categorical", "test": "chi2", "statistic": float(cat["chi2"][j]),
                                  "p_value": float(cat["chi2_p"][j]), "p_adjusted": float(adj[i]),
                                  "threshold": alpha, "psi": float(cat["psi"][j]), "js": float(cat["js"][j]),
                                  "drifted": bool(drifted[i])}
        m = len(pvals)
        dataset_p = float(np.min(adj)) if m else 1.0
        return {"rows": n, "features": features, "dataset": {
            "p_value": dataset_p, "drifted": bool(drifted.any()), "num_drifted": int(drifted.sum()),
            "num_features": m, "share_drifted": float(drifted.sum() / m) if m else 0.0,
            "method": method, "alpha": alpha}, "prediction": self._prediction(proba, pred, alpha, method, armed)}

    def _prediction(self, proba, pred, alpha, method, armed) -> dict[str, Any]:
        prof = self.profile
        out: dict[str, Any] = {"classes": list(prof.classes), "drifted": False, "per_class": {},
                               "current": None, "reference": None, "rows": 0, "psi": None}
        if pred is not None and len(pred) and prof.classes:
            k = len(prof.classes)
            pc = np.bincount(np.asarray(pred, dtype=np.int64), minlength=k)[:k].astype(np.float64)
            total = pc.sum()
            out["rows"] = int(total)
            out["current"] = (pc / total).tolist() if total else None
            if prof.class_priors is not None and total:
                out["reference"] = prof.class_priors.tolist()
                out["psi"] = psi(prof.class_priors, pc)
                exp = np.maximum(prof.class_priors, 1e-4) * total
                chi = float(((pc - exp) ** 2 / exp).sum())
                out["chi2"] = chi
                out["chi2_p"] = float(chdtrc(k - 1, chi))
        pvals = [out["chi2_p"]] if "chi2_p" in out else []
        if proba is not None and len(proba) and self.pred is not None:
            st = self.pred.stats(np.asarray(proba, dtype=np.float64), prof.prediction.num_rows or prof.num_rows,
                                 exact=True)
            for i, c in enumerate(prof.classes):
                out["per_class"][c] = {"test": "ks", "statistic": float(st["ks"][i]),
                                       "p_value": float(st["ks_p"][i]), "psi": float(st["psi"][i])}
            pvals += [float(p) for p in st["ks_p"]]
            cal = prof.prediction.calibrated(np.asarray(proba, dtype=np.float64))
            out["mean_confidence"] = float(cal.max(1).mean())
        if pvals:
            adj = adjust_pvalues(np.asarray(pvals), method)
            out["p_adjusted"] = float(adj.min())
            out["threshold"] = alpha
            out["drifted"] = bool(armed and adj.min() < alpha)
        return out
