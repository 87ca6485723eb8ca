"""Typed configuration for every stage of raysys.

One `PipelineConfig` holds a section per stage. Presets (`tiny`, `demo`, `large`) are code, each
derived from the one before, so that a change to `demo` flows into `large`. YAML files are validated
against the same models: an unknown or mistyped key is a `ValueError` that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # forbid unknown keys so a typo in a YAML file is an error, not a silently ignored setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the data lives and, for the synthetic generator, what it looks like."""

    root: str = Field("runs/data", description="Dataset directory (schema.json + train/validation/test Parquet).")
    source: Literal["synthetic", "parquet"] = Field(
        "synthetic", description="'synthetic' generates data into `root` when it is missing; 'parquet' reads yours."
    )
    num_train_rows: int = Field(20_000, ge=100, description="Rows in the training split (synthetic).")
    num_val_rows: int = Field(4_000, ge=50, description="Rows in the validation split (synthetic).")
    num_test_rows: int = Field(4_000, ge=50, description="Rows in the test split (synthetic).")
    num_numeric: int = Field(8, ge=2, description="Numeric features (synthetic).")
    num_categorical: int = Field(3, ge=1, description="Categorical features (synthetic).")
    num_categories: int = Field(5, ge=2, description="Categories per categorical feature (synthetic).")
    num_classes: int = Field(4, ge=2, description="Label classes (synthetic).")
    num_shards: int = Field(4, ge=1, description="Parquet files per split (synthetic).")
    label_noise: float = Field(0.03, ge=0.0, lt=0.5, description="Fraction of labels resampled at random.")
    seed: int = Field(0, description="Seed of the generator: same seed, same rule and same rows.")


class ModelConfig(_Strict):
    """An MLP with an embedding per categorical feature (raysys.models.mlp.TabularMLP)."""

    hidden_dims: list[int] = Field([256, 256, 128], description="Widths of the hidden layers.")
    embed_dim: int = Field(8, ge=1, description="Embedding width of each categorical feature.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")

    @field_validator("hidden_dims")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(d < 1 for d in v):
            raise ValueError("hidden_dims must be a non-empty list of positive widths, e.g. [256, 128]")
        return v


class TrainConfig(_Strict):
    """Teacher training with Ray Train (TorchTrainer)."""

    strategy: Literal["ddp"] = Field("ddp", description="Parallel strategy (see raysys.parallel).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one torch process each).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves.")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker.")
    num_epochs: int = Field(8, ge=1, description="Passes over the training split.")
    batch_size: int = Field(256, ge=1, description="Global batch size, split evenly across workers.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts Ray Train allows (-1: unlimited).")
    timeout_s: int = Field(120, ge=10, description="Process-group timeout so a dead rank fails fast.")
    seed: int = Field(0, description="Seed of model init and shuffling.")


class DistillConfig(_Strict):
    """Knowledge distillation of a student from the teacher, swept with Ray Tune."""

    student: ModelConfig = Field(
        default_factory=lambda: ModelConfig(hidden_dims=[64, 32], embed_dim=4), description="Student architecture."
    )
    temperatures: list[float] = Field([2.0, 4.0], description="Softmax temperatures T to sweep.")
    alphas: list[float] = Field([0.5, 0.9], description="Soft-loss weights alpha to sweep.")
    num_epochs: int = Field(15, ge=1, description="Epochs per trial.")
    batch_size: int = Field(256, ge=1, description="Student batch size.")
    lr: float = Field(3e-3, gt=0, description="Student AdamW learning rate.")
    scheduler: Literal["fifo", "asha"] = Field("asha", description="Tune trial scheduler.")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    seed: int = Field(0, description="Seed of student init and shuffling.")

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if not v or any(t <= 0 for t in v):
            raise ValueError("temperatures must be a non-empty list of positive numbers, e.g. [2.0, 4.0]")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("alphas must be a non-empty list of numbers in [0, 1], e.g. [0.5, 0.9]")
        return v


