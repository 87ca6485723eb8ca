"""Scoring, pure (no Ray, no HTTP): a loaded model version (`Scorer`), the version that scores a request
(`route_version`), validated rows -> probabilities for a batch of requests (`score_requests`) and the
prediction a client reads (`format_prediction`).

Everything that runs per model version is here, so a change to how versions are isolated from each other
touches this module only.
"""

from __future__ import annotations

import logging
import time
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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the forward runs

    @classmethod
    def from_loaded(cls, loaded: Any, device: torch.device | None = None) -> Scorer:
        """From a `raysys.registry.LoadedModel`, on `device` (the replica's GPU with serve.num_gpus), warmed up."""
        device = device if device is not None else torch.device("cpu")
        if getattr(loaded, "quantization", None):  # dynamic int8 kernels exist on the CPU only
            device = torch.device("cpu")
        loaded.model.eval()
        scorer = cls(name=loaded.name, version=int(loaded.version), model=loaded.model.to(device),
                     schema=loaded.schema, preprocessor=loaded.preprocessor, model_spec=dict(loaded.model_spec),
                     metrics=loaded.metrics, lineage=loaded.lineage, reference_profile=loaded.reference_profile,
                     device=device)
        scorer.warm_up()
        return scorer

    def warm_up(self) -> None:
        """A few forward passes on zeros before the version takes traffic: its first passes (allocations,
        kernel selection) must not land on users, nor on the timings a canary gate compares."""
        n_num = self.model_spec.get("num_numeric")
        if n_num is None:
            n_num = len(getattr(self.preprocessor, "mean", None) if getattr(self.preprocessor, "mean", None) is not None
                        else [])
        x_num = np.zeros((4, n_num), dtype=np.float32)
        x_cat = np.zeros((4, len(self.schema.categorical)), dtype=np.int64)
        for _ in range(3):
            try:
                self.predict_proba(x_num, x_cat)
            except Exception:  # a version that cannot score zeros fails on real rows, where it is booked
                return

    @property
    def classes(self) -> list[str]:
        return list(self.schema.classes)

    def predict_proba(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        """Standardised numeric [n, n_num] + category indices [n, n_cat] -> float64 probabilities [n, C]."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)).to(self.device),
                                torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)).to(self.device))
            # float64 softmax: rows sum to 1 to ~1e-15 in the JSON the client reads
            probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
        if not np.isfinite(probs).all():
            raise RuntimeError(f"model {self.name} v{self.version} produced non-finite probabilities")
        return probs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": self.classes,
                "features": [f.name for f in self.schema.features], "schema": schema_to_dict(self.schema),
                "metrics": self.metrics, "lineage": self.lineage, "model_spec": self.model_spec,
                "has_reference_profile": self.reference_profile is not None}


def in_canary(request_id: str, percent: float) -> bool:
    """Whether a request id falls in the `percent`% the candidate takes (a hash of the id, so a retried
    request with the same id gets the same version)."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    # surrogatepass: an id that is not valid UTF-8 text is refused at parsing, but routing must never raise
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) % 10_000 < percent * 100


def route_version(request_id: str, stable: Scorer, candidate: Scorer | None, percent: float) -> Scorer:
    """The version that scores a request: the candidate for `percent`% of request ids, else the stable one."""
    return candidate if candidate is not None and in_canary(request_id, percent) else stable


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


@dataclass
class GroupStats:
    """One version's pass over some requests of a batch, for the per-version figures a canary gate reads:
    `ms` is the wall time of its validation + forward pass (every request of the group waited for it) and
    `cpu_ms` the CPU time this thread spent on it (the version's own cost: preemption by other processes on a
    busy node does not inflate it, so two versions' passes compare fairly),
    `failed` the requests it could not score (raised), `rejected` those whose rows it refused (4xx).
    `compare`: a pass whose answers went to nobody (shadow traffic, or the stable version re-scoring a
    canary's rows to measure agreement)."""

    version: int
    requests: int
    rows: int
    ms: float
    cpu_ms: float = 0.0
    failed: int = 0
    rejected: int = 0
    compare: bool = False


