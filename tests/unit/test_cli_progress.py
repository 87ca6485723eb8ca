"""Tier 1: the CLI's progress bars over the stages' progress log records (rich on a terminal, the plain log lines
elsewhere), the driver-side teacher epoch watcher, and the console quieting `raysys demo`/`run` apply to Ray."""

from __future__ import annotations

import io
import json
import logging

import pytest
from rich.console import Console

from raysys.cli.progress import ProgressHandler, progress_extra, stage_progress
from raysys.train.progress import SNAPSHOT_FILE, EpochWatcher
from raysys.workflow.stages import StageTimer
from raysys.workflow.stages import progress as stage_extra


def _tasks(handler: ProgressHandler) -> dict[str, tuple]:
    return {t.description: (t.completed, t.total, t.finished) for t in handler.progress.tasks}


def _snapshot(run: object, epoch: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": {
        "metrics": {"epoch": epoch, "val_accuracy": 0.5 + epoch / 100}}}))


def test_on_a_terminal_the_stages_records_drive_rich_bars(tmp_path, caplog):
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with caplog.at_level(logging.INFO, logger="raysys"), stage_progress(console) as handler:
        assert isinstance(handler, ProgressHandler)
        StageTimer().run("data", lambda: None)
        log = logging.getLogger("raysys.distill.sweep.progress")
        log.info("trial", extra=progress_extra("distill", "advance", 2, 6))
        assert _tasks(handler)["distill"][:2] == (2, 6)
        # the teacher's epochs, read by the driver from Ray Train's snapshot file
        _snapshot(tmp_path / "teacher", 0)
        watcher = EpochWatcher(str(tmp_path), "teacher", num_epochs=4)
        assert watcher.seen == 0  # already reported when the watch began (a resumed run): not news
        _snapshot(tmp_path / "teacher", 2)
        watcher.poll()
        watcher.poll()  # nothing new: no second record
        assert _tasks(handler)["teacher"][:2] == (3, 4)
        logging.getLogger("raysys").info("[register] done", extra=stage_extra("register", "done"))
    got = _tasks(handler)
    assert got["data"] == (1, 1, True) and got["register"] == (1, 1, True)
    # the bars are gone from the logger and stopped: what the command prints next is its own last lines
    assert not [h for h in logging.getLogger("raysys").handlers if isinstance(h, ProgressHandler)]
    assert not handler.progress.live.is_started


def test_off_a_terminal_nothing_is_installed_and_the_records_stay_plain_lines(caplog):
    console = Console(file=io.StringIO())  # a pipe / CI: not a terminal
    with caplog.at_level(logging.INFO, logger="raysys"), stage_progress(console) as handler:
        assert handler is None
        assert not [h for h in logging.getLogger("raysys").handlers if isinstance(h, ProgressHandler)]
        StageTimer().run("quality", lambda: None)
    assert [r.getMessage() for r in caplog.records if r.name == "raysys"][-2:] == [
        "[quality] started", "[quality] done in 0.0s"]
    assert console.file.getvalue() == ""


def test_a_malformed_record_never_fails_the_stage(caplog):
    console = Console(file=io.StringIO(), force_terminal=True)
    with caplog.at_level(logging.INFO, logger="raysys"), stage_progress(console) as handler:
        logging.getLogger("raysys").info("odd", extra={"raysys_progress": "not a dict"})
        logging.getLogger("raysys").info("odd", extra={"raysys_progress": {"task": "x", "completed": "many"}})
    assert "odd" not in _tasks(handler) and set(_tasks(handler)) <= {"x"}


def test_the_epoch_watcher_skips_a_missing_or_torn_snapshot(tmp_path, caplog):
    watcher = EpochWatcher(str(tmp_path), "teacher", num_epochs=3)
    assert watcher.seen == -1
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / SNAPSHOT_FILE).write_text('{"latest_checkpoint_result": {"metr')
    with caplog.at_level(logging.INFO, logger="raysys"):
        watcher.poll()
        _snapshot(tmp_path / "teacher", 0)
        with watcher:  # __exit__ polls once more: the last epoch is never missed
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "raysys.train.progress"]
    assert len(lines) == 1 and lines[0].startswith("teacher: epoch 1/3 reported, val_accuracy 0.5000")


@pytest.fixture
def restore_ray_logging(monkeypatch):
    import optuna

    for var in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOG_LEVEL", "RAY_AIR_NEW_OUTPUT"):
        monkeypatch.setenv(var, "")  # records the original state (absent or not): restored after the test
        monkeypatch.delenv(var)  # the code under test sets it again
    verbosity = optuna.logging.get_verbosity()
    names = ("ray", "ray.train", "ray.tune", "ray.serve", "ray.data")
    levels = {n: logging.getLogger(n).level for n in names}
    from ray.data import DataContext

    ctx = DataContext.get_current()
    bars = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    yield
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars = bars
    optuna.logging.set_verbosity(verbosity)


