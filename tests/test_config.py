"""Tier 1: presets and YAML validation; every error names the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raysys.config import PRESETS, load_config, preset


def test_presets_validate_and_derive():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.preset == name
    assert preset("tiny").data.num_train_rows < preset("demo").data.num_train_rows < preset("large").data.num_train_rows
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_yaml_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  num_workers: 3\ndistill:\n  alphas: [0.2]\n")
    cfg = load_config(f, preset_name="tiny")
    assert cfg.train.num_workers == 3 and cfg.distill.alphas == [0.2]
    assert cfg.data.num_train_rows == preset("tiny").data.num_train_rows
    f.write_text("train:\n  num_wrokers: 3\n")
    with pytest.raises(ValueError, match=r"train\.num_wrokers"):
        load_config(f)
    f.write_text("train:\n  num_workers: zero\n")
    with pytest.raises(ValueError, match=r"train\.num_workers"):
        load_config(f)
    f.write_text("distill:\n  alphas: [1.5]\n")
    with pytest.raises(ValueError, match=r"distill\.alphas"):
        load_config(f)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_with_root_moves_every_output(tmp_path):
    cfg = preset("tiny").with_root(tmp_path)
    for p in (cfg.run_dir, cfg.registry_uri, cfg.data.root):
        assert p.startswith(str(tmp_path))


def test_cli_bad_config_exits_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  num_workers: -1\n")
    r = subprocess.run([sys.executable, "-m", "raysys.cli", "data", "generate", "--config", str(f), "--root",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "train.num_workers" in r.stdout + r.stderr
