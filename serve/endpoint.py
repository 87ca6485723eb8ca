"""`StudentEndpoint`: the Ray Serve deployment, one replica holding the HTTP ingress AND the batched scoring.

Why one deployment: every hop between deployments costs (a FastAPI ingress calling a batched model
deployment measured ~90 req/s against ~180 req/s for the two roles in one replica). So a request is parsed
as it arrives (`serve.parsing.parse_predict`), routed to a model version, and handed to the replica's own
`@serve.batch` method, where `serve.scoring.score_requests` validates the rows of a whole batch and runs
ONE forward pass per model version. The HTTP routes are in `serve.routes`; this class holds the state.

Rollout: `user_config` {"model_ref": <alias | version>} (or {"model_version": N}), optionally with
{"candidate_ref": ..., "canary_percent": P}, applied with `serve deploy`, calls `reconfigure()` on the
running replicas, which load the new weights beside the old ones and swap them in one assignment: no
restart, no dropped request. A ref that fails to load during such an update leaves the replica serving its
current version (shown at /healthz and /v1/model as `last_reconfigure_error`), so a typo in a rollout never
takes the endpoint down; at replica start the same error fails the replica loudly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi.responses import Response
from ray import serve

from raysys.config import MonitorConfig, ServeConfig
from raysys.data.schema import schema_to_dict
from raysys.registry import Registry
from serve.apikey import require_api_key
from serve.contract import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MONITOR_NAME,
    DEFAULT_MONITOR_NAMESPACE,
    DEPLOYMENT_NAME,
    parse_user_config,
)
from serve.ingress import exposure, server_timeout_warning
from serve.memprobe import memory_report
from serve.monitor_link import (
    FEEDBACK_RECHECK_MARGIN_S,
    MONITOR_REPORT_TIMEOUT_S,
    FeedbackUnavailable,
    MonitorBuffer,
    MonitorLink,
)
from serve.parsing import RequestError, RequestIds, feedback_answer, parse_predict
from serve.routes import build_http_app
from serve.scoring import ScoredRows, Scorer, format_prediction, in_canary, score_requests
from serve.web import InFlightLimit, check_auth, guarded, load_api_token, max_body_bytes, read_body_capped

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Versions:
    """What scores requests: the stable version, an optional candidate and the percentage of request ids it
    takes. Replaced whole on a rollout, so every request sees one consistent state. `shadow`: the candidate
    scores a copy of its share and the stable version answers. `deadline` (epoch seconds): past it the
    candidate takes no more traffic, so a canary whose owner died ends on its own."""

    stable: Scorer
    candidate: Scorer | None = None
    canary_percent: float = 0.0
    shadow: bool = False
    deadline: float | None = None

    def route(self, request_id: str) -> tuple[Scorer, Scorer | None]:
        """(the version that answers the request, the version that scores its rows too for comparison)."""
        cand = self.candidate
        if cand is None or not in_canary(request_id, self.canary_percent) or self.expired():
            return self.stable, None
        return (self.stable, cand) if self.shadow else (cand, self.stable)

    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def _set_torch_threads(threads: int | None) -> int:
    # Ray sets OMP_NUM_THREADS to the replica's num_cpus; tiny-MLP batches gain nothing from more threads
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op in the process
        pass
    return torch.get_num_threads()


def replica_device(num_gpus: float) -> torch.device:
    """Where this replica scores: its CUDA device with serve.num_gpus > 0 (Ray gave it one and made it the only
    visible one), else the CPU. A RuntimeError naming the key when it was asked for a GPU and sees none."""
    if not num_gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"serve.num_gpus={num_gpus:g}, but this replica sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "install a CUDA build of torch on the GPU nodes, or set serve.num_gpus: 0")
    return torch.device("cuda", 0)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class StudentEndpoint:
    """The registered student behind an HTTP API, with `@serve.batch` scoring, in one replica."""

    def __init__(self, registry_uri: str, model_name: str = DEFAULT_MODEL_NAME, model_ref: str | int = "production",
                 serve_cfg: dict | None = None, monitor_cfg: dict | None = None, monitor: bool = True, *,
                 monitor_name: str = DEFAULT_MONITOR_NAME, monitor_namespace: str = DEFAULT_MONITOR_NAMESPACE,
                 torch_threads: int | None = None, api_token: str | None = None):
        self.serve_cfg = ServeConfig.model_validate(serve_cfg or {})
        # before anything else: an endpoint reachable beyond loopback without a key must not come up at all
        self._api_token = load_api_token(api_token)
        if not self._api_token:
            require_api_key(self._api_token, self.serve_cfg.network, exposure(self.serve_cfg.host))
        self.monitor_cfg = MonitorConfig.model_validate(monitor_cfg or {})
        if warning := server_timeout_warning(self.serve_cfg.request_timeout_s):
            log.warning("raysys: %s", warning)
        self.monitor_requests = InFlightLimit("/v1/monitor + /v1/feedback", self.serve_cfg.max_ongoing_monitor_requests,
                                              self.serve_cfg.retry_after_s)
        self.model_name = model_name
        self.model_ref: str | int = model_ref
        self.candidate_ref: str | int | None = None
        self.registry = Registry(registry_uri)
        self.torch_threads = _set_torch_threads(torch_threads)
        self._initialised = False  # the first reconfigure() (at replica start) fails loudly; later ones don't
        self.last_reconfigure_error: str | None = None
        self._request_ids = RequestIds()
        self.batches = self.batched_requests = self.max_requests_per_batch = 0
        self.device = replica_device(self.serve_cfg.num_gpus)
        self.versions = Versions(Scorer.from_loaded(self.registry.load(model_name, model_ref), self.device))
        self._set_batching(self.serve_cfg.max_batch_size, self.serve_cfg.batch_wait_timeout_s)
        self._monitor_name, self._monitor_namespace = monitor_name, monitor_namespace
        self._monitor_synced = False
        self._monitor_sync_task: asyncio.Task | None = None
        self.monitor = self._monitor_link() if monitor else None
        try:
            self.replica_id = serve.get_replica_context().replica_tag
        except Exception:
            self.replica_id = None
        log.info("raysys: serving %s v%d from %s (batch <= %d requests / %.1f ms, %d torch threads, monitor %s, "
                 "auth %s)", model_name, self.scorer.version, registry_uri, self.max_batch_size,
                 self.batch_wait_timeout_s * 1000, self.torch_threads,
                 f"{monitor_namespace}/{monitor_name}" if self.monitor else "off",
                 "on" if self._api_token else "off")

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__ on each replica: the HTTP app whose routes hold this endpoint."""
        return build_http_app(self)

    @property
    def scorer(self) -> Scorer:
        """The stable version."""
        return self.versions.stable

    @property
    def candidate(self) -> Scorer | None:
        return self.versions.candidate

    @property
    def canary_percent(self) -> float:
        return self.versions.canary_percent

    # ----- settings -----
    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self._score_batched.set_max_batch_size(self.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    # ----- monitor -----
    def _monitor_link(self) -> MonitorLink | None:
        if self.scorer.reference_profile is None:
            log.warning("raysys: %s v%d has no reference profile; monitoring is off (register the model with "
                        "reference_profile= to enable it)", self.model_name, self.scorer.version)
            return None
        mc = self.monitor_cfg
        link = MonitorLink(self._make_monitor_handle, interval_s=mc.flush_interval_ms / 1000,
                           flush_rows=mc.flush_rows, buffer=MonitorBuffer(mc.max_buffer_rows))
        # acquired now so that a new actor starts while the replica warms up; get_or_create ignores the init
        # kwargs when the actor exists, and a version mismatch is fixed once, later (_sync_monitor_version)
        link.acquire()
        return link

    def _make_monitor_handle(self):
        from raysys.monitor import get_or_create_monitor

        s = self.scorer
        return get_or_create_monitor(self._monitor_name, self._monitor_namespace, profile=s.reference_profile,
                                     schema=schema_to_dict(s.schema), monitor_cfg=self.monitor_cfg.model_dump(),
                                     model_version=s.version)

    def _start_monitor(self) -> None:
        """On the first request (an event loop is running): the flusher, and the one-off version check."""
        if self.monitor is not None and self._monitor_sync_task is None:
            self.monitor.ensure_started()
            self._monitor_sync_task = asyncio.get_running_loop().create_task(self._sync_monitor_version())

    async def _sync_monitor_version(self) -> None:
        """Once per replica: point an existing monitor (made for another version) at ours."""
        if self.monitor is None or self._monitor_synced:
            return
        handle = self.monitor.acquire()
        if handle is None:
            return
        try:
            report = await self.monitor.report(handle)
        except Exception as e:
            self.monitor.mark_failed(f"report failed: {type(e).__name__}: {e}")
            return
        self._monitor_synced = True
        if str(report.get("model_version")) != str(self.scorer.version):
            self._point_monitor_at(self.scorer)

    def _point_monitor_at(self, scorer: Scorer) -> None:
        if self.monitor is not None and scorer.reference_profile is not None:
            self.monitor.set_profile(scorer.reference_profile, schema_to_dict(scorer.schema), scorer.version)

    # ----- rollout -----
    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` in place (see `serve.contract.parse_user_config`)."""
        first = not self._initialised
        self._initialised = True
        try:
            await self._apply(parse_user_config(user_config), first)
            self.last_reconfigure_error = None
        except Exception as e:
            if first:
                raise  # at replica start: fail loudly (serve status shows it)
            # a running replica keeps serving what it has: a bad rollout must not take the endpoint down
            self.last_reconfigure_error = f"{type(e).__name__}: {e}"
            log.error("raysys: reconfigure(%r) failed; still serving %s v%d: %s", user_config, self.model_name,
                      self.scorer.version, e)

    async def _apply(self, cfg: dict[str, Any], first: bool) -> None:
        # load everything first, then switch stable, candidate and split in one assignment, so no request ever
        # sees half a rollout
        old = self.versions
        stable = await self._load_ref(cfg["model_ref"]) if "model_ref" in cfg else old.stable
        candidate = old.candidate
        if "candidate_ref" in cfg:
            candidate = None if cfg["candidate_ref"] is None else await self._load_ref(cfg["candidate_ref"])
        percent = cfg.get("canary_percent", old.canary_percent if candidate is not None else 0.0)
        shadow = cfg.get("shadow", old.shadow) if candidate is not None else False
        deadline = cfg.get("canary_deadline", old.deadline) if candidate is not None else None
        self.versions = Versions(stable, candidate, percent, shadow, deadline)
        self.model_ref = cfg.get("model_ref", self.model_ref)
        self.candidate_ref = cfg.get("candidate_ref", self.candidate_ref)
        if stable is not old.stable:
            log.info("raysys: %s stable v%d -> v%d", self.model_name, old.stable.version, stable.version)
            # at replica start (a restart, a scale-up) the shared monitor is left alone: the one-off version
            # check (_sync_monitor_version) re-points it only if it tracks another version
            if not first:
                self._point_monitor_at(stable)
        if candidate is not None:
            log.info("raysys: %s %s v%d takes %.1f%% of requests%s", self.model_name, "shadow" if shadow else "canary",
                     candidate.version, percent, f" until {time.ctime(deadline)}" if deadline else "")
        if "max_batch_size" in cfg or "batch_wait_timeout_s" in cfg:
            self._set_batching(cfg.get("max_batch_size", self.max_batch_size),
                               cfg.get("batch_wait_timeout_s", self.batch_wait_timeout_s))

    async def _load_ref(self, ref: str | int) -> Scorer:
        """The Scorer for an alias or version: one already held when it is the same version, else loaded from
        the registry (sha256 checked, safetensors only) off the event loop."""
        version = await asyncio.to_thread(self.registry.resolve, self.model_name, ref)
        for held in (self.scorer, self.candidate):
            if held is not None and held.version == version:
                return held
        loaded = Scorer.from_loaded(await asyncio.to_thread(self.registry.load, self.model_name, version), self.device)
        if loaded.reference_profile is None and self.monitor is not None:
            log.warning("raysys: %s v%d has no reference profile; the monitor keeps the current one", self.model_name,
                        loaded.version)
        return loaded

    # ----- scoring -----
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _score_batched(self, items: list[tuple]) -> list[ScoredRows | RequestError]:
        # thin on purpose: @serve.batch does not run in _local_testing_mode; score_requests is unit-tested
        return self._score(items)

    def _score(self, items: list[tuple]) -> list[ScoredRows | RequestError]:
        """Score (scorer, rows, prefix, t0, request_id, compare) items together and hand the monitor the whole batch in
        one call; a request's latency is from its arrival to its scores."""
        self.batches += 1
        self.batched_requests += len(items)
        self.max_requests_per_batch = max(self.max_requests_per_batch, len(items))
        if self.monitor is None:
            return score_requests(items)
        stats: list = []
        # beside a canary, every other batch lets stable re-score the canary's rows first (see score_requests)
        out = score_requests(items, stats, compare_first=not self.versions.shadow and self.batches % 2 == 1)
        now = time.perf_counter()
        self.monitor.add_many([(r.x_num_raw, r.x_cat, None, (now - item[3]) * 1000, item[0].version, r.probs,
                                item[4]) for item, r in zip(items, out) if isinstance(r, ScoredRows)])
        self.monitor.add_scoring(stats)
        return out

    # ----- request handling (serve.routes calls these) -----
    @property
    def auth_required(self) -> bool:
        """Whether /v1/* needs the API key (one is configured)."""
        return bool(self._api_token)

    def check_auth(self, request: Any) -> None:
        check_auth(request.headers.get("authorization"), self._api_token, request.headers.get("x-api-key"))

    async def _predict(self, request: Any, routed: list[Scorer]) -> Response:
        """Parse, route, score. `routed` gets the version the request is booked to: the stable one until a
        version is chosen (a request refused before that, e.g. for its body, is the endpoint's), then the
        version that scores it, so that its error, latency and rows all count for that version."""
        t0 = time.perf_counter()
        versions = self.versions  # one routing state for the whole request, even across a rollout
        routed.append(versions.stable)
        self.check_auth(request)
        max_rows = self.serve_cfg.max_instances_per_request
        body = await read_body_capped(request, max_body_bytes(versions.stable.schema, max_rows))
        parsed = parse_predict(body, max_instances=max_rows)
        request_id = parsed.request_id if parsed.request_id is not None else self._request_ids.next()
        scorer, compare = versions.route(request_id)
        routed[0] = scorer
        self._start_monitor()
        item = (scorer, parsed.rows, parsed.prefix, t0, request_id, compare)
        if isinstance(parsed.rows, list) and len(parsed.rows) >= self.max_batch_size:
            scored = self._score([item])[0]  # a full batch on its own: waiting for company only adds latency
        else:
            # through the batcher even when no other request seems to be here: the replica's HTTP server hands
            # requests over one at a time, so concurrent requests only ever meet in the batch queue
            scored = await self._score_batched(item)
        if isinstance(scored, RequestError):
            raise scored
        out = format_prediction(scorer, scored.probs)
        out["request_id"] = request_id
        return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")

    async def _predict_within_timeout(self, request: Any, routed: list[Scorer]) -> Response:
        try:
            # asyncio.timeout, not wait_for: no extra task per request
            async with asyncio.timeout(self.serve_cfg.request_timeout_s):
                return await self._predict(request, routed)
        except TimeoutError:
            raise RequestError(504, None, f"not answered within serve.request_timeout_s="
                                          f"{self.serve_cfg.request_timeout_s:g}s; retry later") from None

    async def predict_response(self, request: Any) -> Response:
        """POST /v1/predict, whole: errors become their JSON answers and count toward the monitor's error rate
        of the version the request was routed to (a failing canary's errors are the canary's)."""
        routed: list[Scorer] = []
        response = await guarded(self._predict_within_timeout(request, routed))
        if response.status_code >= 400 and self.monitor is not None:
            self.monitor.add_error((routed[0] if routed else self.scorer).version, response.status_code >= 500)
        return response

    async def feedback(self, items: list[tuple[str, Any]], prefix: str | None = None) -> dict[str, Any]:
        """Labels for earlier predictions, judged by the monitor per item (`serve.parsing.feedback_answer`:
        202 with what was accepted and refused, 404 when no id was ever answered, 422 for invalid labels).
        A prediction of another replica may still wait in that replica's buffer (shipped every
        monitor.flush_interval_ms), so ids unknown at the first ask are asked about once more after that
        interval, and only then refused (and counted). 503 when monitoring is off or unavailable."""
        if self.monitor is None:
            raise RequestError(503, None, "monitoring is off for this endpoint; feedback has nowhere to go")
        self.monitor.ensure_started()
        try:
            verdicts = await self.monitor.feedback_verdicts(items, final=False)
            unknown = [i for i, v in enumerate(verdicts) if v["verdict"] == "unknown_request_id"]
            if unknown:
                await asyncio.sleep(self.monitor.interval_s + FEEDBACK_RECHECK_MARGIN_S)
                again = await self.monitor.feedback_verdicts([items[i] for i in unknown], final=True)
                for i, v in zip(unknown, again, strict=True):
                    verdicts[i] = v
        except FeedbackUnavailable as e:
            raise RequestError(503, None, str(e)) from None
        return feedback_answer(items, verdicts, prefix)

    async def monitor_report(self) -> dict[str, Any]:
        """The monitor actor's report, this replica's buffered rows included. 503 when it is off or unavailable."""
        if self.monitor is None:
            raise RequestError(503, None, "monitoring is off for this endpoint (disabled, or the model has "
                                          "no reference profile)")
        self.monitor.ensure_started()
        await self._sync_monitor_version()
        self.monitor.flush()  # this replica's buffered rows reach the actor before the report call
        handle = self.monitor.acquire()
        if handle is None:
            raise RequestError(503, None, f"monitor unavailable: {self.monitor.last_error}")
        try:
            return await self.monitor.report(handle)
        except TimeoutError:
            raise RequestError(503, None, f"monitor did not answer within {MONITOR_REPORT_TIMEOUT_S:.0f}s") from None
        except Exception as e:
            self.monitor.mark_failed(f"report failed: {type(e).__name__}: {e}")
            raise RequestError(503, None, f"monitor unavailable: {type(e).__name__}") from None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_name": self.model_name, "model_version": self.scorer.version,
                "model_ref": self.model_ref, "replica": self.replica_id,
                "candidate_version": self.candidate.version if self.candidate else None,
                "canary_percent": self.canary_percent, **self._canary_state(),
                "last_reconfigure_error": self.last_reconfigure_error,
                "batching": {"batches": self.batches, "requests": self.batched_requests,
                             "max_requests_per_batch": self.max_requests_per_batch},
                "monitor": self.monitor.stats() if self.monitor else None,
                "monitor_requests": self.monitor_requests.stats()}

    def _canary_state(self) -> dict[str, Any]:
        v = self.versions
        return {"shadow": v.shadow, "canary_deadline": v.deadline, "canary_expired": v.expired()}

    def readiness(self) -> dict[str, Any]:
        if self.scorer is None:
            return {"status": "not ready", "detail": "no model loaded"}
        return {"status": "ready", "model_version": self.scorer.version,
                "candidate_version": self.candidate.version if self.candidate else None}

    def describe(self) -> dict[str, Any]:
        info = self.scorer.describe()
        info.update(model_ref=self.model_ref, registry_uri=self.registry.uri,
                    candidate=dict(self.candidate.describe(), ref=self.candidate_ref) if self.candidate else None,
                    canary_percent=self.canary_percent, **self._canary_state(), last_reconfigure_error=self.last_reconfigure_error,
                    batching={"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s},
                    max_instances_per_request=self.serve_cfg.max_instances_per_request,
                    torch_threads=self.torch_threads)
        return info

    def memory(self, trim: bool = False) -> dict[str, Any]:
        """This replica's memory by layer (serve.memprobe), through a handle only: benchmarks/soak.py."""
        return {"replica": self.replica_id, **memory_report(trim=trim)}

    def check_health(self) -> None:
        # called by Serve every few seconds; a replica without a model is unhealthy
        if self.scorer is None:
            raise RuntimeError("no model loaded")
