"""Ray across nodes: a head and a second Ray node on this machine (loopback only), `ray job submit` of
training/joint.py with a Ray Train worker on each node, the second node SIGKILLed mid-run, the run resumed
from its last checkpoint and finished.

The scenario is bench/multinode.py `node_loss_run` (the benchmark calls the same function); this test states
what must hold. Every process it starts is stopped by its tag (tests/fixtures_ray.py), never by `ray stop`.
"""
from __future__ import annotations

import json

import pytest

from bench.multinode import node_loss_run
from model import io
from model.checkpoint import load_checkpoint
from tests.fixtures_ray import make_synth

STEPS, EVERY = 24, 3


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_node_loss_mid_run_resumes_from_last_checkpoint(tmp_path):
    data = make_synth(str(tmp_path / "data"))
    storage = tmp_path / "runs"

    def log(line: str) -> None:
        print(line, flush=True)

    print()
    out = node_loss_run(data, str(storage), name="multinode", steps=STEPS, every=EVERY, timeout=300, log=log)
    run = storage / "multinode"
    ray_log = (run / "ray.log").read_text(errors="replace") if (run / "ray.log").exists() else ""
    why = (f"\n--- result ---\n{json.dumps({k: v for k, v in out.items() if k != 'job_output'}, indent=1)}"
           f"\n--- job output ---\n{out['job_output'][-5000:]}\n--- ray.log ---\n{ray_log[-5000:]}")

    # two separate Ray nodes, and the first worker group had a worker on each
    assert out["ray_nodes"] == 2 and len(set(out["node_ids"])) == 2 and out["node2_id"], why
    assert sorted(out["worker_nodes_first_attempt"]) == sorted(out["node_ids"]), why
    # node 2 was lost mid-run, with its Train worker, after a registered checkpoint
    assert out["killed_at_step"] is not None and EVERY <= out["killed_at_step"] < STEPS, why
    on_node2 = [w for w in out["workers_first_attempt"] if w["node"] == out["node2_id"]]
    assert on_node2 and on_node2[0]["pid"] in out["killed_pids"], why
    assert out["node2_alive_after_kill"] is False, why
    # Ray Train restarted the group from the last checkpoint it had registered, and the run finished
    assert [e["event"] for e in out["events"]] == ["start", "resume"], why
    resume = out["events"][1]
    assert out["killed_at_step"] <= resume["step"] < STEPS and resume["world_size"] == 2, why
    assert out["resumed_from"] == io.join(str(run), f"checkpoint_{resume['step']:07d}"), why
    assert "worker group restarted after a failure" in out["job_output"], why
    assert out["job_status"] == "SUCCEEDED" and out["final_step"] == STEPS, why
    latest = json.loads((run / "latest.json").read_text())
    ck = load_checkpoint(latest["checkpoint"])
    assert latest["checkpoint"] == io.join(str(run), f"checkpoint_{STEPS:07d}") and ck.meta["step"] == STEPS, why
    assert f"final checkpoint: {latest['checkpoint']}" in out["job_output"], why
    # every Ray daemon of both nodes listened on loopback only; what did not is torch.distributed's TCPStore in
    # rank 0's worker (TorchConfig binds it on every interface: a group spanning machines must reach it)
    assert out["ray_daemons_loopback_only"], why
    assert out["ray_resumed_after_node_loss"], why
    print(f"[multinode] sockets off loopback: {out['exposed_sockets'] or 'none'}; wall {out['wall_s']} s")
