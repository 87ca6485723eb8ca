"""The `monitor` section: live monitoring of a served model (drift, latency, accuracy, alerts, stored traffic,
retraining)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raysys.config.strict import Strict

MIN_FLUSH_INTERVAL_MS = 10  # a replica's monitor flusher waits this long at the least (0 would busy-loop it)



class MonitorConfig(Strict):
    """Live monitoring: drift (window tests + a calibrated online detector), latency, accuracy, alerts."""

    window_size: int = Field(1000, ge=10, description="Rows in the sliding window the window tests use.")
    min_rows: int = Field(200, ge=1, description="Rows needed before a feature can alert.")
    num_bins: int = Field(10, ge=2, description="Reference-quantile bins per numeric feature (PSI, JS).")
    psi_threshold: float = Field(0.2, gt=0, description="PSI above which a feature is reported as `psi_high`.")
    latency_window: int = Field(5000, ge=10, description="Latencies kept for the recent percentiles.")
    alpha: float = Field(0.01, gt=0, lt=1, description="Window tests: level after the multiple-testing correction.")
    multiple_testing: Literal["bh", "bonferroni"] = Field(
        "bh", description="Window tests across features: Benjamini-Hochberg (FDR) or Bonferroni (FWER).")
    ert: float = Field(10_000, ge=100, description="Online detector: expected rows between false alarms.")
    calibration_rows: int = Field(1_000_000, ge=10_000,
                                  description="Bootstrap rows simulated at registration to calibrate the ERT.")
    prediction_log_size: int = Field(100_000, ge=100, description="Predictions kept for joining /v1/feedback.")
    feedback_window: int = Field(5_000, ge=10, description="Latest labelled predictions the accuracy uses.")
    min_labels: int = Field(200, ge=1, description="Labels needed before an accuracy drop can alert.")
    accuracy_drop: float = Field(0.05, gt=0, lt=1,
                                 description="Alert when accuracy falls this far below the reference accuracy.")
    recalibration_prior_rows: float = Field(
        200.0, ge=0, description="Accuracy estimate: the registration-time confidence map counts as this many "
        "labelled rows when the map is re-fitted online from joined feedback (weight of n labels: n / (n + this)).")
    recalibration_bins: int = Field(
        10, ge=1, description="Accuracy estimate: most confidence bins of the online re-fit (>= 50 labels per bin).")
    flush_rows: int = Field(2048, ge=1, description="Replica: ship buffered rows to the monitor at this many.")
    flush_interval_ms: float = Field(
        1000.0, ge=MIN_FLUSH_INTERVAL_MS, description="Replica: ship buffered rows at least this often, >= 10 ms (each ship is an actor call "
                                   "costing the replica milliseconds of CPU: every 0.2 s cost ~6% of throughput under load).")
    max_buffer_rows: int = Field(50_000, ge=1, description="Replica: rows beyond this are dropped (and counted).")
    snapshot_uri: str | None = Field(None, description="pyarrow.fs URI/dir for monitor snapshots (None: off).")
    snapshot_interval_s: float = Field(30.0, gt=0, description="Seconds between monitor snapshots.")
    traffic_uri: str | None = Field(None, description="pyarrow.fs URI/dir for recent traffic Parquet (None: off).")
    traffic_rows_per_file: int = Field(50_000, ge=1, description="Rows per recent-traffic Parquet file.")
    traffic_max_files: int = Field(20, ge=1, description="Recent-traffic files kept (oldest deleted).")
    traffic_flush_interval_s: float = Field(
        60.0, gt=0, description="Write buffered recent traffic and joined labels (<traffic_uri>/labels) at least "
        "this often, so that a retrain job reads what came in; an alert writes them at once.")
    traffic_drop_columns: list[str] = Field(default_factory=list, description="Columns never written (PII).")
    traffic_hash_columns: list[str] = Field(
        default_factory=list, description="Columns written as an HMAC-SHA256 keyed by the deployment's secret salt "
        "(RAYSYS_TRAFFIC_SALT, RAYSYS_TRAFFIC_SALT_FILE, else generated once at <traffic_uri>/_traffic_salt).")
    traffic_sensitive: Literal["hash", "drop"] = Field(
        "hash", description="Features the schema marks `sensitive`: written hashed (as traffic_hash_columns) or not "
        "at all; never raw. Either way a retrain on recent traffic cannot use them.")
    on_drift: Literal["alert", "retrain"] = Field(
        "alert", description="'retrain' submits jobs/retrain.py through the Ray Jobs API on a confirmed alert.")
    retrain_when: Literal["drift", "accuracy_drop"] = Field(
        "drift", description="With on_drift 'retrain': 'drift' retrains on any confirmed alert; 'accuracy_drop' "
        "only when the accuracy is lost: realised (labels) or estimated (confidence, no labels) below the reference "
        "by `accuracy_drop`. Drift that costs no accuracy is then reported (alerts), not retrained on.")
    retrain_cooldown_s: float = Field(3600.0, ge=0, description="Seconds between two retrain submissions.")
    retrain_address: str | None = Field(None, description="Ray Jobs API address (None: RAY_ADDRESS or local).")
    retrain_args: list[str] = Field(default_factory=list, description="Extra arguments for jobs/retrain.py.")
    retrain_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray resources the retrain job's driver reserves (the Jobs API's "
        "entrypoint_resources), e.g. {'retrain_node': 1} with that custom resource on a worker node: the job then "
        "runs there, not on the head, which a real cluster keeps for Ray's own processes. {}: wherever the Jobs "
        "API puts it (the head).")
    malloc_arena_max: int | None = Field(
        2, ge=1, description="glibc's MALLOC_ARENA_MAX in the monitor actor's environment (its runtime_env, read when "
        "its process starts): glibc's default arenas keep freed memory, and the actor's RSS crept ~1 MB/min under a "
        "steady load (benchmarks/soak.py). None: glibc's default.")
