"""`raysys report`: one self-contained HTML page (inline SVG plots, no JavaScript, nothing fetched) of what a
run directory holds: data quality, training curves, the sweep, evaluation, the model card and the monitor.
Ray-free: it reads files only."""

from raysys.report.load import RunData, load_run
from raysys.report.monitor_data import record_monitor_report
from raysys.report.page import render, run_root, write_report, write_run_report

__all__ = ["RunData", "load_run", "record_monitor_report", "render", "run_root", "write_report", "write_run_report"]