class ServeConfig(_Strict):
    """The Ray Serve HTTP endpoint."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    app_name: str = Field("raysys", description="Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the endpoint deployment.")
    max_batch_size: int = Field(64, ge=1, description="@serve.batch max_batch_size.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch batch_wait_timeout_s.")
    max_instances_per_request: int = Field(1024, ge=1, description="Rows per request before a 413.")


class MonitorConfig(_Strict):
    """Live drift and latency monitoring."""

    window_size: int = Field(1000, ge=10, description="Rows in the sliding window PSI is computed on.")
    min_rows: int = Field(200, ge=1, description="Rows needed before a feature can alert.")
    num_bins: int = Field(10, ge=2, description="Reference-quantile bins per numeric feature.")
    psi_threshold: float = Field(0.2, gt=0, description="PSI above which a feature is flagged as drifted.")
    latency_window: int = Field(5000, ge=10, description="Latencies kept for the percentiles.")


class PipelineConfig(_Strict):
    """The whole loop: data -> teacher -> distillation -> registry -> serve -> monitor."""

    preset: str = Field("custom", description="Name of the preset this config started from.")
    run_dir: str = Field("runs", description="Ray Train/Tune results and checkpoints go under here.")
    registry_uri: str = Field("runs/registry", description="Registry root: a local path or a pyarrow.fs URI.")
    model_name: str = Field("raysys-student", description="Registry name of the served student.")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.train.batch_size < self.train.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be at least train.num_workers "
                f"({self.train.num_workers}): each worker needs a non-empty share of the batch"
            )
        return self

    def with_root(self, root: str | Path) -> PipelineConfig:
        """The same config with data, runs and registry under `root` (tests and demos use a temp dir)."""
        root = Path(root)
        cfg = self.model_copy(deep=True)
        cfg.run_dir = str(root / "runs")
        cfg.registry_uri = str(root / "registry")
        if cfg.data.source == "synthetic":
            cfg.data.root = str(root / "data")
        return cfg


def _demo() -> PipelineConfig:
    return PipelineConfig(preset="demo")


def _tiny() -> PipelineConfig:
    # small enough for the integration test: seconds per stage on 2 cores
    cfg = _demo()
    cfg.preset = "tiny"
    cfg.data = cfg.data.model_copy(
        update=dict(num_train_rows=6_000, num_val_rows=1_500, num_test_rows=1_500, num_shards=2)
    )
    cfg.teacher = ModelConfig(hidden_dims=[128, 64], embed_dim=6)
    cfg.train = cfg.train.model_copy(update=dict(num_epochs=6, timeout_s=60))
    cfg.distill = cfg.distill.model_copy(
        update=dict(temperatures=[2.0, 4.0], alphas=[0.7], num_epochs=4, scheduler="fifo")
    )
    cfg.monitor = cfg.monitor.model_copy(update=dict(window_size=500, min_rows=100))
    return cfg


def _large() -> PipelineConfig:
    cfg = _demo()
    cfg.preset = "large"
    cfg.data = cfg.data.model_copy(
        update=dict(num_train_rows=500_000, num_val_rows=50_000, num_test_rows=50_000, num_numeric=32,
                    num_categorical=8, num_categories=20, num_classes=8, num_shards=16)
    )
    cfg.teacher = ModelConfig(hidden_dims=[1024, 1024, 512, 256], embed_dim=16, dropout=0.1)
    cfg.train = cfg.train.model_copy(update=dict(num_epochs=20, batch_size=1024))
    cfg.distill = cfg.distill.model_copy(
        update=dict(student=ModelConfig(hidden_dims=[128, 64], embed_dim=8), temperatures=[1.0, 2.0, 4.0, 8.0],
                    alphas=[0.3, 0.5, 0.7, 0.9], num_epochs=20, batch_size=1024)
    )
    return cfg


PRESETS = {"tiny": _tiny, "demo": _demo, "large": _large}


def preset(name: str) -> PipelineConfig:
    """A named preset: tiny (tests), demo (make demo), large (a real cluster)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, *, preset_name: str = "demo", overrides: dict | None = None
                ) -> PipelineConfig:
    """Start from a preset, apply a YAML file's keys (nested), then `overrides`; validate the result.

    Raises ValueError naming the offending field (e.g. `train.num_workers: Input should be ...`).
    """
    base = preset(preset_name).model_dump()
    merged = base
    source = f"preset {preset_name!r}"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {path} must hold a mapping of sections (data:, train:, ...)")
        merged = _deep_merge(merged, loaded)
        source = str(path)
    if overrides:
        merged = _deep_merge(merged, overrides)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ValueError(_format_validation_error(err, source)) from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
