"""Flower end to end: a simulation over test persons and a TLS + SuperNode-auth deployment on loopback.

Every process a test starts is stopped by PID (the simulation's detached local
SuperLink and whatever it spawned are found by the test's own FLWR_HOME in their
environment). Each test has its own FLWR_HOME, ports, Ray temp dir and store, and
runtime dependency installation is disabled.

`POSETTP_FL_PERSONS` (default 3) sets the number of simulated persons.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_flower import (REPO, VENV_BIN, TreeMemory, flower_env, free_port, make_checkpoint, make_shards,
                                   stop_pids, stop_tree_by_env, wait_port, write_flwr_config, write_image_folder)

pytestmark = pytest.mark.slow

FLWR = str(VENV_BIN / "flwr")
SEED = 3
STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fl-assets")
    persons = int(os.environ.get("POSETTP_FL_PERSONS", "3"))
    ck, shards = str(root / "ck"), str(root / "shards")
    make_checkpoint(ck)
    make_shards(shards, persons=persons + 2, frames=6, size=64, seed=0)  # 2 never take part (fedavg check)
    return {"ck": ck, "shards": shards, "persons": persons, "root": root}


def flwr(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_status(env: dict, connection: list[str], run_id: str | None = None) -> dict:
    res = flwr(["ls", *connection, "--format", "json"], env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = json.loads(res.stdout)["runs"]
    assert runs, res.stdout
    return next(r for r in runs if run_id is None or r["run-id"] == run_id)


def started_run_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if "Successfully started run" in line:
            return line.rsplit(" ", 1)[-1].strip()
    raise AssertionError(f"no run id in flwr output:\n{stdout[-3000:]}")


def run_config(**kv) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in kv.items())


def summary_of(store: Path, run_id: str) -> dict:
    return json.loads((store / "fl-runs" / f"run-{run_id}.json").read_text())


def apply_stored(base_ck, store_url: str, person: str):
    from model.delta import apply_delta
    from store.deltas import DeltaStore
    from store.policy import DeltaPolicy

    found = DeltaStore(store_url, DeltaPolicy.for_checkpoint(base_ck)).load_latest(person)
    assert found is not None, f"no delta stored for {person}"
    delta, meta, record = found
    model = type(base_ck.model)(base_ck.model.cfg)
    model.load_state_dict(apply_delta(base_ck.model.state_dict(), delta))
    return model.eval(), delta, meta


def test_simulation_stores_a_delta_per_person_equal_to_a_local_run(assets, tmp_path):
    from client.ttp_job import run_ttp
    from data.shards import list_persons, load_frames
    from core.crops import prepare_frames
    from model.checkpoint import load_checkpoint
    from model.predict import predict_crops
    from core.scoring import score
    from model.joints import PENN

    n = assets["persons"]
    home, store = tmp_path / "flwr", tmp_path / "store"
    write_flwr_config(home, {"local": {"address": ":local:"}})
    env = flower_env(home)
    rc = run_config(**{"base-checkpoint": assets["ck"], "data": assets["shards"], "storage": str(store),
                       "ttp-steps": STEPS, "seed": SEED, "delta-dtype": "fp32", "min-nodes": n, "node-wait": 120.0,
                       "round-timeout": 600.0, "fedavg-base": True})
    t0 = time.perf_counter()
    try:
        with TreeMemory(home) as mem:
            res = flwr(["run", ".", "--stream", "--federation-config",
                        f"num-supernodes={n} client-resources-num-cpus=1", "--run-config", rc], env)
        wall = time.perf_counter() - t0
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        run_id = started_run_id(res.stdout)
        status = run_status(env, [], run_id)
        assert status["status"] == "finished:completed", (status, out[-4000:])
    finally:
        stopped = stop_tree_by_env(home)
    assert stopped, "the detached local SuperLink should have been found and stopped"

    summary = summary_of(store, run_id)
    persons = list_persons(assets["shards"], "test")[:n]
    assert summary["status"] == "finished" and summary["stored"] == n
    assert {p for p, e in summary["persons"].items() if e["status"] == "stored"} == set(persons)
    ck = load_checkpoint(assets["ck"])
    ck.config.ttp.steps = STEPS
    torch.set_num_threads(1)  # like a 1-CPU simulated client
    report = []
    for p in persons:
        model, delta, meta = apply_stored(ck, str(store), p)
        assert meta["base_sha256"] == ck.sha256 and meta["person_id"] == p and meta["dtype"] == "fp32"
        frames = load_frames(assets["shards"], person=p)
        data, metrics, result = run_ttp(load_checkpoint(assets["ck"]), frames, "offline", ck.config.ttp, SEED, p,
                                        "fp32", device="cpu")
        from model.delta import decode_and_validate
        from store.policy import DeltaPolicy

        info = DeltaPolicy.for_model(ck.model, ck.sha256)
        local_delta, _ = decode_and_validate(data, info.state, info.allowed_keys, ck.sha256)
        assert set(local_delta) == set(delta)
        for k in delta:  # bit-equal here (1 thread both sides); tolerance for other thread counts
            torch.testing.assert_close(delta[k], local_delta[k], rtol=1e-4, atol=1e-6)
        crops, matrices, _ = prepare_frames(frames, ck.config.model.image_size)
        stored_pred = predict_crops(model, crops, matrices)
        np.testing.assert_allclose(stored_pred[..., :2], result.predictions[..., :2], atol=1e-3)
        labeled = [i for i, f in enumerate(frames) if f.labeled]
        a = score(stored_pred[labeled], [frames[i] for i in labeled], PENN)
        b = score(result.predictions[labeled], [frames[i] for i in labeled], PENN)
        assert a == pytest.approx(b, abs=1e-9), (a, b)
        entry = summary["persons"][p]
        assert entry["metrics"]["frames"] == len(frames) and entry["metrics"]["steps"] == STEPS
        assert entry["bytes"] == len(data)
        report.append((p, entry["bytes"], entry["metrics"]["seconds"], a["pck@0.2"]))
    # fedavg-base: a new base from the averaged deltas, scored without TTP on the 2 persons who did not take part
    fed = summary["rounds"][0]["fedavg"]
    assert fed["persons_averaged"] == n and fed["parent_sha256"] == ck.sha256 != fed["sha256"]
    assert load_checkpoint(fed["checkpoint"]).sha256 == fed["sha256"]
    ev = fed["evaluation"]
    assert ev["persons"] == 2 and not set(ev["per_person"]) & set(persons)
    assert np.isfinite(ev["base_mean"]) and np.isfinite(ev["fedavg_mean"])
    print(f"\nfedavg base on 2 held-out persons: {ev['metric']} {ev['base_mean']:.3f} -> {ev['fedavg_mean']:.3f}")
    print(f"simulation: {n} persons, wall {wall:.1f}s (server {summary['wall_seconds']:.1f}s), "
          f"checkpoint {summary['checkpoint_bytes']} bytes, per client {[r[1] for r in report]} bytes, "
          f"client seconds {[round(r[2], 1) for r in report]}, server peak RSS {summary['server_peak_rss_mb']:.0f} MB, "
          f"peak RSS of all Flower/Ray processes {mem.peak_mb:.0f} MB")


HOSTILE_CLIENT = """# A ClientApp for a test: the real one, except that partition 1 sends a malformed delta (a safetensors
# header that is a JSON list) in place of its own.
from client.app import train as honest_train, verdict as honest_verdict
from flwr.clientapp import ClientApp
from store.protocol import blob_record

