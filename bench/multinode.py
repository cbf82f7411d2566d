"""Ray across nodes: a node lost mid-run, the run resumed from its last checkpoint and finished.

A head (2 CPUs) and a second node (1 CPU, resource {"node2": 1}) are started as separate Ray nodes on this
machine, all on 127.0.0.1 (tests/fixtures_ray.py `ray_two_nodes`: each its own raylet, object store, agents,
ports and temp dir). `ray job submit` runs training/joint.py with 2 Ray Train workers and `--placement SPREAD`:
one worker on each node. Once Ray Train has registered its first checkpoint (checkpoint_manager_snapshot.json),
every process of the second node (raylet, agents, its Train worker) is SIGKILLed, as a lost machine would be.
Ray Train (FailureConfig(max_failures=3)) restarts the worker group from its last registered checkpoint; the
head alone offers the 2 CPUs the group needs (SPREAD is soft, unlike STRICT_SPREAD), so the restart does not
wait for a node that will not come back. The job must then finish: SUCCEEDED, latest.json at train.max_steps,
metrics.jsonl events `start` then `resume` from that checkpoint.

Why the kill waits for Ray's snapshot and not latest.json: rank 0 writes latest.json as soon as its report()
returns, but the controller registers a checkpoint only when it next polls the workers (every 2 s): a node lost
in between takes that report with it, and the restart goes back to the checkpoint before (from scratch if
none). 24 steps, a report every 3, leave the kill well inside the run although registration lags a report or two.

Run:  .venv/bin/python -m bench.multinode [--steps 24 --every 3] [--json OUT]
The slow test tests/e2e/test_ray_multinode.py runs this same scenario (`node_loss_run`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from posettp.procs import MarkedTreeWatch, exposed  # noqa: E402
from tests.fixtures_ray import REPO, TAG_KEY, VENV_BIN, joint_args, make_synth, ray_two_nodes  # noqa: E402

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
RANK_LINE = re.compile(r"\[joint\] rank (\d+)/(\d+) on node ([0-9a-f]+) \(([^,]+), pid (\d+)\)")  # train_worker's
GROUP_LINE = re.compile(r"Started training worker group of size (\d+)")  # Ray Train's controller, then one line a rank:
MEMBER_LINE = re.compile(r"- \(ip=([^,]+), pid=(\d+)\) world_rank=(\d+)")
NODES_SNIPPET = ("import json, ray; ray.init(logging_level='ERROR'); print('NODES ' + json.dumps([{'id': n['NodeID'], "
                 "'alive': n['Alive'], 'ip': n['NodeManagerAddress'], 'node2': 'node2' in n['Resources']} "
                 "for n in ray.nodes()]))")


def cluster_nodes(gcs: str, env: dict) -> list[dict]:
    """ray.nodes() as a driver joining the cluster sees them: id, alive, ip, whether it offers {"node2": 1}."""
    res = subprocess.run([sys.executable, "-c", NODES_SNIPPET], cwd=REPO, env=dict(env, RAY_ADDRESS=gcs),
                         capture_output=True, text=True, timeout=120)
    line = next((x for x in res.stdout.splitlines() if x.startswith("NODES ")), None)
    if line is None:
        raise RuntimeError(f"ray.nodes() failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[len("NODES "):])


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or replaced while read
        return None


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (its checkpoint manager's snapshot), 0 if none.
    A restart resumes from this one. latest.json, written by rank 0 as soon as its report() returns, can be a
    moment ahead: the controller registers a checkpoint when it next polls the workers, and a node lost in
    between takes that report with it."""
    snapshot = _read_json(run_dir / SNAPSHOT) or {}
    name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")
    found = re.fullmatch(r"checkpoint_(\d+)", name)
    return int(found.group(1)) if found else 0


