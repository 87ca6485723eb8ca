"""The reference profile live traffic is compared against.

Built once from the training split's *raw* (unstandardised) features: for each numeric feature, interior
bin edges at the reference quantiles and the reference share of rows per bin; for each categorical
feature, the reference frequency of each category; optionally the class priors of the model's
predictions on that split. Its size depends on the number of features and bins, never on the number
of reference rows, so it travels with every registered model version as `reference_profile.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema

PROFILE_FORMAT = 1


@dataclass
class NumericRef:
    name: str
    edges: np.ndarray  # interior edges, ascending, unique; bins = len(edges) + 1
    ref_props: np.ndarray  # share of reference rows per bin, sums to 1

    @property
    def num_bins(self) -> int:
        return len(self.edges) + 1


@dataclass
class CategoricalRef:
    name: str
    categories: list[str]
    ref_props: np.ndarray  # share of reference rows per category index, sums to 1

    @property
    def num_bins(self) -> int:
        return len(self.categories)


@dataclass
class ReferenceProfile:
    numeric: list[NumericRef]
    categorical: list[CategoricalRef]
    num_rows: int
    num_bins: int
    classes: list[str] = field(default_factory=list)
    class_priors: np.ndarray | None = None  # share of reference predictions per class

    # ----- build -----
    @classmethod
    def from_arrays(cls, schema: DatasetSchema, x_num: np.ndarray, x_cat: np.ndarray, *, num_bins: int = 10,
                    pred: np.ndarray | None = None) -> ReferenceProfile:
        """`x_num` raw float [n, n_num], `x_cat` category indices int [n, n_cat], `pred` int [n] (optional),
        columns in the schema's numeric/categorical order."""
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
        qs = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
        numeric = []
        for j, f in enumerate(num_specs):
            col = x_num[:, j]
            # edges are observed values (inverted CDF, no interpolation between levels) and np.unique
            # drops repeats, so a discrete feature gets one bin per level instead of empty zero-width bins
            edges = np.unique(np.quantile(col, qs, method="inverted_cdf"))
            counts = np.bincount(np.searchsorted(edges, col, side="right"), minlength=len(edges) + 1)
            numeric.append(NumericRef(f.name, edges, counts / n))
        categorical = []
        for j, f in enumerate(cat_specs):
            k = len(f.categories or [])
            col = x_cat[:, j]
            if col.min() < 0 or col.max() >= k:
                raise ValueError(f"reference profile: {f.name} has category indices outside [0, {k})")
            categorical.append(CategoricalRef(f.name, list(f.categories or []), np.bincount(col, minlength=k) / n))
        priors = None
        if pred is not None:
            pred = np.asarray(pred, dtype=np.int64)
            if pred.shape != (n,) or pred.min() < 0 or pred.max() >= schema.num_classes:
                raise ValueError(f"reference profile: pred must be {n} class indices in [0, {schema.num_classes})")
            priors = np.bincount(pred, minlength=schema.num_classes) / n
        return cls(numeric, categorical, n, num_bins, list(schema.classes), priors)

    @classmethod
    def from_table(cls, schema: DatasetSchema, table: pa.Table, *, num_bins: int = 10,
                   pred: np.ndarray | None = None) -> ReferenceProfile:
        """From an Arrow table of raw rows (e.g. `read_split(root, "train")`)."""
        # an identity Preprocessor (mean 0, std 1) yields raw numeric values and category indices
        n_num = len(schema.numeric)
        ident = Preprocessor(schema, [0.0] * n_num, [1.0] * n_num)
        x_num, x_cat = ident.transform_table(table, with_label=False)
        return cls.from_arrays(schema, x_num, x_cat, num_bins=num_bins, pred=pred)

    # ----- views -----
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.numeric] + [f.name for f in self.categorical]

    @property
    def bin_counts(self) -> list[int]:
        """Bins per feature, numeric first then categorical (the window's column layout)."""
        return [f.num_bins for f in self.numeric] + [f.num_bins for f in self.categorical]

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
            "numeric": [{"name": f.name, "edges": f.edges.tolist(), "ref_props": f.ref_props.tolist()}
                        for f in self.numeric],
            "categorical": [{"name": f.name, "categories": list(f.categories), "ref_props": f.ref_props.tolist()}
                            for f in self.categorical],
            "classes": list(self.classes),
            "class_priors": None if self.class_priors is None else self.class_priors.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | ReferenceProfile) -> ReferenceProfile:
        if isinstance(d, ReferenceProfile):
            return d
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"reference profile: unsupported format {d.get('format')!r} (expected {PROFILE_FORMAT})")
        numeric = []
        for f in d["numeric"]:
            edges = np.asarray(f["edges"], dtype=np.float64)
            props = np.asarray(f["ref_props"], dtype=np.float64)
            if len(props) != len(edges) + 1 or (np.diff(edges) <= 0).any():
                raise ValueError(f"reference profile: feature {f['name']!r} needs ascending unique edges and "
                                 "one more proportion than edges")
            numeric.append(NumericRef(f["name"], edges, props))
        categorical = []
        for f in d["categorical"]:
            props = np.asarray(f["ref_props"], dtype=np.float64)
            if len(props) != len(f["categories"]):
                raise ValueError(f"reference profile: feature {f['name']!r} needs one proportion per category")
            categorical.append(CategoricalRef(f["name"], list(f["categories"]), props))
        priors = d.get("class_priors")
        return cls(numeric, categorical, int(d["num_rows"]), int(d["num_bins"]), list(d.get("classes") or []),
                   None if priors is None else np.asarray(priors, dtype=np.float64))
