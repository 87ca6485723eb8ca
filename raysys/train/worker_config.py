"""`WorkerConfig`: everything a training worker needs, typed, built on the driver, re-validated on each worker.

It crosses to the workers as JSON (`model_dump(mode="json")` is Ray Train's `train_loop_config`) and every
worker rebuilds it with `WorkerConfig.model_validate`, so nothing pickled crosses, a wrong value fails
the same way on both sides, and every default lives in `raysys.config` alone. The translations of a
`TrainConfig` into raysys.parallel's types are here too, shared by the driver's checks and the loop.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raysys.config import PipelineConfig, TrainConfig
from raysys.data.dataset import Preprocessor, parquet_rows, split_files
from raysys.data.schema import DatasetSchema
from raysys.models import model_spec
from raysys.parallel import ParallelDims, StrategyConfig
from raysys.train.schedule import total_steps


class WorkerConfig(BaseModel):
    """What `train_loop_per_worker` receives (as its JSON dump)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    run_name: str = Field(description="The experiment directory name (recorded in every checkpoint).")
    train: TrainConfig
    model_spec: dict[str, Any] = Field(description="`raysys.models.model_spec` of the teacher (JSON).")
    dataset_schema: DatasetSchema
    preprocessor: dict[str, Any] = Field(description="`Preprocessor.to_dict()` state, fitted on the driver.")
    total_steps: int = Field(ge=1, description="Optimizer steps of the run, the lr schedule's length: "
                             "ceil(train rows / batch_size) x num_epochs.")

    def build_preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.dataset_schema, self.preprocessor)


def worker_config(cfg: PipelineConfig, schema: DatasetSchema, preprocessor: Preprocessor, run_name: str
                  ) -> WorkerConfig:
    return WorkerConfig(run_name=run_name, train=cfg.train, model_spec=model_spec(schema, cfg.teacher),
                        dataset_schema=schema, preprocessor=preprocessor.to_dict(),
                        total_steps=total_steps(_schedule_rows(cfg), cfg.train.batch_size, cfg.train.num_epochs))


def strategy_config(train: TrainConfig) -> StrategyConfig:
    options: tuple[tuple[str, Any], ...] = (("zero1_partition", train.zero1_partition),
                                            ("pipeline_schedule", train.pipeline_schedule))
    if train.num_microbatches:
        options += (("num_microbatches", train.num_microbatches),)
    return StrategyConfig(train.strategy, lr=train.lr, weight_decay=train.weight_decay, options=options)


def parallel_dims(train: TrainConfig, world: int) -> ParallelDims:
    p = train.parallel
    return ParallelDims.for_strategy(train.strategy, world, dp=p and p.dp, tp=p and p.tp, pp=p and p.pp)


def train_rows(root: str) -> int:
    """Rows of the training split, from the Parquet footers (no data read)."""
    return parquet_rows(split_files(root, "train"))


def _schedule_rows(cfg: PipelineConfig) -> int:
    try:
        return train_rows(cfg.data.root)
    except (ValueError, OSError):  # no data written yet (a dry config): the synthetic size
        return cfg.data.num_train_rows

