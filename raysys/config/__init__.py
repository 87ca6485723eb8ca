"""Typed configuration for every stage of raysys.

One `PipelineConfig` holds a section per stage (`sections`); named presets and the YAML loader are in
`presets`. Import everything from here: `from raysys.config import PipelineConfig, load_config`.
"""

from raysys.config.governance import DPConfig, GovernanceConfig, TrustThresholds
from raysys.config.monitoring import MonitorConfig
from raysys.config.presets import PRESETS, load_config, preset
from raysys.config.quality import QUALITY_CHECKS, CheckLevels, QualityConfig
from raysys.config.sections import (
    FT_ARCH_FIELDS,
    FT_SIZES,
    DataConfig,
    DistillConfig,
    EvaluationConfig,
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    SliceConfig,
    TrackingConfig,
    TrainConfig,
)
from raysys.config.serving import CanaryConfig, ServeAutoscaling, ServeConfig
from raysys.config.sizing import SizingConfig

__all__ = [
    "FT_ARCH_FIELDS", "FT_SIZES", "PRESETS", "QUALITY_CHECKS", "CanaryConfig", "CheckLevels", "DataConfig",
    "DPConfig", "DistillConfig", "EvaluationConfig", "GovernanceConfig", "ModelConfig", "QualityConfig",
    "MonitorConfig", "ParallelConfig", "PipelineConfig", "ServeAutoscaling", "ServeConfig", "SizingConfig", "SliceConfig",
    "TrackingConfig", "TrainConfig", "TrustThresholds", "load_config", "preset",
]
