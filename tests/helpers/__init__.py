"""Helpers the tests share (the only place tests import from besides the project):

    cluster   a real token-auth `ray start` cluster in its own process group, temp dir and HOME
    serving   a temp registry with two untrained versions, the session's Serve port, polling, a background
              HTTP load, and the HTTP calls of the monitor/retrain tests (predict, feedback, monitor report)
    worlds    the small synthetic task, rows drawn from it, a registry with a student trained on it
    dist      the toy data stream of the 2-rank gloo tests and how a rank process ends
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
