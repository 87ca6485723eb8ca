"""The reference profile live traffic is compared against.

Built once, at registration, from the training split's *raw* (unstandardised) features:

- per numeric feature: coarse interior bin edges at the reference quantiles with the reference share per
  bin (PSI, Jensen-Shannon), and a fine grid of reference quantiles at normal-score levels
  (`Phi(g)`, g = -3 .. 3) with the reference CDF at each grid point (KS against the binned CDF, and the
  normal-score transform the online detector works on);
- per categorical feature: the reference frequency of each category;
- predictions: the class priors of the model's predicted classes and, from held-out data, per class the
  distribution (the same fine grid) of the predicted probability, their mean (the prior the online
  detector's label-shift CUSUMs compare against) and a whitening matrix (`prediction_scores`), a
  calibration temperature, an isotonic map from the top-class confidence to the chance the prediction is
  right, and the held-out accuracy (the confidence-based accuracy estimate);
- the online detector's thresholds (`detector`), calibrated by bootstrap from the reference to an
  expected run time between false alarms (`calibrate`).

Its size depends on the number of features, bins and classes, never on the number of reference rows
(about 3 KB per numeric feature as JSON), so it travels with every registered model version as
`reference_profile.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.special import ndtr, ndtri

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema

PROFILE_FORMAT = 2
READABLE_FORMATS = (1, 2)
# the fine grid's normal-score levels: 49 reference quantiles at Phi(-3) .. Phi(3), evenly spaced in z
GRID_Z = np.linspace(-3.0, 3.0, 49)
# the dense KS grid: the reference CDF at 256 reference quantiles (levels (i + 0.5) / 256), used only for
# the KS statistic (the reference CDF is interpolated linearly in x between them); values rounded to 7
# significant digits (float32 precision) keep the JSON small
KS_LEVELS = (np.arange(256) + 0.5) / 256
Z_CLIP = 6.0  # normal scores are clipped here (an extrapolated value far outside the reference)
CAT_PROP_FLOOR = 1e-4  # a category never seen in the reference still gets a finite (large) score


def _round7(v: np.ndarray) -> np.ndarray:
    """Round to 7 significant digits (float32 precision), so the JSON holds short decimals."""
    return np.array([float(f"{x:.7g}") for x in np.asarray(v, dtype=np.float64).ravel()], dtype=np.float64)


@dataclass
class NumericRef:
    """One numeric feature (or one class's predicted probability)."""

    name: str
    edges: np.ndarray  # coarse interior edges, ascending, unique; bins = len(edges) + 1
    ref_props: np.ndarray  # share of reference rows per coarse bin, sums to 1
    grid_x: np.ndarray | None = None  # fine grid: ascending unique reference quantiles
    grid_z: np.ndarray | None = None  # normal score at each grid point (mean level for tied quantiles)
    grid_cdf: np.ndarray | None = None  # reference share of rows <= grid_x[i]
    # dense KS grid (None in profiles written before it: KS then uses the fine grid): ascending unique
    # reference quantiles and the reference share of rows <= and < each
    ks_x: np.ndarray | None = None
    ks_cdf: np.ndarray | None = None
    ks_lo: np.ndarray | None = None  # stored only where it differs from ks_cdf (an atom at a point)

    def __post_init__(self):
        if self.grid_x is None:  # a format-1 profile: the coarse edges are the grid
            cdf = np.cumsum(self.ref_props)[:-1]
            self.grid_x = np.asarray(self.edges, dtype=np.float64)
            self.grid_cdf = cdf
            self.grid_z = ndtri(np.clip(cdf - self.ref_props[1:] / 2, 1e-6, 1 - 1e-6)) if len(cdf) else cdf

    @property
    def num_bins(self) -> int:
        return len(self.edges) + 1

    @classmethod
    def build(cls, name: str, col: np.ndarray, num_bins: int, dense: bool = True) -> NumericRef:
        col = np.sort(np.asarray(col, dtype=np.float64))
        n = len(col)
        qs = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
        # coarse edges are observed values (inverted CDF, no interpolation between levels) and np.unique
        # drops repeats, so a discrete feature gets one bin per level instead of empty zero-width bins
        edges = np.unique(np.quantile(col, qs, method="inverted_cdf"))
        counts = np.bincount(np.searchsorted(edges, col, side="right"), minlength=len(edges) + 1)
        raw = np.quantile(col, ndtr(GRID_Z))
        grid_x, inverse = np.unique(raw, return_inverse=True)
        # tied quantiles (a discrete feature) get the mean of their normal-score levels
        grid_z = np.bincount(inverse, weights=GRID_Z) / np.bincount(inverse)
        grid_cdf = np.searchsorted(col, grid_x, side="right") / n
        if not dense or n < 2:
            return cls(name, edges, counts / n, grid_x, grid_z, grid_cdf)
        # dense KS points halfway between the order statistics around each level (no reference row sits
        # on them unless the two are tied: an atom), rounded; their CDF is counted exactly
        k = np.clip(np.ceil(KS_LEVELS * n).astype(np.int64), 1, n - 1)
        ks_x = np.unique(_round7(col[k - 1] + (col[k] - col[k - 1]) / 2))
        ks_cdf = _round7(np.searchsorted(col, ks_x, side="right") / n)
        ks_lo = _round7(np.searchsorted(col, ks_x, side="left") / n)
        return cls(name, edges, counts / n, grid_x, grid_z, grid_cdf, ks_x, ks_cdf, ks_lo)

    def normal_scores(self, x: np.ndarray) -> np.ndarray:
        """Raw values -> approximate N(0, 1) scores under the reference (piecewise-linear in x between the
        grid's quantiles, linearly extrapolated beyond them, clipped at +-Z_CLIP)."""
        gx, gz = self.grid_x, self.grid_z
        x = np.asarray(x, dtype=np.float64)
        if len(gx) < 2:
            return np.zeros_like(x) if len(gx) == 0 else np.sign(x - gx[0]) * 3.0
        z = np.interp(x, gx, gz)
        lo, hi = x < gx[0], x > gx[-1]
        if lo.any():
            z[lo] = gz[0] + (x[lo] - gx[0]) * (gz[1] - gz[0]) / (gx[1] - gx[0])
        if hi.any():
            z[hi] = gz[-1] + (x[hi] - gx[-1]) * (gz[-1] - gz[-2]) / (gx[-1] - gx[-2])
        return np.clip(z, -Z_CLIP, Z_CLIP)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "edges": self.edges.tolist(), "ref_props": self.ref_props.tolist(),
                "grid_x": self.grid_x.tolist(), "grid_z": self.grid_z.tolist(), "grid_cdf": self.grid_cdf.tolist(),
                **self._ks_dict()}

    def _ks_dict(self) -> dict[str, Any]:
        if self.ks_x is None:
            return {}
        d = {"ks_x": self.ks_x.tolist(), "ks_cdf": self.ks_cdf.tolist()}
        if (self.ks_lo != self.ks_cdf).any():  # only a feature with atoms at its KS points stores F(x-)
            d["ks_lo"] = self.ks_lo.tolist()
        return d

    @classmethod
    def from_dict(cls, f: dict[str, Any]) -> NumericRef:
        edges = np.asarray(f["edges"], dtype=np.float64)
        props = np.asarray(f["ref_props"], dtype=np.float64)
        if len(props) != len(edges) + 1 or (np.diff(edges) <= 0).any():
            raise ValueError(f"reference profile: feature {f['name']!r} needs ascending unique edges and "
                             "one more proportion than edges")
        grid = [np.asarray(f[k], dtype=np.float64) if k in f else None for k in ("grid_x", "grid_z", "grid_cdf")]
        if grid[0] is not None and not (len(grid[0]) == len(grid[1]) == len(grid[2])):
            raise ValueError(f"reference profile: feature {f['name']!r} needs grid_x, grid_z, grid_cdf of one length")
        dense = [np.asarray(f[k], dtype=np.float64) if k in f else None for k in ("ks_x", "ks_cdf", "ks_lo")]
        if dense[0] is None or dense[1] is None:
            dense = [None] * 3  # an older profile: KS on the fine grid
        elif dense[2] is None:  # no atoms at the KS points: F(x-) = F(x)
            dense[2] = dense[1]
        elif not (len(dense[0]) == len(dense[1]) == len(dense[2])) or (np.diff(dense[0]) <= 0).any():
            raise ValueError(f"reference profile: feature {f['name']!r} needs ascending unique ks_x and ks_cdf, "
                             "ks_lo of its length")
        return cls(f["name"], edges, props, *grid, *dense)


