"""A `StudentEndpoint` without Ray or a registry, for tests that drive its FastAPI app in-process: a real
student and preprocessor, an API key, and a monitor link to a plain `Monitor` behind a stand-in for the actor
handle (calls run in order, as Ray runs one caller's calls to an actor)."""

from __future__ import annotations

import concurrent.futures

import torch

from raysys.config import ModelConfig, ServeConfig
from raysys.models import build_model, model_spec
from raysys.monitor import Monitor
from serve.monitor_link import MonitorBuffer, MonitorLink
from serve.parsing import RequestIds
from serve.scoring import Scorer
from serve.web import InFlightLimit

AWAITED = {"feedback_verdicts", "report"}  # the calls whose result a replica waits for


class _Ref:
    def __init__(self, value):
        self._f = concurrent.futures.Future()
        self._f.set_result(value)

    def future(self):
        return self._f


class _Method:
    def __init__(self, fn, name: str, calls: list | None):
        self.fn, self.name, self.calls = fn, name, calls

    def remote(self, *args):
        if self.calls is not None:
            self.calls.append((self.name, args))
        out = self.fn(*args)
        return _Ref(out) if self.name in AWAITED else None


class MonitorHandle:
    """The monitor actor as a replica's MonitorLink sees it, over one plain Monitor; `calls` (optional) records
    every (method, args)."""

    def __init__(self, mon: Monitor, calls: list | None = None):
        for name in ("record", "feedback_verdicts", "report", "set_profile"):
            setattr(self, name, _Method(getattr(mon, name), name, calls))


def bare_endpoint(monkeypatch, schema, pre, mon: Monitor | None, key: str, *, registry_uri: str = "memory://test"):
    """The endpoint class's instance, attributes set as its __init__ would for one stable version (a seeded
    untrained student), scoring each request on its own (`@serve.batch` needs a replica)."""
    from serve import endpoint as endpoint_mod
    from serve.endpoint import StudentEndpoint, Versions

    torch.manual_seed(0)
    model = build_model(model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))).eval()
    scorer = Scorer(name="student", version=1, model=model, schema=schema, preprocessor=pre)
    # an unknown feedback id is asked about once more after a flush interval: no waiting here
    monkeypatch.setattr(endpoint_mod, "FEEDBACK_RECHECK_MARGIN_S", 0.0)
    cls = next(c for c in StudentEndpoint.func_or_class.__mro__ if "_predict" in vars(c))
    ep = cls.__new__(cls)
    ep.serve_cfg, ep.versions, ep._api_token = ServeConfig(max_instances_per_request=50), Versions(scorer), key
    ep.model_name, ep.model_ref, ep.candidate_ref, ep.replica_id = "student", "production", None, None
    ep.last_reconfigure_error, ep.torch_threads = None, 1
    ep._request_ids, ep.max_batch_size, ep.batch_wait_timeout_s = RequestIds(), 64, 0.0
    ep.batches = ep.batched_requests = ep.max_requests_per_batch = 0
    ep.monitor_requests = InFlightLimit("/v1/monitor + /v1/feedback", 8, 1.0)
    ep.monitor = (MonitorLink(lambda: MonitorHandle(mon), interval_s=0.05, buffer=MonitorBuffer())
                  if mon is not None else None)
    ep._monitor_sync_task, ep._monitor_synced = "not started", True

    class _Registry:
        uri = registry_uri

    ep.registry = _Registry()

    async def one(item):
        return ep._score([item])[0]

    ep._score_batched = one
    return ep
