"""The base of every config section: unknown keys are refused, so a typo in a YAML file is an error naming the key,
not a setting silently ignored; assignments are validated too (`cfg.train.num_workers = 0` fails as loading would)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
