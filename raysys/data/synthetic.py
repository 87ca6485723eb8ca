"""A seedable synthetic tabular classification task, with drift injection.

The label is a fixed non-linear function of the features: a random tanh network over standardised
numeric features and one-hot categories, plus pairwise interactions (z0*z1, sin(2*z2), a category-gated
slope on z3). A linear model cannot represent it, so capacity matters: see tests/unit/test_data.py.

`DriftSpec` shifts a stream without touching the rule P(y | x): covariate shift moves named numeric
features by a number of their standard deviations (at once, or growing linearly over `ramp_rows` rows)
or replaces a categorical feature's frequencies; a joint shift sets the correlation of a pair of numeric
features with both marginals unchanged; label shift resamples rows to new class priors (P(x | y) kept).

Options of `DataConfig` (all off by default, so older seeds keep their rule and rows): `correlated_pairs`
draws the last 2k numeric features as k jointly normal pairs with correlation `pair_correlation` (what a
joint shift can flip); `nuisance_features` takes the k numeric features before them out of the rule (a
shift of one is drift that costs the model no accuracy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from raysys.config import DataConfig
from raysys.data.schema import DatasetSchema, FeatureSpec

SPLITS = ("train", "validation", "test")
_SPLIT_STREAM = {"train": 1, "validation": 2, "test": 3}
_HIDDEN = 32


class DriftSpec(BaseModel):
    """How a stream differs from the training distribution."""

    model_config = ConfigDict(extra="forbid")

    covariate: dict[str, float] = Field(
        default_factory=dict, description="Numeric feature -> mean shift in units of its standard deviation."
    )
    categorical: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Categorical feature -> new category frequencies (renormalised)."
    )
    label_priors: dict[str, float] | None = Field(
        None, description="Class name -> new prior weight (renormalised); rows are resampled to match."
    )
    correlation: dict[str, float] = Field(
        default_factory=dict, description="'xa:xb' (two numeric features) -> their new correlation; xb is redrawn "
        "as r*xa + sqrt(1-r^2)*noise in standard units, so both marginals stay as they were."
    )
    ramp_rows: int | None = Field(
        None, ge=1, description="Covariate shifts grow linearly: row i of the sample gets min(1, (i+1)/ramp_rows) "
        "of each shift in `covariate` (a slow drift from the first row)."
    )


class SyntheticTask:
    """The rule and the feature distributions of one seed. `sample()` draws rows from it."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        n_num, n_cat, k = cfg.num_numeric, cfg.num_categorical, cfg.num_classes
        self.num_names = [f"x{i}" for i in range(n_num)]
        self.cat_names = [f"c{j}" for j in range(n_cat)]
        self.categories = [[f"{chr(97 + j)}{v}" for v in range(cfg.num_categories)] for j in range(n_cat)]
        self.classes = [f"class_{i}" for i in range(k)]
        # raw numeric features live on different scales and offsets so that standardisation matters
        self.mu = rng.uniform(-5, 5, n_num)
        self.sigma = np.exp(rng.uniform(-1, 2, n_num))
        self.cat_probs = [rng.dirichlet(np.full(cfg.num_categories, 2.0)) for _ in range(n_cat)]
        d = n_num + n_cat * cfg.num_categories
        self.w1 = rng.normal(0, 2.0 / np.sqrt(d), (d, _HIDDEN))
        # the options draw nothing from rng: with them off, the rule and the rows are those of older versions
        k_pairs, k_nuis = cfg.correlated_pairs, cfg.nuisance_features
        first_pair = n_num - 2 * k_pairs
        if (k_pairs or k_nuis) and first_pair - k_nuis < 4:  # x0..x3 carry the rule's interaction terms
            raise ValueError(f"data: {k_pairs} correlated pairs and {k_nuis} nuisance features need at least "
                             f"{2 * k_pairs + k_nuis + 4} numeric features, got {n_num}")
        self.pairs = [(first_pair + 2 * i, first_pair + 2 * i + 1) for i in range(k_pairs)]
        self.nuisance = list(range(first_pair - k_nuis, first_pair))
        self.w1[self.nuisance] = 0.0
        self.b1 = rng.normal(0, 0.5, _HIDDEN)
        self.w2 = rng.normal(0, 3.0 / np.sqrt(_HIDDEN), (_HIDDEN, k))
        self.a_inter = rng.normal(0, 1.0, k)
        self.a_sin = rng.normal(0, 1.0, k)
        self.a_gate = rng.normal(0, 1.5, (cfg.num_categories, k))
        self.bias = np.zeros(k)
        # balance the classes: shift per-class biases until a large calibration sample is roughly uniform
        z, c = self._draw_latent(rng, 20_000, None)
        for _ in range(30):
            freq = np.bincount(self._logits(z, c).argmax(1), minlength=k) / len(z)
            self.bias -= 0.5 * np.log(np.maximum(freq, 1e-3) * k)

    def schema(self) -> DatasetSchema:
        feats = [FeatureSpec(name=n, kind="numeric") for n in self.num_names]
        feats += [FeatureSpec(name=n, kind="categorical", categories=c) for n, c in zip(self.cat_names, self.categories, strict=True)]
        return DatasetSchema(features=feats, label="label", classes=self.classes)

    def _draw_latent(self, rng: np.random.Generator, n: int, drift: DriftSpec | None):
        z = rng.standard_normal((n, len(self.num_names)))
        corr = {(a, b): self.cfg.pair_correlation for a, b in self.pairs}
        if drift:
            corr.update(self._correlation_drift(drift.correlation))
        for (a, b), r in corr.items():
            z[:, b] = r * z[:, a] + np.sqrt(1.0 - r * r) * z[:, b]
        cats = np.empty((n, len(self.cat_names)), dtype=np.int64)
        for j, name in enumerate(self.cat_names):
            p = self.cat_probs[j]
            if drift and name in drift.categorical:
                p = self._category_probs(name, drift.categorical[name], j)
            cats[:, j] = rng.choice(len(p), size=n, p=p)
        if drift:
            ramp = 1.0 if drift.ramp_rows is None else np.minimum(1.0, np.arange(1, n + 1) / drift.ramp_rows)
            for name, shift in drift.covariate.items():
                if name not in self.num_names:
                    raise ValueError(f"drift.covariate: {name!r} is not a numeric feature; choose from {self.num_names}")
                z[:, self.num_names.index(name)] += shift * ramp
        return z, cats

    def _correlation_drift(self, spec: dict[str, float]) -> dict[tuple[int, int], float]:
        out = {}
        for key, r in spec.items():
            names = key.split(":")
            if len(names) != 2 or any(x not in self.num_names for x in names) or names[0] == names[1]:
                raise ValueError(f"drift.correlation: {key!r} is not 'xa:xb', two numeric features")
            if not -1.0 < r < 1.0:
                raise ValueError(f"drift.correlation.{key}: a correlation must be in (-1, 1), got {r}")
            a, b = (self.num_names.index(x) for x in names)
            others = [p for p in self.pairs if b in p and p != (a, b)] + [p for p in self.pairs if p[1] == a]
            if others:
                raise ValueError(f"drift.correlation.{key}: {names[1]} or {names[0]} is already in the correlated "
                                 f"pair {others[0]}; flip that pair instead")
            out[(a, b)] = float(r)
        return out

    def _category_probs(self, name: str, freqs: dict[str, float], j: int) -> np.ndarray:
        unknown = set(freqs) - set(self.categories[j])
        if unknown:
            raise ValueError(f"drift.categorical.{name}: unknown categories {sorted(unknown)}")
        p = np.array([freqs.get(c, 0.0) for c in self.categories[j]], dtype=float)
        if p.sum() <= 0 or (p < 0).any():
            raise ValueError(f"drift.categorical.{name}: frequencies must be >= 0 with a positive sum")
        return p / p.sum()

    def _logits(self, z: np.ndarray, cats: np.ndarray) -> np.ndarray:
        n_cat_vals = self.cfg.num_categories
        onehot = np.zeros((len(z), len(self.cat_names) * n_cat_vals))
        for j in range(len(self.cat_names)):
            onehot[np.arange(len(z)), j * n_cat_vals + cats[:, j]] = 1.0
        h = np.tanh(np.concatenate([z, onehot], 1) @ self.w1 + self.b1)
        logits = h @ self.w2
        logits += np.outer(z[:, 0] * z[:, 1], self.a_inter)
        logits += np.outer(np.sin(2 * z[:, 2 % z.shape[1]]), self.a_sin)
        logits += self.a_gate[cats[:, 0]] * z[:, 3 % z.shape[1], None]
        return logits + self.bias

    def _labels(self, rng: np.random.Generator, z: np.ndarray, cats: np.ndarray) -> np.ndarray:
        y = self._logits(z, cats).argmax(1)
        flip = rng.random(len(y)) < self.cfg.label_noise
        y[flip] = rng.integers(0, self.cfg.num_classes, flip.sum())
        return y

    def sample(self, n: int, seed: int | list[int], drift: DriftSpec | None = None) -> pa.Table:
        """`n` rows as an Arrow table (raw numeric values, string categories, int64 label)."""
        rng = np.random.default_rng(seed)
        if drift and drift.label_priors:
            unknown = set(drift.label_priors) - set(self.classes)
            if unknown:
                raise ValueError(f"drift.label_priors: unknown classes {sorted(unknown)}; classes are {self.classes}")
            pri = np.array([drift.label_priors.get(c, 0.0) for c in self.classes], dtype=float)
            if pri.sum() <= 0 or (pri < 0).any():
                raise ValueError("drift.label_priors: weights must be >= 0 with a positive sum")
            pri /= pri.sum()
            if drift.ramp_rows is not None:
                raise ValueError("drift.ramp_rows: a ramp needs rows in stream order, label_priors resamples them")
            # draw a pool, then take rows per class in the new proportions (P(x | y) is unchanged)
            want = rng.multinomial(n, pri)
            pool_n = int(n * 4 / max(pri[pri > 0].min() * self.cfg.num_classes, 0.05)) + 1000
            z, cats = self._draw_latent(rng, pool_n, drift)
            y = self._labels(rng, z, cats)
            idx = []
            for k, m in enumerate(want):
                have = np.flatnonzero(y == k)
                if len(have) < m:
                    raise ValueError(f"drift.label_priors: could not draw {m} rows of {self.classes[k]}")
                idx.append(rng.choice(have, m, replace=False))
            sel = rng.permutation(np.concatenate(idx))
            z, cats, y = z[sel], cats[sel], y[sel]
        else:
            z, cats = self._draw_latent(rng, n, drift)
            y = self._labels(rng, z, cats)
        x = self.mu + self.sigma * z
        cols: dict[str, pa.Array] = {}
        for i, name in enumerate(self.num_names):
            cols[name] = pa.array(x[:, i], type=pa.float64())
        for j, name in enumerate(self.cat_names):
            cols[name] = pa.array(np.asarray(self.categories[j], dtype=object)[cats[:, j]], type=pa.string())
        cols["label"] = pa.array(y, type=pa.int64())
        return pa.table(cols)


def split_rows(cfg: DataConfig) -> dict[str, int]:
    return {"train": cfg.num_train_rows, "validation": cfg.num_val_rows, "test": cfg.num_test_rows}


def write_synthetic(cfg: DataConfig, root: str | Path | None = None) -> DatasetSchema:
    """Generate the train/validation/test splits as Parquet shards plus schema.json under `root`.

    Written to a temporary directory first and renamed into place, so an interrupted run never leaves
    a half-written dataset that a later run would mistake for a complete one.
    """
    root = Path(root or cfg.root)
    task = SyntheticTask(cfg)
    schema = task.schema()
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    for split, n in split_rows(cfg).items():
        table = task.sample(n, [cfg.seed, _SPLIT_STREAM[split]])
        out = tmp / split
        out.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, n, cfg.num_shards + 1).astype(int)
        for s in range(cfg.num_shards):
            pq.write_table(table.slice(bounds[s], bounds[s + 1] - bounds[s]), out / f"part-{s:05d}.parquet")
    schema.save(tmp)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return schema
