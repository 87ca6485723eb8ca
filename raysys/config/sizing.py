"""The `sizing:` section: training settings that follow the table's size (raysys.workflow.small_tables)."""

from __future__ import annotations

from pydantic import Field

from raysys.config.strict import Strict


class SizingConfig(Strict):
    """A preset's batch sizes and epochs suit tables of thousands of rows; on a table of a few hundred, batch 256
    for 6 epochs is a handful of optimizer steps and a model that barely left its initialisation. With `enabled`,
    a training split smaller than `batches_per_epoch` batches gets a smaller batch (a power of two, at least
    `min_batch`) and, for the teacher and each student, enough epochs for `min_steps` optimizer steps (at most
    `max_epochs`). Larger tables, DP-SGD runs (whose epsilon the batch and epochs set) and settings already past
    these bounds are left as configured; every change is a line on the model cards."""

    enabled: bool = Field(True, description="Size batches and epochs to a small training split (false: the "
                                            "configured values as they are, on any table).")
    batches_per_epoch: int = Field(16, ge=1, description="A batch holds at most 1/this of the training rows "
                                                         "(tables smaller than this many batches are resized).")
    min_batch: int = Field(16, ge=1, description="The smallest batch sizing picks.")
    min_steps: int = Field(600, ge=1, description="Optimizer steps a resized model gets at least.")
    max_epochs: int = Field(200, ge=1, description="Epochs sizing gives at most.")
