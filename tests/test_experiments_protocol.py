"""experiments/protocol.py at toy scale: candidates share one set of models, each is scored against the flip-tested
model with standard errors over persons, and the decision rules name a winner and the structured updates' fate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trains one toy model and runs seven toy TTP settings: about a minute
TOY = ["train.max_steps=2", "train.batch_size=4", "ttp.steps=2", "ttp.batch_size=2", "ttp.min_pose_signal=0",
       "ttp.signal_frames=2"]


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_candidates_on_validation_persons_get_the_rule_s_verdicts(tmp_path):
    data, val, out = tmp_path / "data", tmp_path / "val", tmp_path / "out"
    run("-m", "posettp.cli", "synth", "--out", str(data), "--persons", "4", "--frames", "6", "--size", "64",
        "--extra-frames", "0")
    run("-m", "posettp.cli", "synth", "--out", str(val), "--split", "val", "--persons", "3", "--frames", "6",
        "--size", "64", "--extra-frames", "0", "--seed", "2")
    sets = [a for kv in TOY for a in ("--set", kv)]
    printed = run("-m", "experiments.protocol", "--out", str(out), "--data", str(data), "--persons-data", str(val),
                  "--split", "val", "--label", "val", "--candidates", "default,paper,teacher", "--structured-on",
                  "default", "--seeds", "1", "--jobs", "1", *sets)
    rows = json.loads((out / "protocol-val.json").read_text())
    assert list(rows) == ["default", "paper", "teacher", "default/rank4", "default/rank8", "default/norm+bias"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["transformer-s0"]  # one model for all
    for name, row in rows.items():
        assert row["persons"] == 3 and {"offline", "online"} <= set(row)
        assert set(row["offline"]["per_person"]) == {f"s2-val-000{i}" for i in range(3)}
        assert row["config"]["model"]["flip_test"] is True
    assert rows["teacher"]["config"]["ttp"]["teacher_weight"] == 300
    assert rows["default/rank4"]["config"]["ttp"]["delta_rank"] == 4
    sizes = [rows[name]["delta_bytes"] for name in ("default/norm+bias", "default/rank4", "default/rank8", "default")]
    assert sizes == sorted(sizes) and rows["default"]["delta_share"] > 5 * rows["default/rank4"]["delta_share"]
    assert "winner: " in printed and "eligible (no person loses more than a point" in printed
    assert "Structured updates of default" in printed and "default/rank8: delta" in printed
