"""Tier 1: training workers undo Ray's worker niceness on every thread (train.worker_niceness)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

from raysys.config import load_config

ROOT = REPO


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="per-thread nice values are Linux")
def test_renice_process_sets_every_thread():
    # in a child process: it starts at nice 0 with an extra thread, as a Ray worker starts at 15 with its threads
    code = textwrap.dedent(f"""
        import json, os, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from raysys.train.process import renice_process
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, daemon=True); t.start()
        changed, refused = renice_process(9)
        tids = [int(x) for x in os.listdir("/proc/self/task")]
        nices = [os.getpriority(os.PRIO_PROCESS, tid) for tid in tids]
        again = renice_process(9)
        stop.set()
        print(json.dumps({{"changed": changed, "refused": refused, "nices": nices, "threads": len(tids),
                           "again": again}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["threads"] >= 2 and set(got["nices"]) == {9}
    assert got["changed"] >= 2 and got["refused"] == 0  # raising a nice value needs no privilege
    assert got["again"] == [0, 0]  # idempotent: nothing left to change


def test_worker_niceness_config():
    assert load_config(preset_name="tiny").train.worker_niceness == 0
    assert load_config(preset_name="tiny", overrides={"train": {"worker_niceness": None}}).train.worker_niceness is None
    with pytest.raises(ValueError, match="worker_niceness"):
        load_config(preset_name="tiny", overrides={"train": {"worker_niceness": 40}})
