"""Named presets (`tiny`, `demo`, `large`) and the YAML loader.

Presets are code, each derived from `demo`, so that a change to `demo` flows into the others. A YAML
file is merged over a preset and validated against the same models.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from raysys.config.sections import EvaluationConfig, ModelConfig, PipelineConfig


def _demo() -> PipelineConfig:
    cfg = PipelineConfig(preset="demo")
    # the teacher is never served, so its activation is chosen for accuracy: exact GELU beat ReLU on the
    # synthetic demo data's validation split (benchmarks/distill.py: 0.885 vs 0.878); students keep the
    # ReLU default, the cheapest call on CPU
    cfg.teacher = ModelConfig(activation="gelu")
    return cfg


def _tiny() -> PipelineConfig:
    # small enough for the integration test: seconds per stage on 2 cores
    cfg = _demo()
    cfg.preset = "tiny"
    cfg.data = cfg.data.model_copy(
        update=dict(num_train_rows=6_000, num_val_rows=1_500, num_test_rows=1_500, num_shards=2)
    )
    cfg.teacher = cfg.teacher.model_copy(update=dict(hidden_dims=[128, 64], embed_dim=6))
    cfg.train = cfg.train.model_copy(update=dict(num_epochs=6, timeout_s=60))
    cfg.distill = cfg.distill.model_copy(
        update=dict(search="grid", temperatures=[2.0, 4.0], alphas=[0.7], num_epochs=4, scheduler="fifo",
                    max_concurrent_trials=2,
                    soft_target_actors=1,
                    evaluation=EvaluationConfig(latency_repeats=20))
    )
    cfg.monitor = cfg.monitor.model_copy(update=dict(window_size=500, min_rows=100, calibration_rows=200_000))
    return cfg


def _large() -> PipelineConfig:
    cfg = _demo()
    cfg.preset = "large"
    cfg.data = cfg.data.model_copy(
        update=dict(num_train_rows=500_000, num_val_rows=50_000, num_test_rows=50_000, num_numeric=32,
                    num_categorical=8, num_categories=20, num_classes=8, num_shards=16)
    )
    cfg.teacher = cfg.teacher.model_copy(update=dict(hidden_dims=[1024, 1024, 512, 256], embed_dim=16, dropout=0.1))
    cfg.train = cfg.train.model_copy(update=dict(num_epochs=20, batch_size=1024))
    cfg.distill = cfg.distill.model_copy(
        update=dict(student=ModelConfig(hidden_dims=[128, 64], embed_dim=8), temperatures=[1.0, 2.0, 4.0, 8.0],
                    alphas=[0.3, 0.5, 0.7, 0.9], num_epochs=20, batch_size=1024, num_samples=32,
                    student_widths=[32, 64, 128, 256], student_depths=[1, 2, 3])
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
