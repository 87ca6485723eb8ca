"""Scoring, pure (no Ray, no HTTP): a loaded model version (`Scorer`), the version that scores a request
(`route_version`), validated rows -> probabilities for a batch of requests (`score_requests`) and the
prediction a client reads (`format_prediction`).

Everything that runs per model version is here, so a change to how versions are isolated from each other
touches this module only.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema, schema_to_dict
from serve.parsing import RequestError, validate_rows

log = logging.getLogger("ray.serve")


@dataclass(eq=False)
class Scorer:
    """One loaded model version and what scoring needs from it. Immutable once built (but for its failure
    count): a version swap replaces the whole object, so a request validated against one version is scored
    by that version."""

    name: str
    version: int
    model: torch.nn.Module
    schema: DatasetSchema
    preprocessor: Preprocessor
    model_spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    reference_profile: dict[str, Any] | None = None
    failed_batches: int = field(default=0, compare=False)  # batches this version raised on (the log's count)

    @classmethod
    def from_loaded(cls, loaded: Any) -> Scorer:
        """From a `raysys.registry.LoadedModel`."""
        loaded.model.eval()
        return cls(name=loaded.name, version=int(loaded.version), model=loaded.model, schema=loaded.schema,
                   preprocessor=loaded.preprocessor, model_spec=dict(loaded.model_spec), metrics=loaded.metrics,
                   lineage=loaded.lineage, reference_profile=loaded.reference_profile)

    @property
    def classes(self) -> list[str]:
        return list(self.schema.classes)

    def predict_proba(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        """Standardised numeric [n, n_num] + category indices [n, n_cat] -> float64 probabilities [n, C]."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)),
                                torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)))
            # float64 softmax: rows sum to 1 to ~1e-15 in the JSON the client reads
            probs = torch.softmax(logits.double(), dim=1).numpy()
        if not np.isfinite(probs).all():
            raise RuntimeError(f"model {self.name} v{self.version} produced non-finite probabilities")
        return probs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": self.classes,
                "features": [f.name for f in self.schema.features], "schema": schema_to_dict(self.schema),
                "metrics": self.metrics, "lineage": self.lineage, "model_spec": self.model_spec,
                "has_reference_profile": self.reference_profile is not None}


def route_version(request_id: str, stable: Scorer, candidate: Scorer | None, percent: float) -> Scorer:
    """The version that scores a request: the candidate for `percent`% of request ids (a hash, so a retried
    request with the same id gets the same version), else the stable one."""
    if candidate is None or percent <= 0:
        return stable
    if percent >= 100:
        return candidate
    # surrogatepass: an id that is not valid UTF-8 text is refused at parsing, but routing must never raise
    bucket = zlib.crc32(request_id.encode("utf-8", "surrogatepass")) % 10_000
    return candidate if bucket < percent * 100 else stable


class ScoringError(RequestError):
    """A request its model version failed to score (the model raised, or produced non-finite
    probabilities): a 500 naming the version, so that a client, the monitor's per-version error counts and a
    canary gate all see which version failed. The model's own error text goes to the replica log only."""

    def __init__(self, scorer: Scorer):
        super().__init__(500, None, f"model {scorer.name} v{scorer.version} failed to score this request; "
                                    "see the replica log")
        self.model_version = scorer.version

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["detail"]["model_version"] = self.model_version
        return out


@dataclass
class ScoredRows:
    """One request's rows after `score_requests`: what the monitor records, and the probabilities."""

    x_num_raw: np.ndarray  # float32 [n, n_num], as sent
    x_cat: np.ndarray  # int64 [n, n_cat]
    probs: np.ndarray  # float64 [n, C]


def score_requests(items: list[tuple]) -> list[ScoredRows | RequestError]:
    """Validate, standardise and score the rows of many requests together: `items` are (scorer, rows,
    prefix, ...) with rows as sent (a list of objects) and prefix the key errors are named under (further
    fields are ignored). Per model version, all rows go through ONE `validate_rows` pass and ONE forward
    pass, and are split back. A request with a bad row gets its own RequestError naming its field (as
    `validate_request` would); the others are still scored.

    Versions are isolated: when one raises (a candidate whose weights or schema do not fit), its requests
    are scored again one at a time, so that only the requests it cannot score get a `ScoringError` (a 500
    naming the version); every other version's requests of the batch are answered."""
    out: list[ScoredRows | RequestError | None] = [None] * len(items)
    groups: dict[int, tuple[Scorer, list[int]]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item[0]), (item[0], []))[1].append(i)
    for scorer, idx in groups.values():
        try:
            _score_group(scorer, items, idx, out)
        except Exception as e:
            scorer.failed_batches += 1
            # the whole traceback once per version, then one line: a failing canary must not flood the log
            log.log(logging.ERROR if scorer.failed_batches == 1 else logging.WARNING,
                    "raysys: %s v%d failed to score a batch of %d requests (%d batches so far): %s: %s; "
                    "scoring them one by one", scorer.name, scorer.version, len(idx), scorer.failed_batches,
                    type(e).__name__, e, exc_info=scorer.failed_batches == 1)
            for i in idx:
                try:
                    _score_group(scorer, items, [i], out)
                except Exception:
                    out[i] = ScoringError(scorer)
    return out  # type: ignore[return-value]


def _score_group(scorer: Scorer, items: list[tuple], idx: list[int], out: list) -> None:
    """The requests `idx` of `items`, all of `scorer`: one validation pass, one forward pass, answers into
    `out`. Raises whatever the model (or its preprocessor) raises, leaving `out` untouched then."""
    checked = validate_rows([(items[i][1], items[i][2]) for i in idx], scorer.schema, scorer.preprocessor)
    answers: dict[int, ScoredRows | RequestError] = {idx[k]: err for k, err in checked.errors.items()}
    if checked.rows is not None:
        probs = scorer.predict_proba(checked.rows.x_num, checked.rows.x_cat)
        for k, raw, cat, pr in zip(checked.ok, checked.split(checked.rows.x_num_raw),
                                   checked.split(checked.rows.x_cat), checked.split(probs)):
            answers[idx[k]] = ScoredRows(raw, cat, pr)
    for i, answer in answers.items():
        out[i] = answer


def format_prediction(scorer: Scorer, probs: np.ndarray) -> dict[str, Any]:
    classes = scorer.classes
    return {"predictions": [classes[i] for i in probs.argmax(1).tolist()], "probabilities": probs.tolist(),
            "classes": classes, "model_version": scorer.version, "model_name": scorer.name}
