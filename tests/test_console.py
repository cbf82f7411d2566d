"""The training driver's terminal shows the project's tagged lines; Ray's forwarded lines and anything written
straight to file descriptors 1 and 2 go to the log, which keeps every line."""
from __future__ import annotations

import subprocess
import sys

from tests.fixtures_ray import REPO

SCRIPT = r"""
import os, sys
from core.console import ray_output_to_log
with ray_output_to_log(sys.argv[1], "[joint]"):
    print("\x1b[36m(RayTrainWorker pid=12)\x1b[0m [joint] step 1/2  loss 0.1")
    print("(TrainController pid=3) Attempting to start training worker group", file=sys.stderr)
    print("[joint] from stderr", file=sys.stderr)
    os.write(1, b"native stdout noise\n")
    os.write(2, b"native stderr noise\n")
    sys.stdout.write("a last [joint] line without its newline")
print("after the block")
print("stderr after the block", file=sys.stderr)
"""


def test_tagged_lines_reach_the_terminal_and_everything_reaches_the_log(tmp_path):
    log = tmp_path / "ray.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["[joint] step 1/2  loss 0.1", "[joint] from stderr",
                                       "a last [joint] line without its newline", "after the block"]
    assert res.stderr == "stderr after the block\n"
    text = log.read_text()
    for line in ("(RayTrainWorker pid=12)", "Attempting to start training worker group", "native stdout noise",
                 "native stderr noise", "a last [joint] line without its newline\n"):
        assert line in text, text
    assert "after the block" not in text