app = ClientApp()
HEADER = b'["not", "an", "object"]'


@app.train()
def train(msg, context):
    out = honest_train(msg, context)
    if int(context.node_config["partition-id"]) == 1 and "delta" in out.content:
        out.content["delta"] = blob_record(len(HEADER).to_bytes(8, "little") + HEADER + bytes(16))
    return out


@app.query("verdict")
def verdict(msg, context):
    return honest_verdict(msg, context)
"""


def hostile_app(root: Path) -> Path:
    """The Flower app as `posettp flower-app` writes it for an installed package, with HOSTILE_CLIENT as its
    ClientApp (the ServerApp is the product's own)."""
    import tomli_w
    import tomllib

    app = root / "app"
    res = subprocess.run([str(Path(sys.executable).parent / "posettp"), "flower-app", "--out", str(app)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"flwr run {app}" in res.stdout, res.stdout + res.stderr
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    doc["tool"]["flwr"]["app"]["components"]["clientapp"] = "hostile_client:app"
    doc["tool"]["flwr"]["app"]["fab-include"].append("hostile_client.py")
    (app / "pyproject.toml").write_text(tomli_w.dumps(doc))
    (app / "hostile_client.py").write_text(HOSTILE_CLIENT)
    return app


def test_simulation_one_malformed_delta_among_good_ones(assets, tmp_path):
    """Three simulated persons, the second sends a malformed delta: the round goes on, the other two are stored,
    the second is refused with the reason, told so, and the summary lists all three; every socket the run's
    processes (local SuperLink, simulation, Ray) listen on is on loopback."""
    from data.shards import list_persons
    from model.checkpoint import load_checkpoint

    from posettp.procs import exposed

    persons = list_persons(assets["shards"], "test")[:3]
    home, store = tmp_path / "flwr", tmp_path / "store"
    write_flwr_config(home, {"local": {"address": ":local:"}})
    env = flower_env(home)
    rc = run_config(**{"base-checkpoint": assets["ck"], "data": assets["shards"], "storage": str(store),
                       "ttp-steps": STEPS, "seed": SEED, "min-nodes": 3, "node-wait": 120.0, "round-timeout": 600.0})
    try:
        with TreeMemory(home, every=0.5) as watch:
            res = subprocess.run([FLWR, "run", str(hostile_app(tmp_path)), "--stream", "--federation-config",
                                  "num-supernodes=3 client-resources-num-cpus=1", "--run-config", rc],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        run_id = started_run_id(res.stdout)
        assert run_status(env, [], run_id)["status"] == "finished:completed"
    finally:
        stop_tree_by_env(home)
    summary = summary_of(store, run_id)
    status = {p: summary["persons"][p]["status"] for p in persons}
    assert status == {persons[0]: "stored", persons[1]: "refused", persons[2]: "stored"}, summary["persons"]
    reason = summary["persons"][persons[1]]["reason"]
    assert "header is a JSON list" in reason, reason
    assert summary["rounds"][0]["counts"]["stored"] == 2 and summary["rounds"][0]["counts"]["refused"] == 1
    assert f"person {persons[1]}: delta refused" in out, out[-4000:]  # the node was told why
    ck = load_checkpoint(assets["ck"])
    for p in (persons[0], persons[2]):
        apply_stored(ck, str(store), p)
    assert not (store / "persons" / persons[1]).exists()
    assert {"gcs_server", "raylet"} <= {name for _, _, name in watch.sockets}, sorted(watch.sockets)
    assert not exposed(watch.sockets), sorted(exposed(watch.sockets))
    print(f"\nsimulation with a malformed delta: {status}; {persons[1]}: {reason}; "
          f"{len(watch.sockets)} listening sockets, all on loopback")


# --- deployment ---------------------------------------------------------------------------------


class Procs:
    """Processes a test starts, each in its own session, stopped by PID."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, {}
        (root / "logs").mkdir(exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_pids([p.pid for p in self.procs.values()])


def supernode_cmd(certs: Path, port: int, key: str, node_config: str) -> list[str]:
    return [str(VENV_BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
            "--auth-supernode-private-key", str(certs / key), "--node-config", node_config]


def start_secure_superlink(procs, certs, port: int):
    """A SuperLink with TLS and SuperNode authentication on 127.0.0.1:port, waited for."""
    link = procs.start("superlink", [
        str(VENV_BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation"])
    wait_port(port, 60, link)
    return link


def secure_deployment(tmp_path, nodes: int):
    """Certificates for a TLS SuperLink and `nodes` node keys, a Flower home naming it, and the process group."""
    certs, home, store = tmp_path / "certs", tmp_path / "flwr", tmp_path / "store"
    subprocess.run(["bash", str(REPO / "scripts/gen_certs.sh"), str(certs), str(nodes)], check=True, timeout=120)
    port = free_port()
    write_flwr_config(home, {"deploy": {"address": f"127.0.0.1:{port}", "root-certificates": str(certs / "ca.crt")}})
    return certs, home, store, port, Procs(tmp_path, flower_env(home))


def register_and_bind(env: dict, certs: Path, store: Path, bindings: dict[str, str]) -> dict[str, int]:
    """`flwr supernode register` each key, then bind the node id it prints to a person with `posettp node bind`."""
    ids = {}
    for key, person in bindings.items():
        res = flwr(["supernode", "register", str(certs / f"{key}.pub"), "deploy", "--format", "json"], env, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        ids[key] = int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
        bind = subprocess.run([str(VENV_BIN / "posettp"), "node", "bind", "--store", str(store),
                               "--node", str(ids[key]), "--person", person], cwd=REPO, capture_output=True, text=True)
        assert bind.returncode == 0, bind.stderr
    return ids


def test_deployment_tls_node_auth_bound_persons_and_intruders_refused(assets, tmp_path):
    """Two nodes write their own persons; a third, registered and bound to another person, claims the first's
    person with that person's data and is refused; an unregistered key never joins."""
    from data.shards import list_persons, load_frames
    from model.checkpoint import load_checkpoint

    certs, home, store, port, procs = secure_deployment(tmp_path, nodes=4)
    env = procs.env
    persons = list_persons(assets["shards"], "test")[:3]
    folder = tmp_path / "person-b-frames"
    write_image_folder(load_frames(assets["shards"], person=persons[1]), str(folder))
    try:
        start_secure_superlink(procs, certs, port)
        ids = register_and_bind(env, certs, store, {"node-1": persons[0], "node-2": persons[1], "node-3": persons[2]})

        # an unregistered key is refused and never joins
        intruder = procs.start("intruder", supernode_cmd(certs, port, "node-4", 'person-id="mallory" data-path="/x"'))
        try:
            intruder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        log = procs.log("intruder")
        assert "Failed to activate SuperNode" in log or intruder.returncode not in (None, 0), log[-3000:]

        procs.start("node-a", supernode_cmd(certs, port, "node-1",
                                            f'person-id="{persons[0]}" data-path="{assets["shards"]}"'))
        procs.start("node-b", supernode_cmd(certs, port, "node-2", f'person-id="{persons[1]}" data-path="{folder}"'))
        procs.start("node-c", supernode_cmd(certs, port, "node-3",  # bound to persons[2], claims persons[0]
                                            f'person-id="{persons[0]}" data-path="{assets["shards"]}"'))
        rc = run_config(**{"base-checkpoint": assets["ck"], "storage": str(store), "ttp-steps": STEPS,
                           "seed": SEED, "delta-dtype": "int8", "min-nodes": 3, "node-wait": 120.0,
                           "round-timeout": 600.0})
        t0 = time.perf_counter()
        res = flwr(["run", ".", "deploy", "--stream", "--run-config", rc], env)
        wall = time.perf_counter() - t0
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        run_id = started_run_id(res.stdout)
        status = run_status(env, ["deploy"], run_id)
        assert status["status"] == "finished:completed", status
        node_logs = procs.log("node-a") + procs.log("node-b")
        intruder_log = procs.log("node-c")
    finally:
        procs.stop()
        stop_tree_by_env(home)

    summary = summary_of(store, run_id)
    assert summary["status"] == "finished" and summary["stored"] == 2, summary
    assert summary["node_bindings"]["mode"] == "operator", summary["node_bindings"]
    claim = summary["persons"].pop(f"node-{ids['node-3']}")
    assert claim["status"] == "refused" and claim["person_id"] == persons[0], claim
    assert f"node {ids['node-3']} is bound to person '{persons[2]}', not '{persons[0]}'" in claim["reason"]
    assert set(summary["persons"]) == set(persons[:2]), summary["persons"].keys()  # mallory never took part
    assert summary["persons"][persons[0]]["node_id"] == ids["node-1"]
    assert "delta refused" in intruder_log and "is bound to person" in intruder_log  # node c was told why
    ck = load_checkpoint(assets["ck"])
    for p in persons[:2]:
        _, delta, meta = apply_stored(ck, str(store), p)
        assert meta["dtype"] == "int8" and meta["base_sha256"] == ck.sha256
        assert set(delta) and all(k.startswith(("encoder.", "self_head.")) for k in delta)
    assert "delta stored" in node_logs  # the verdict reached the nodes
    ratio = summary["mean_delta_bytes"] / summary["checkpoint_bytes"]
    assert ratio < 0.10
    print(f"\nnode c (bound to {persons[2]}) claiming {persons[0]}: refused: {claim['reason']}")
    print(f"deployment: 2 persons over TLS + node auth, flwr run {wall:.1f}s, delta "
          f"{summary['mean_delta_bytes']:.0f} bytes = {100 * ratio:.1f}% of the {summary['checkpoint_bytes']}-byte "
          f"checkpoint, network {status.get('network-traffic')}")


def test_deployment_node_dropping_mid_round_does_not_stall_the_server(assets, tmp_path):
    """Node b is killed as soon as its train message arrives: the round ends within its timeout,
    a's delta is stored and b is recorded as failed (node unavailable) or timed out."""
    import signal

    from data.shards import list_persons

    certs, home, store, port, procs = secure_deployment(tmp_path, nodes=2)
    env = procs.env
    persons = list_persons(assets["shards"], "test")[:2]
    timeout = 45.0
    try:
        start_secure_superlink(procs, certs, port)
        for key in ("node-1.pub", "node-2.pub"):
            assert flwr(["supernode", "register", str(certs / key), "deploy"], env, timeout=60).returncode == 0
        procs.start("node-a", supernode_cmd(certs, port, "node-1",
                                            f'person-id="{persons[0]}" data-path="{assets["shards"]}"'))
        b = procs.start("node-b", supernode_cmd(certs, port, "node-2",
                                                f'person-id="{persons[1]}" data-path="{assets["shards"]}"'))
        rc = run_config(**{"base-checkpoint": assets["ck"], "storage": str(store), "ttp-steps": STEPS,
                           "seed": SEED, "min-nodes": 2, "node-wait": 120.0, "round-timeout": timeout})
        run = subprocess.Popen([FLWR, "run", ".", "deploy", "--stream", "--run-config", rc], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.procs["flwr-run"] = run
        deadline = time.monotonic() + 180
        while "Receiving: train message" not in procs.log("node-b"):
            assert time.monotonic() < deadline, procs.log("node-b")[-3000:]
            time.sleep(0.5)
        os.killpg(b.pid, signal.SIGKILL)  # the node's own session: supernode and its ClientApp
        killed_at = time.perf_counter()
        out, _ = run.communicate(timeout=timeout + 240)
        after_kill = time.perf_counter() - killed_at
        run_id = started_run_id(out)
        assert run_status(env, ["deploy"], run_id)["status"] == "finished:completed", out[-4000:]
    finally:
        procs.stop()
        stop_tree_by_env(home)
    summary = summary_of(store, run_id)
    assert summary["persons"][persons[0]]["status"] == "stored"
    dropped = [e for p, e in summary["persons"].items() if p != persons[0]]
    assert len(dropped) == 1 and dropped[0]["status"] in ("timeout", "failed"), summary["persons"]
    assert summary["rounds"][0]["seconds"] <= timeout + 15
    print(f"\ndropout: node b killed mid-round, round took {summary['rounds'][0]['seconds']:.1f}s "
          f"(timeout {timeout:.0f}s), run ended {after_kill:.1f}s after the kill; b: {dropped[0]['status']} "
          f"{dropped[0]['reason'][:80]}")