def test_the_quiet_console_settings(restore_ray_logging):
    import os

    from ray.data import DataContext

    from raysys.workflow.cluster import quiet_ray_console

    assert quiet_ray_console(serving=True) == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and os.environ["RAY_DATA_LOG_LEVEL"] == "ERROR"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # Tune's classic reporter: silent at verbose=0
    import optuna

    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    ctx = DataContext.get_current()
    assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
    assert {n: logging.getLogger(n).level for n in ("ray", "ray.train", "ray.tune", "ray.serve", "ray.data")} == {
        "ray": logging.WARNING, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
        "ray.serve": logging.WARNING, "ray.data": logging.ERROR}


@pytest.mark.parametrize("verbose", [False, True])
def test_the_loop_commands_start_ray_quiet_unless_verbose(restore_ray_logging, monkeypatch, verbose):
    import ray

    import serve.ingress
    from raysys.cli import common

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(serve.ingress, "apply_ingress_env", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(common.VERBOSE, "on", verbose)
    common.start_ray(None, quiet=True)
    assert ("log_to_driver" not in seen) if verbose else (seen["log_to_driver"] is False)
    # Tune's console tables and Ray Train's per-report lines stay off too (set where those run)
    from raysys.train import trainer

    assert 'LoggingConfig(log_level="WARNING")' in open(trainer.__file__).read()


def test_the_quiet_console_shows_stage_lines_warnings_and_a_progress_line_now_and_then():
    from raysys.cli.progress import ConsoleFilter

    f = ConsoleFilter(every_s=30.0)

    def rec(name: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, "msg", None, None)
        r.__dict__.update(extra)
        return r

    assert f.filter(rec("raysys"))  # a stage line
    assert f.filter(rec("ray.tune", logging.WARNING)) and f.filter(rec("raysys.train.trainer", logging.ERROR))
    assert not f.filter(rec("raysys.distill.sweep.run"))  # detail: the log file only
    epoch = progress_extra("teacher", "advance", 1, 8)
    assert f.filter(rec("raysys.train.progress", **epoch))  # the first of a task shows
    assert not f.filter(rec("raysys.train.progress", **epoch))  # then at most one per every_s
    assert f.filter(rec("raysys.distill.sweep.progress", **progress_extra("distill", "advance", 1, 16)))
    f.last["teacher"] -= 31
    assert f.filter(rec("raysys.train.progress", **epoch))


def test_with_a_log_file_the_console_is_filtered_and_the_file_gets_everything(tmp_path, monkeypatch):
    from raysys.cli import common
    from raysys.cli.progress import ConsoleFilter

    monkeypatch.setitem(common.VERBOSE, "on", False)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        common.setup_logging(tmp_path / "runs" / "raysys.log")
        console_handler, file_handler = root.handlers
        assert any(isinstance(f, ConsoleFilter) for f in console_handler.filters)
        logging.getLogger("raysys.distill.sweep.run").info("detail line")
        file_handler.flush()
        assert "detail line" in (tmp_path / "runs" / "raysys.log").read_text()
        monkeypatch.setitem(common.VERBOSE, "on", True)  # --verbose: everything on the console, no file
        common.setup_logging(tmp_path / "other.log")
        assert len(root.handlers) == 1 and not root.handlers[0].filters
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_the_demo_prints_the_monitor_report_four_features_a_line():
    from raysys.workflow.traffic import format_report

    report = {"rows_seen": 10, "window_rows": 10, "model_version": 1, "latency_ms": {"p50": 1.0, "p99": 2.0},
              "features": {f"x{i}": {"psi": 0.01 * i, "drifted": i == 0} for i in range(11)}, "alerts": ["x0"]}
    lines = format_report(report, columns=4).splitlines()
    assert len(lines) == 2 + 3 + 1 and "DRIFT" in lines[2] and lines[-1] == "alerts: x0"
    assert len(format_report(report).splitlines()) == 2 + 11 + 1  # `raysys monitor` and the jobs: one a line


def test_a_jobs_last_stdout_line_stays_its_json(tmp_path):
    """The jobs log as `raysys.jobs.common` sets it up (stderr) and print JSON last: the progress records (stage
    lines, the epoch watcher, joined before fit() returns) never land on stdout nor after the JSON."""
    import subprocess
    import sys

    _snapshot(tmp_path / "teacher", 1)
    code = ("import json, logging\n"
            "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')\n"
            "from raysys.train.progress import EpochWatcher\n"
            "from raysys.workflow.stages import StageTimer\n"
            f"w = EpochWatcher({str(tmp_path)!r}, 'teacher', 3, interval_s=0.01)\n"
            "w.seen = -1\n"
            "with w:\n"
            "    StageTimer().run('teacher', lambda: None)\n"
            "print(json.dumps({'ok': True}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == ['{"ok": true}']
    assert "[teacher] started" in proc.stderr and "teacher: epoch 2/3 reported" in proc.stderr