@dataclass
class CategoricalRef:
    name: str
    categories: list[str]
    ref_props: np.ndarray  # share of reference rows per category index, sums to 1

    @property
    def num_bins(self) -> int:
        return len(self.categories)


@dataclass
class PredictionRef:
    """The model's predicted probabilities on held-out data."""

    per_class: list[NumericRef]  # distribution of each class's predicted probability
    mean: np.ndarray  # [K] mean predicted probability
    whiten: np.ndarray  # [K, r]: (p - mean) @ whiten ~ N(0, I_r) (covariance's non-null space)
    temperature: float = 1.0  # calibration: p_cal = softmax(log p / T)
    accuracy: float | None = None  # held-out accuracy (when labels were given)
    num_rows: int = 0
    # [2, m]: knots (temperature-calibrated top-class confidence, P(prediction right)) of an isotonic fit on
    # held-out labels; None: the calibrated confidence is taken at face value
    confidence_map: np.ndarray | None = None

    def calibrated(self, proba: np.ndarray) -> np.ndarray:
        if self.temperature == 1.0:
            return proba
        logp = np.log(np.clip(proba, 1e-12, 1.0)) / self.temperature
        logp -= logp.max(1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(1, keepdims=True)

    def correct_probability(self, proba: np.ndarray) -> np.ndarray:
        """Per row, the estimated probability that the predicted (top) class is right: the calibrated
        top-class confidence, through the held-out isotonic map when there is one. Temperature scaling
        fits the whole distribution (NLL) and can leave the top-class confidence several points off the
        accuracy; the map fixes exactly the quantity the accuracy estimate needs."""
        conf = self.calibrated(np.asarray(proba, dtype=np.float64)).max(1)
        if self.confidence_map is None:
            return conf
        return np.interp(conf, self.confidence_map[0], self.confidence_map[1])

    def estimate_accuracy(self, proba: np.ndarray) -> float:
        """CBPE-style estimate of accuracy on rows with predicted probabilities `proba` (no labels)."""
        return float(self.correct_probability(proba).mean())

    def to_dict(self) -> dict[str, Any]:
        return {"per_class": [f.to_dict() for f in self.per_class], "mean": self.mean.tolist(),
                "whiten": self.whiten.tolist(), "temperature": self.temperature, "accuracy": self.accuracy,
                "num_rows": self.num_rows,
                "confidence_map": None if self.confidence_map is None else self.confidence_map.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictionRef:
        k = len(d["mean"])
        whiten = np.asarray(d["whiten"], dtype=np.float64).reshape(k, -1)
        cmap = d.get("confidence_map")
        return cls([NumericRef.from_dict(f) for f in d["per_class"]], np.asarray(d["mean"], dtype=np.float64),
                   whiten, float(d.get("temperature", 1.0)), d.get("accuracy"), int(d.get("num_rows", 0)),
                   None if cmap is None else np.asarray(cmap, dtype=np.float64).reshape(2, -1))


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017) of predicted probabilities on held-out labels: the T that
    minimises the NLL of softmax(log p / T)."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(proba, 1e-12, 1.0))
    idx = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-(z[idx, labels] - np.log(np.exp(z).sum(1))).mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(res.x))


