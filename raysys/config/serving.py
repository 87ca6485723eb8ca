"""The `serve:` section (the Ray Serve HTTP endpoint, its replicas and their environment) and the `canary:`
section (the metric gate of rollouts)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raysys.config.strict import Strict


class ServeAutoscaling(Strict):
    """Serve autoscaling of the endpoint deployment (Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0: scale to zero when idle).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        64.0, gt=0, description="Requests in flight per replica the autoscaler aims for (about one full batch).")

    @model_validator(mode="after")
    def _order(self) -> ServeAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas: {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class ServeConfig(Strict):
    """The Ray Serve HTTP endpoint."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    network: Literal["public", "private"] = Field(
        "public", description="Who can reach the endpoint's ports. 'public' (default): without an API key "
                              "(RAYSYS_API_TOKEN / RAYSYS_API_TOKEN_FILE) a replica refuses to start when it listens "
                              "beyond loopback (serve.host, or the HAProxy / direct-ingress ports, which bind all "
                              "interfaces). 'private': only trusted hosts reach them, so no key is needed (a key, "
                              "when set, is still required of every /v1/* request).")
    app_name: str = Field("raysys", description="Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    num_replicas: int = Field(
        2, ge=1, description="Replicas of the endpoint deployment (two: a replica that dies costs no request, the "
                             "ingress retries it on the other; and two processes use two cores).")
    autoscaling: ServeAutoscaling | None = Field(
        None, description="Scale replicas with load between min_replicas and max_replicas instead of a fixed "
                          "num_replicas.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many replicas of the endpoint on one node (Serve's "
                                "max_replicas_per_node): 1 spreads them over nodes, so that a lost node costs one "
                                "replica, not all. None: Serve packs them where it finds room.")
    max_batch_size: int = Field(64, ge=1, description="@serve.batch max_batch_size.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="@serve.batch batch_wait_timeout_s: how long a batch waits for more requests once it "
                               "has one. 0: none; requests that arrive while a batch is scored form the next one.")
    max_instances_per_request: int = Field(1024, ge=1, description="Rows per request before a 413.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a replica works on at once (None: 2 x max_batch_size, so a batch can "
                                "fill while the previous one runs).")
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests waiting for a replica beyond max_ongoing_requests; more get 503 with "
                                "Retry-After (-1: unbounded, never refuse).")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds) sent with an overload 503.")
    max_ongoing_monitor_requests: int = Field(
        8, ge=1, description="/v1/monitor and /v1/feedback requests (each awaits the monitor actor) a replica works "
                             "on at once; one more gets 503 + Retry-After at once, so a flood of them never takes "
                             "the max_ongoing_requests slots /v1/predict needs.")
    request_timeout_s: float = Field(
        10.0, gt=0, description="A /v1/predict request not answered within this gets 504 instead of hanging.")
    access_log: bool = Field(
        False, description="Serve's per-request access log line in the replica logs (costs ~3% of throughput; "
                           "the HAProxy ingress and the monitor already count requests, latency and errors).")
    num_gpus: float = Field(
        0.0, ge=0, le=1, description="The GPU (or share of one) each replica reserves; > 0 scores on its CUDA device. "
        "A small tabular student answers faster on a CPU (no host-device copy per batch): measure before choosing. "
        "Refused before deploying on a cluster without that many GPUs.")
    malloc_arena_max: int | None = Field(
        2, ge=1, description="glibc's MALLOC_ARENA_MAX in each replica's environment (its runtime_env), read when "
                             "the replica's process starts. glibc's default (8 arenas per core) let a replica's RSS "
                             "creep ~1.2 MB/min under a steady load with freed memory kept in idle arenas; 2 held it "
                             "at ~0.1 MB/min (benchmarks/soak.py, docs/RELIABILITY.md). None: glibc's default.")


class CanaryConfig(Strict):
    """The metric gate a canary must pass before promotion (`raysys serve canary`, the retrain job): checked
    every `interval_s` on the candidate's figures since the canary began, against the stable version's over
    the same time; `intervals` passing checks promote it, `failure_threshold` failed ones roll it back."""

    percent: float = Field(10.0, gt=0, le=100, description="Share of request ids the candidate takes (0-100].")
    shadow: bool = Field(False, description="Shadow mode: the candidate scores a copy of its share of requests and "
                                            "the stable version answers them all (users never see the candidate).")
    interval_s: float = Field(10.0, gt=0, description="Seconds between two checks.")
    intervals: int = Field(3, ge=1, description="Passing checks (with enough rows) needed to promote.")
    failure_threshold: int = Field(2, ge=1, description="Failed checks that roll the candidate back.")
    max_s: float | None = Field(
        None, gt=0, description="Give up (roll back) when the gate has not decided by then (default: 3 x "
                                "interval_s x (intervals + failure_threshold)); also the canary's deadline, past "
                                "which replicas stop routing to it even if nobody ends it.")
    min_rows: int = Field(200, ge=1, description="Rows the candidate must have scored before a check counts.")
    min_success_ratio: float = Field(0.99, gt=0, le=1,
                                     description="Candidate requests not failed by the server (non-5xx) / all.")
    max_client_error_increase: float = Field(
        0.01, ge=0, le=1, description="The candidate's share of refused (4xx) requests may exceed stable's by this "
                                      "much (a schema the clients do not match shows up here).")
    max_p99_factor: float = Field(2.0, ge=1, description="Candidate p99 scoring time <= this x stable's (+ slack).")
    p99_slack_ms: float = Field(0.1, ge=0, description="Absolute slack on the p99 bound (sub-ms timings are noisy).")
    min_agreement: float = Field(0.75, ge=0, le=1,
                                 description="Share of rows where candidate and stable predict the same class.")
    min_labels: int = Field(50, ge=1, description="Labels per version (via /v1/feedback) before accuracy is judged.")
    max_accuracy_drop: float = Field(0.02, ge=0, le=1,
                                     description="Candidate live accuracy may trail stable's by at most this.")

    def deadline_s(self) -> float:
        return self.max_s or 3 * self.interval_s * (self.intervals + self.failure_threshold)
