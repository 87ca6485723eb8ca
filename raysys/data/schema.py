"""The dataset schema: feature names and kinds, categories, label column and classes.

It is stored beside the data (`<root>/schema.json`) and with every registered model, and it is the one
place that decides what a valid input row is, for training and for the HTTP endpoint alike.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

SCHEMA_FILE = "schema.json"


class SchemaError(ValueError):
    """A row does not match the schema. `field` names where (e.g. `instances[3].x0`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Column name in the Parquet files and key in request rows.")
    kind: Literal["numeric", "categorical"] = Field(description="numeric (float) or categorical (string).")
    categories: list[str] | None = Field(None, description="Allowed values of a categorical feature.")
    nullable: bool = Field(False, description="Nulls allowed (in the data and as JSON null in requests): the "
                                              "Preprocessor imputes them, and a numeric one also feeds the model "
                                              "an is-missing indicator.")
    sensitive: bool = Field(False, strict=True,
                            description="The column holds personal or secret data: the monitor's stored traffic "
                                        "never holds its raw values (hashed with the deployment's secret salt, "
                                        "or dropped: monitor.traffic_sensitive), and no error message or log "
                                        "line shows them.")
    protected: bool = Field(False, strict=True,
                            description="A protected attribute (fairness slices): the model card reports accuracy, "
                                        "selection rate and equalized-odds gaps per group of this column (per "
                                        "category, or per quartile of a numeric one).")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # `nullable`, `sensitive` and `protected` are written only when set, so schemas without them keep their bytes (and
        # fingerprints)
        out = handler(self)
        for flag in ("nullable", "sensitive", "protected"):
            if not getattr(self, flag):
                out.pop(flag, None)
        return out

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        if self.kind == "categorical":
            if not self.categories:
                raise ValueError(f"feature {self.name!r}: a categorical feature needs a non-empty `categories` list")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"feature {self.name!r}: `categories` has duplicates")
        elif self.categories is not None:
            raise ValueError(f"feature {self.name!r}: `categories` is only for categorical features")
        return self


class DatasetSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: list[FeatureSpec] = Field(description="Input features, in model order.")
    label: str = Field(description="Label column name.")
    classes: list[str] = Field(description="Class names; the label column holds an index into this list or a name.")

    @model_validator(mode="after")
    def _check(self) -> DatasetSchema:
        names = [f.name for f in self.features]
        if not names:
            raise ValueError("schema: `features` must name at least one feature")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"schema: duplicate feature names {sorted(dup)}")
        if self.label in names:
            raise ValueError(f"schema: label {self.label!r} is also listed as a feature")
        if len(self.classes) < 2:
            raise ValueError("schema: `classes` needs at least two classes")
        return self

    # ----- views -----
    @property
    def numeric(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "numeric"]

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def missing_indicators(self) -> list[str]:
        """Nullable numeric features: each adds an is-missing 0/1 column after the numeric model inputs."""
        return [f.name for f in self.features if f.kind == "numeric" and f.nullable]

    @property
    def num_model_numeric(self) -> int:
        """Width of the model's numeric input: the numeric features, then their is-missing indicators."""
        return len(self.numeric) + len(self.missing_indicators)

    @property
    def sensitive(self) -> list[str]:
        """Names of the features marked sensitive (their raw values are never stored with traffic or shown)."""
        return [f.name for f in self.features if f.sensitive]

    @property
    def protected(self) -> list[str]:
        """Names of the features marked protected (per-group fairness metrics on the model card)."""
        return [f.name for f in self.features if f.protected]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def cardinalities(self) -> list[int]:
        return [len(f.categories or []) for f in self.categorical]

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    # ----- storage -----
    def save(self, root: str | Path) -> Path:
        path = Path(root) / SCHEMA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, root: str | Path) -> DatasetSchema:
        path = Path(root)
        if path.is_dir():
            path = path / SCHEMA_FILE
        if not path.exists():
            raise ValueError(
                f"schema: {str(path)!r} not found; a dataset directory needs a schema.json naming the label and "
                "feature columns (`raysys data import` writes one)"
            )
        return cls.model_validate_json(path.read_text())

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetSchema:
        return cls.model_validate_json(text)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    # ----- tables -----
    def check_table(self, table_schema: pa.Schema, where: str = "data") -> None:
        """Raise SchemaError when a Parquet/Arrow schema lacks a column or has the wrong kind of type."""
        cols = set(table_schema.names)
        for f in [*self.features]:
            if f.name not in cols:
                raise SchemaError(f.name, f"column missing from {where}; columns are {sorted(cols)}")
            t = table_schema.field(f.name).type
            if f.kind == "numeric" and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise SchemaError(f.name, f"numeric feature has Arrow type {t} in {where}; expected int or float")
            if f.kind == "categorical" and not (pa.types.is_string(t) or pa.types.is_large_string(t)
                                                or pa.types.is_dictionary(t) or pa.types.is_integer(t)):
                raise SchemaError(f.name, f"categorical feature has Arrow type {t} in {where}; expected string")
        if self.label not in cols:
            raise SchemaError(self.label, f"label column missing from {where}")

    def label_indices(self, values: np.ndarray) -> np.ndarray:
        """Map a label column (class index or class name) to int64 indices; raise on unknown labels."""
        values = np.asarray(values)
        if values.dtype.kind in "iu":
            bad = (values < 0) | (values >= self.num_classes)
            if bad.any():
                raise SchemaError(self.label, f"label index {values[bad][0]} outside [0, {self.num_classes})")
            return values.astype(np.int64)
        lookup = {c: i for i, c in enumerate(self.classes)}
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            try:
                out[i] = lookup[str(v)]
            except KeyError:
                raise SchemaError(self.label, f"unknown class {v!r}; classes are {self.classes}") from None
        return out

    # ----- request rows -----
    # lookups built once per schema, not once per request (the endpoint validates every request with them)
    @cached_property
    def _feature_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.features)

    @cached_property
    def _category_index(self) -> list[dict[str, int]]:
        return [{c: i for i, c in enumerate(f.categories or [])} for f in self.categorical]

    def rows_to_arrays(self, rows: list[dict[str, Any]], prefix: str = "instances") -> tuple[np.ndarray, np.ndarray]:
        """Validate JSON rows and return raw numeric values (float32 [n, n_num]) and category indices
        (int64 [n, n_cat]). A JSON null of a nullable feature is NaN (numeric) or -1 (categorical), for the
        Preprocessor to impute. Raises SchemaError naming the first offending field, e.g. `instances[2].x3`."""
        if not isinstance(rows, list):
            raise SchemaError(prefix, "must be a list of objects, one per row")
        if not rows:
            raise SchemaError(prefix, "must hold at least one row")
        num = self.numeric
        cat = self.categorical
        known = self._feature_names
        cat_index = self._category_index
        x_num = np.empty((len(rows), len(num)), dtype=np.float32)
        x_cat = np.empty((len(rows), len(cat)), dtype=np.int64)
        for r, row in enumerate(rows):
            where = f"{prefix}[{r}]"
            if not isinstance(row, dict):
                raise SchemaError(where, "must be an object mapping feature name to value")
            if len(row) != len(known) or not known.issuperset(row):
                unknown = sorted(set(row) - known)
                if unknown:
                    raise SchemaError(f"{where}.{unknown[0]}", f"unknown feature; expected features are {sorted(known)}")
                missing = sorted(known - set(row))
                raise SchemaError(f"{where}.{missing[0]}", "missing feature")
            for j, f in enumerate(num):
                v = row[f.name]
                if v is None and f.nullable:
                    x_num[r, j] = np.nan
                    continue
                _refuse_null(v, f, where)
                # bool is an int subclass in Python: reject it explicitly
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise SchemaError(f"{where}.{f.name}", f"expected a number, got {type(v).__name__}")
                if not math.isfinite(v):
                    raise SchemaError(f"{where}.{f.name}", "must be a finite number (NaN and infinity are refused)")
                x_num[r, j] = v
            for j, f in enumerate(cat):
                v = row[f.name]
                if v is None and f.nullable:
                    x_cat[r, j] = -1
                    continue
                _refuse_null(v, f, where)
                if not isinstance(v, str):
                    raise SchemaError(f"{where}.{f.name}", f"expected a string category, got {type(v).__name__}")
                idx = cat_index[j].get(v)
                if idx is None:
                    if f.sensitive:  # neither the value nor the categories are echoed (nor logged with it)
                        raise SchemaError(f"{where}.{f.name}", "unknown category (not shown: the feature is "
                                                               "sensitive); the allowed ones are in the schema")
                    raise SchemaError(f"{where}.{f.name}", f"unknown category {v!r}; allowed: {f.categories}")
                x_cat[r, j] = idx
        return x_num, x_cat


def _refuse_null(v: Any, f: FeatureSpec, where: str) -> None:
    if v is None:
        raise SchemaError(f"{where}.{f.name}", "null for a feature that is not nullable; send a "
                                               + ("number" if f.kind == "numeric" else "category"))


def infer_schema(table_schema: pa.Schema, label: str, categories: dict[str, list[str]],
                 classes: list[str], nullable: set[str] | frozenset[str] = frozenset()) -> DatasetSchema:
    """Build a schema for bring-your-own data: string columns become categorical, numbers numeric; the
    columns named in `nullable` (those where nulls were seen) are marked nullable."""
    feats = []
    for field in table_schema:
        if field.name == label:
            continue
        null = field.name in nullable
        if pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
            feats.append(FeatureSpec(name=field.name, kind="numeric", nullable=null))
        elif pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_dictionary(field.type):
            feats.append(FeatureSpec(name=field.name, kind="categorical", categories=categories[field.name],
                                     nullable=null))
        else:
            raise SchemaError(field.name, f"unsupported Arrow type {field.type}; use numbers or strings")
    return DatasetSchema(features=feats, label=label, classes=classes)


def schema_to_dict(schema: DatasetSchema) -> dict:
    return json.loads(schema.model_dump_json())