def fit_confidence_map(conf: np.ndarray, correct: np.ndarray, max_knots: int = 100) -> np.ndarray:
    """Isotonic regression (pool adjacent violators) of `correct` (0/1) on `conf`, the top-class
    confidence, as at most `max_knots` knots [2, m] for `np.interp` (x increasing, y non-decreasing).
    The rows are first pooled into `max_knots` equal-count bins, so the size never grows with the data."""
    order = np.argsort(conf, kind="stable")
    x, y = np.asarray(conf, dtype=np.float64)[order], np.asarray(correct, dtype=np.float64)[order]
    groups = np.array_split(np.arange(len(x)), min(max_knots, len(x)))
    xs = [float(x[g].mean()) for g in groups]
    ys = [float(y[g].mean()) for g in groups]
    ws = [float(len(g)) for g in groups]
    # pool adjacent violators on the weighted bin means
    bx, by, bw = [], [], []
    for xi, yi, wi in zip(xs, ys, ws):
        bx.append(xi * wi)
        by.append(yi * wi)
        bw.append(wi)
        while len(by) > 1 and by[-2] / bw[-2] > by[-1] / bw[-1]:
            xw, yw, w = bx.pop(), by.pop(), bw.pop()
            bx[-1] += xw
            by[-1] += yw
            bw[-1] += w
    w = np.asarray(bw)
    return np.stack([np.asarray(bx) / w, np.asarray(by) / w])