def first_worker_group(ray_log: str) -> list[dict]:
    """The first worker group Ray Train started, from its controller's lines in ray.log (in order: one process
    logs them), each rank with the node its own `[joint] rank` line names (those come from each node's log
    monitor, in no set order, so the pid ties them together)."""
    node_of = {int(m.group(5)): m.group(3) for m in RANK_LINE.finditer(ray_log)}
    lines = ray_log.splitlines()
    start = next((i for i, line in enumerate(lines) if GROUP_LINE.search(line)), None)
    if start is None:
        return []
    size = int(GROUP_LINE.search(lines[start]).group(1))
    members = [m for m in (MEMBER_LINE.search(line) for line in lines[start + 1:start + 1 + size]) if m]
    return [{"rank": int(m.group(3)), "pid": int(m.group(2)), "node": node_of.get(int(m.group(2)))}
            for m in sorted(members, key=lambda m: int(m.group(3)))]


def job_status(job_id: str, dashboard: str, env: dict) -> str | None:
    """SUCCEEDED, FAILED, STOPPED, ... as `ray job status` reports it."""
    res = subprocess.run([str(VENV_BIN / "ray"), "job", "status", job_id, "--address", dashboard], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    for phrase, status in (("' succeeded", "SUCCEEDED"), ("' failed", "FAILED"), ("' was stopped", "STOPPED")):
        if f"Job '{job_id}{phrase}" in text:
            return status
    found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
    return found.group(1) if found else None


def _in_worker(name: str) -> bool:
    """A Ray worker process (titled "ray::<actor or task>": the code Ray runs for us), not one of Ray's own
    daemons (gcs_server, raylet, dashboard, log monitor, "ray::DashboardAgent", "ray::RuntimeEnvAgent").
    What such a worker listens on is the job's: torch.distributed's TCPStore in rank 0, which TorchConfig
    binds on every interface (a group spanning machines must reach it)."""
    return name.startswith("ray::") and not name.startswith(("ray::DashboardA", "ray::RuntimeEnv"))


def _events(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [r for r in (json.loads(x) for x in lines if x.strip()) if r.get("event")]


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _kill(pids: list[int]) -> list[int]:
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def node_loss_run(data: str, storage: str, name: str = "multinode", steps: int = 24, every: int = 3,
                  timeout: float = 420, log=print) -> dict:
    """The whole scenario on a fresh two-node cluster; every process it starts is stopped on return.
    Returns what happened (see `run`); the caller decides what must hold."""
    t0 = time.perf_counter()
    run_dir = Path(storage) / name
    out: dict = {"ray_nodes": 0, "node_ids": [], "worker_nodes_first_attempt": [], "killed_at_step": None,
                 "killed_pids": [], "resumed_from": None, "resume_step": None, "final_step": None,
                 "job_status": None, "ray_resumed_after_node_loss": False}
    with ray_two_nodes(head_cpus=2, node2_cpus=1) as cluster, \
            MarkedTreeWatch(TAG_KEY, cluster.head.env[TAG_KEY]) as watch:
        head = cluster.head
        out["cluster_up_s"] = round(time.perf_counter() - t0, 1)
        nodes = [n for n in cluster_nodes(head.gcs, head.env) if n["alive"]]
        node2 = next((n["id"] for n in nodes if n["node2"]), None)
        out.update(ray_nodes=len(nodes), node_ids=[n["id"] for n in nodes], node2_id=node2)
        log(f"[multinode] {len(nodes)} alive Ray nodes after {out['cluster_up_s']} s: "
            + ", ".join(f"{n['id'][:12]} ({n['ip']}{', node2' if n['node2'] else ', head'})" for n in nodes))

        job_id = f"posettp-multinode-{os.getpid()}-{int(time.time())}"
        entry = ["python", "training/joint.py", *joint_args(data, storage, name, [f"train.max_steps={steps}",
                                                                                   f"train.report_every={every}"]),
                 "--placement", "SPREAD", "--max-failures", "3"]
        submit = subprocess.Popen([str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard,
                                   "--working-dir", ".", "--submission-id", job_id, "--", *entry],
                                  cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(submit.stdout), daemon=True)  # list.extend: atomic
        reader.start()
        try:
            deadline = time.monotonic() + timeout
            while submit.poll() is None and time.monotonic() < deadline:  # the first checkpoint, then the kill
                step = registered_step(run_dir)
                if step >= every:
                    names = {pid: _name(pid) for pid in cluster.node2_pids()}
                    out["killed_pids"] = _kill(list(names))
                    out["killed_at_step"] = step
                    out["kill_at_s"] = round(time.perf_counter() - t0, 1)
                    latest = _read_json(run_dir / "latest.json") or {}
                    log(f"[multinode] Ray Train registered checkpoint_{step:07d} (rank 0's latest.json: step "
                        f"{latest.get('step')}): SIGKILL node 2 at {out['kill_at_s']} s, "
                        f"{len(out['killed_pids'])} processes: "
                        + ", ".join(f"{names[pid]} {pid}" for pid in out["killed_pids"]))
                    break
                time.sleep(0.1)
            submit.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"[multinode] the job did not finish within {timeout:.0f} s")
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.wait()
            reader.join(timeout=10)
        out["job_status"] = job_status(job_id, head.dashboard, head.env)
        after = cluster_nodes(head.gcs, head.env)
        out["node2_alive_after_kill"] = any(n["alive"] for n in after if n["id"] == node2)
    out["wall_s"] = round(time.perf_counter() - t0, 1)

    out["job_output"] = "".join(lines)
    out["exposed_sockets"] = sorted(exposed(watch.sockets))  # anything of the cluster's not on loopback
    out["ray_daemons_loopback_only"] = not [s for s in out["exposed_sockets"] if not _in_worker(s[2])]
    try:
        ray_log = (run_dir / "ray.log").read_text(errors="replace")
    except OSError:
        ray_log = ""
    workers = first_worker_group(ray_log)
    out["worker_nodes_first_attempt"] = [w["node"] for w in workers]
    out["workers_first_attempt"] = workers
    log("[multinode] first attempt, Ray Train's worker group: " + ", ".join(
        f"rank {w['rank']} pid {w['pid']} on {'node 2' if w['node'] == node2 else 'the head'} "
        f"{(w['node'] or '?')[:12]}{' (killed)' if w['pid'] in out['killed_pids'] else ''}" for w in workers))
    events = _events(run_dir)
    out["events"] = [{k: e.get(k) for k in ("event", "step", "world_size", "source")} for e in events]
    resume = next((e for e in events if e["event"] == "resume"), None)
    if resume:
        out["resumed_from"], out["resume_step"] = resume["source"], resume["step"]
        log(f"[multinode] resume event: step {resume['step']} from {resume['source']} "
            f"(world size {resume['world_size']})")
    latest = _read_json(run_dir / "latest.json")
    out["final_step"] = latest["step"] if latest else None
    log(f"[multinode] job {out['job_status']}, final step {out['final_step']}/{steps}, "
        f"node 2 alive afterwards: {out['node2_alive_after_kill']}, wall {out['wall_s']} s")

    k, r = out["killed_at_step"], out["resume_step"]
    out["ray_resumed_after_node_loss"] = bool(
        out["ray_nodes"] == 2 and len(set(out["node_ids"])) == 2 and node2
        and set(out["worker_nodes_first_attempt"]) == set(out["node_ids"])
        and k is not None and k < steps and any(w["pid"] in out["killed_pids"] for w in workers)
        and [e["event"] for e in events] == ["start", "resume"]
        and r is not None and k <= r < steps and out["resumed_from"].endswith(f"checkpoint_{r:07d}")
        and out["final_step"] == steps and out["job_status"] == "SUCCEEDED" and not out["node2_alive_after_kill"])
    return out


def run(steps: int = 24, every: int = 3, log=print) -> dict:
    """For the benchmark: the scenario on a fresh tiny synth dataset in a temp dir. Returns ray_nodes, node_ids,
    worker_nodes_first_attempt, killed_at_step, resumed_from, final_step, ray_resumed_after_node_loss, wall_s..."""
    with tempfile.TemporaryDirectory(prefix="posettp-multinode-") as tmp:
        data = make_synth(os.path.join(tmp, "data"))
        out = node_loss_run(data, os.path.join(tmp, "runs"), steps=steps, every=every, log=log)
    out.pop("job_output", None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24, help="train.max_steps (default 24)")
    p.add_argument("--every", type=int, default=3, help="train.report_every: the kill follows the first report")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    res = run(args.steps, args.every)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    sys.exit(0 if res["ray_resumed_after_node_loss"] else 1)


if __name__ == "__main__":
    main()