@dataclass
class Agreement:
    """Rows that `version` answered and `other` scored too (compare), and on how many their top classes agree."""

    version: int
    other: int
    rows: int
    agreed: int


def score_requests(items: list[tuple], stats: list | None = None, *,
                   compare_first: bool = False) -> list[ScoredRows | RequestError]:
    """Validate, standardise and score the rows of many requests together: `items` are (scorer, rows,
    prefix[, t0, request_id[, compare]]) with rows as sent (a list of objects) and prefix the key errors are
    named under. Per model version, all rows go through ONE `validate_rows` pass and ONE forward pass, and
    are split back. A request with a bad row gets its own RequestError naming its field (as
    `validate_request` would); the others are still scored.

    Versions are isolated: when one raises (a candidate whose weights or schema do not fit), its requests
    are scored again one at a time, so that only the requests it cannot score get a `ScoringError` (a 500
    naming the version); every other version's requests of the batch are answered.

    `compare` (a Scorer, optional): that version scores the same rows too, for nobody: shadow traffic, or
    the stable version beside a canary. Its failures never reach the client. It runs after the answers, or
    before them with `compare_first` (the endpoint alternates beside a canary, so that neither version is
    always the one that meets the rows with warm caches: their timings compare fairly). `stats`: when given,
    gets a `GroupStats` per version pass and an `Agreement` per compared pair of versions."""
    out: list[ScoredRows | RequestError | None] = [None] * len(items)
    shadow: list[ScoredRows | RequestError | None] = [None] * len(items)
    with_compare = [i for i, it in enumerate(items) if len(it) > 5 and it[5] is not None]
    if compare_first and with_compare:
        _score_groups(items, with_compare, 5, shadow, stats, compare=True)
    _score_groups(items, range(len(items)), 0, out, stats, compare=False)
    if not compare_first:
        with_compare = [i for i in with_compare if isinstance(out[i], ScoredRows)]
        if with_compare:
            _score_groups(items, with_compare, 5, shadow, stats, compare=True)
    if stats is not None and with_compare:
        _agreements(items, [i for i in with_compare if isinstance(out[i], ScoredRows)], out, shadow, stats)
    return out  # type: ignore[return-value]


def _score_groups(items: list[tuple], which, slot: int, out: list, stats: list | None, *, compare: bool) -> None:
    """Score the requests `which` of `items` by the scorer in position `slot` of each item, one group per
    version, into `out`; a version that raises is retried request by request (see `score_requests`)."""
    groups: dict[int, tuple[Scorer, list[int]]] = {}
    for i in which:
        scorer = items[i][slot]
        groups.setdefault(id(scorer), (scorer, []))[1].append(i)
    for scorer, idx in groups.values():
        t0, c0 = time.perf_counter(), time.thread_time()
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
        if stats is not None:
            answers = [out[i] for i in idx]
            stats.append(GroupStats(
                scorer.version, len(idx), sum(len(a.x_cat) for a in answers if isinstance(a, ScoredRows)),
                (time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000, failed=sum(isinstance(a, ScoringError) for a in answers),
                rejected=sum(isinstance(a, RequestError) and not isinstance(a, ScoringError) for a in answers),
                compare=compare))


def _agreements(items: list[tuple], compared: list[int], out: list, shadow: list, stats: list) -> None:
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in compared:
        mine, theirs = out[i], shadow[i]
        if isinstance(theirs, ScoredRows):
            key = (items[i][0].version, items[i][5].version)
            agg = pairs.setdefault(key, [0, 0])
            agg[0] += len(mine.probs)
            agg[1] += int((mine.probs.argmax(1) == theirs.probs.argmax(1)).sum())
    stats.extend(Agreement(v, other, rows, agreed) for (v, other), (rows, agreed) in pairs.items())


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