@dataclass
class ReferenceProfile:
    numeric: list[NumericRef]
    categorical: list[CategoricalRef]
    num_rows: int
    num_bins: int
    classes: list[str] = field(default_factory=list)
    class_priors: np.ndarray | None = None  # share of reference predictions per class
    prediction: PredictionRef | None = None
    detector: dict[str, Any] | None = None  # online detector spec + calibrated thresholds

    # ----- build -----
    @classmethod
    def from_arrays(cls, schema: DatasetSchema, x_num: np.ndarray, x_cat: np.ndarray, *, num_bins: int = 10,
                    pred: np.ndarray | None = None, proba: np.ndarray | None = None,
                    labels: np.ndarray | None = None) -> ReferenceProfile:
        """`x_num` raw float [n, n_num], `x_cat` category indices int [n, n_cat], columns in the schema's
        numeric/categorical order; `pred` predicted classes int [n] (optional); `proba` predicted
        probabilities [n, K] of these rows and `labels` their true classes (optional: for held-out rows;
        `add_predictions` adds them from another, held-out, set)."""
        if num_bins < 2:
            raise ValueError(f"monitor.num_bins: must be at least 2, got {num_bins}")
        x_num = np.asarray(x_num, dtype=np.float64)
        x_cat = np.asarray(x_cat, dtype=np.int64)
        n = len(x_num)
        num_specs, cat_specs = schema.numeric, schema.categorical
        if x_num.shape != (n, len(num_specs)) or x_cat.shape != (n, len(cat_specs)):
            raise ValueError(f"reference profile: expected x_num [n, {len(num_specs)}] and x_cat [n, {len(cat_specs)}], "
                             f"got {x_num.shape} and {x_cat.shape}")
        if n == 0:
            raise ValueError("reference profile: needs at least one reference row")
        if not np.isfinite(x_num).all():
            j = int(np.flatnonzero(~np.isfinite(x_num).all(0))[0])
            raise ValueError(f"reference profile: {num_specs[j].name} has NaN or infinite values; fill or drop them")
        numeric = [NumericRef.build(f.name, x_num[:, j], num_bins) for j, f in enumerate(num_specs)]
        categorical = []
        for j, f in enumerate(cat_specs):
            k = len(f.categories or [])
            col = x_cat[:, j]
            if col.min() < 0 or col.max() >= k:
                raise ValueError(f"reference profile: {f.name} has category indices outside [0, {k})")
            categorical.append(CategoricalRef(f.name, list(f.categories or []), np.bincount(col, minlength=k) / n))
        priors = None
        if pred is None and proba is not None:
            pred = np.asarray(proba).argmax(1)
        if pred is not None:
            pred = np.asarray(pred, dtype=np.int64)
            if pred.shape != (n,) or pred.min() < 0 or pred.max() >= schema.num_classes:
                raise ValueError(f"reference profile: pred must be {n} class indices in [0, {schema.num_classes})")
            priors = np.bincount(pred, minlength=schema.num_classes) / n
        prof = cls(numeric, categorical, n, num_bins, list(schema.classes), priors)
        if proba is not None:
            prof.add_predictions(proba, labels)
        return prof

    @classmethod
    def from_table(cls, schema: DatasetSchema, table: pa.Table, *, num_bins: int = 10,
                   pred: np.ndarray | None = None) -> ReferenceProfile:
        """From an Arrow table of raw rows (e.g. `read_split(root, "train")`)."""
        # an identity Preprocessor (mean 0, std 1) yields raw numeric values and category indices
        n_num = len(schema.numeric)
        ident = Preprocessor(schema, [0.0] * n_num, [1.0] * n_num)
        x_num, x_cat = ident.transform_table(table, with_label=False)
        return cls.from_arrays(schema, x_num, x_cat, num_bins=num_bins, pred=pred)

    def add_predictions(self, proba: np.ndarray, labels: np.ndarray | None = None) -> None:
        """The model's predicted probabilities [n, K] on held-out rows (and their labels, optional): the
        per-class probability distributions, their mean and whitening (prediction drift), a calibration
        temperature and the held-out accuracy (the confidence-based accuracy estimate)."""
        proba = np.asarray(proba, dtype=np.float64)
        k = len(self.classes)
        if proba.ndim != 2 or proba.shape[1] != k or len(proba) < 2:
            raise ValueError(f"reference profile: proba must be [n >= 2, {k}] predicted probabilities")
        if not np.isfinite(proba).all():
            raise ValueError("reference profile: proba has NaN or infinite values")
        per_class = [NumericRef.build(f"proba:{c}", proba[:, i], self.num_bins, dense=False)
                     for i, c in enumerate(self.classes)]
        mean = proba.mean(0)
        cov = np.cov(proba, rowvar=False).reshape(k, k)
        w, v = np.linalg.eigh(cov)
        keep = w > max(w.max(), 1e-12) * 1e-6  # probabilities sum to 1: one direction is always null
        whiten = v[:, keep] / np.sqrt(w[keep])
        temperature, accuracy = 1.0, None
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (len(proba),) or labels.min() < 0 or labels.max() >= k:
                raise ValueError(f"reference profile: labels must be {len(proba)} class indices in [0, {k})")
            temperature = fit_temperature(proba, labels)
            accuracy = float((proba.argmax(1) == labels).mean())
        self.prediction = PredictionRef(per_class, mean, whiten, temperature, accuracy, len(proba))
        if labels is not None:
            # top-class confidence -> P(right), for the accuracy estimate (NannyML's CBPE calibrates the
            # same way: isotonic regression on held-out labels)
            conf = self.prediction.calibrated(proba).max(1)
            self.prediction.confidence_map = fit_confidence_map(conf, proba.argmax(1) == labels)

    def calibrate(self, x_num: np.ndarray, x_cat: np.ndarray, proba: np.ndarray | None = None, *,
                  ert: float = 10_000, num_rows: int = 1_000_000, seed: int = 0, **detector_kw) -> dict[str, Any]:
        """Calibrate the online detector's alarm threshold to `ert` (expected rows between false alarms)
        by bootstrap: streams resampled from these (held-out) reference rows run through the detector and
        the threshold is read off the simulated run lengths. Stores and returns `self.detector`."""
        from raysys.monitor.calibrate import calibrate_detector

        self.detector = calibrate_detector(self, x_num, x_cat, proba, ert=ert, num_rows=num_rows, seed=seed,
                                           **detector_kw)
        return self.detector

    # ----- views -----
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.numeric] + [f.name for f in self.categorical]

    def numeric_scores(self, x_num: np.ndarray) -> np.ndarray:
        """Raw numeric [n, n_num] -> normal scores [n, n_num] (N(0, 1) per column under the reference)."""
        xt = np.ascontiguousarray(np.asarray(x_num, dtype=np.float64).T)  # contiguous columns: faster interp
        out = np.empty(xt.shape, dtype=np.float64)
        for j, ref in enumerate(self.numeric):
            out[j] = ref.normal_scores(xt[j])
        return out.T

    def prediction_scores(self, proba: np.ndarray) -> np.ndarray:
        """Predicted probabilities [n, K] -> whitened deviations [n, r] from the held-out mean."""
        if self.prediction is None:
            return np.zeros((len(proba), 0))
        return (np.asarray(proba, dtype=np.float64) - self.prediction.mean) @ self.prediction.whiten

    def check_schema(self, schema: DatasetSchema) -> None:
        """Raise ValueError when the profile was not built for this schema's features."""
        want_num = [f.name for f in schema.numeric]
        want_cat = [f.name for f in schema.categorical]
        have_num = [f.name for f in self.numeric]
        have_cat = [f.name for f in self.categorical]
        if have_num != want_num or have_cat != want_cat:
            raise ValueError(f"reference profile: features {have_num + have_cat} do not match the schema's "
                             f"{want_num + want_cat}; rebuild the profile from this model's training data")
        for ref, spec in zip(self.categorical, schema.categorical):
            if ref.categories != list(spec.categories or []):
                raise ValueError(f"reference profile: categories of {ref.name} differ from the schema's")

    # ----- JSON -----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "num_rows": int(self.num_rows),
            "num_bins": int(self.num_bins),
            "numeric": [f.to_dict() for f in self.numeric],
            "categorical": [{"name": f.name, "categories": list(f.categories), "ref_props": f.ref_props.tolist()}
                            for f in self.categorical],
            "classes": list(self.classes),
            "class_priors": None if self.class_priors is None else self.class_priors.tolist(),
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "detector": self.detector,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | ReferenceProfile) -> ReferenceProfile:
        if isinstance(d, ReferenceProfile):
            return d
        if d.get("format") not in READABLE_FORMATS:
            raise ValueError(f"reference profile: unsupported format {d.get('format')!r} (expected one of "
                             f"{READABLE_FORMATS})")
        numeric = [NumericRef.from_dict(f) for f in d["numeric"]]
        categorical = []
        for f in d["categorical"]:
            props = np.asarray(f["ref_props"], dtype=np.float64)
            if len(props) != len(f["categories"]):
                raise ValueError(f"reference profile: feature {f['name']!r} needs one proportion per category")
            categorical.append(CategoricalRef(f["name"], list(f["categories"]), props))
        priors = d.get("class_priors")
        pred = d.get("prediction")
        return cls(numeric, categorical, int(d["num_rows"]), int(d["num_bins"]), list(d.get("classes") or []),
                   None if priors is None else np.asarray(priors, dtype=np.float64),
                   None if pred is None else PredictionRef.from_dict(pred), d.get("detector"))
