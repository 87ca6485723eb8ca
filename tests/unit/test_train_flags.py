"""Tier 1: `raysys train` / jobs/train_teacher.py teacher flags become `teacher:` config overrides."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO
from typer.testing import CliRunner

from raysys.cli import app
from raysys.config import load_config
from raysys.workflow.overrides import train_overrides


def _job():
    path = REPO / "jobs" / "train_teacher.py"
    spec = importlib.util.spec_from_file_location("train_teacher_job_flags", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_teacher_flags_map_to_teacher_overrides():
    assert train_overrides(teacher_family="mlp") == {"teacher": {"family": "mlp"}}
    assert train_overrides(teacher_family="ft_transformer", teacher_size="base") == {
        "teacher": {"family": "ft_transformer", "size": "base"}}
    # a size names an ft_transformer (the only family with sizes)
    assert train_overrides(teacher_size="small") == {"teacher": {"family": "ft_transformer", "size": "small"}}
    both = train_overrides("pipeline", 4, teacher_size="tiny")
    assert both == {"train": {"strategy": "pipeline", "num_workers": 4},
                    "teacher": {"family": "ft_transformer", "size": "tiny"}}
    cfg = load_config(preset_name="tiny", overrides=both)
    assert (cfg.teacher.family, cfg.teacher.size, cfg.train.strategy) == ("ft_transformer", "tiny", "pipeline")
    with pytest.raises(ValueError, match="size"):  # an mlp has no sizes: the config names the field
        load_config(preset_name="tiny", overrides=train_overrides(teacher_family="mlp", teacher_size="base"))


def test_job_takes_the_same_teacher_flags():
    job = _job()
    args = job.parse_args(["--teacher-family", "ft_transformer", "--teacher-size", "large", "--strategy", "zero3"])
    assert (args.teacher_family, args.teacher_size, args.strategy) == ("ft_transformer", "large", "zero3")
    assert train_overrides(args.strategy, args.workers, args.dp, args.tp, args.pp, args.max_worker_memory_gb,
                           args.teacher_family, args.teacher_size) == {
        "train": {"strategy": "zero3"}, "teacher": {"family": "ft_transformer", "size": "large"}}
    for bad in (["--teacher-family", "gbdt"], ["--teacher-size", "huge"]):
        with pytest.raises(SystemExit):
            job.parse_args(bad)


def test_cli_rejects_unknown_teacher_flags_before_any_work(monkeypatch):
    import raysys.workflow.stages

    def boom(*a, **k):
        raise AssertionError("must not start")

    monkeypatch.setattr(raysys.workflow.stages, "stage_data", boom)
    runner = CliRunner()
    for flags in (["--teacher-family", "gbdt"], ["--teacher-size", "huge"]):
        res = runner.invoke(app, ["train", "--preset", "tiny", *flags])
        assert res.exit_code == 2, res.output
    assert "--teacher-family" in runner.invoke(app, ["train", "--help"]).output
