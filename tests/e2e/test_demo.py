"""`posettp demo` leaves nothing behind when interrupted (Ctrl-C), and runs end to end."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from posettp.procs import pids_with_env, stop_pids

MARKER = "POSETTP_DEMO_RUN"


@pytest.mark.slow
def test_ctrl_c_during_training_leaves_no_processes(tmp_path):
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: marker})
    proc = subprocess.Popen([sys.executable, "-m", "posettp.cli", "demo", "--out", str(tmp_path / "demo")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        # wait until Ray's own processes (raylet, GCS) are up inside the training step
        while time.monotonic() < deadline:
            cmdlines = []
            for pid in pids_with_env(MARKER, marker):
                try:
                    cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read())
                except OSError:
                    pass
            if any(b"raylet" in c or b"gcs_server" in c for c in cmdlines):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("Ray never started inside the demo")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "interrupted" in out or "failed" in out
        time.sleep(2)
        left = pids_with_env(MARKER, marker)
        assert not left, f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_pids(pids_with_env(MARKER, marker))
