"""Joint training on Ray Train: a job on a real loopback head, s3:// storage on moto, fault recovery and
--resume with exact continuation; plus fast checks that bad input fails before Ray starts.

The slow tests run 2 CPU workers for 6 steps (report every 3) on a tiny `posettp synth` dataset.
Every Ray process a test starts is stopped by PID (see tests/fixtures_ray.py), never by `ray stop`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import io
from posettp.procs import MarkedTreeWatch, exposed, pids_with_env
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import load_config
from model.network import build_model
from tests.fixtures_ray import (REPO, TAG_KEY, VENV_BIN, joint_args, make_synth, ray_env, ray_head, run_joint,
                                tagged)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    return make_synth(str(tmp_path_factory.mktemp("synth") / "data"))


def _latest(run_url: str) -> dict:
    return json.loads(io.read_bytes(io.join(run_url, "latest.json")))


def _metrics(run_url: str) -> list[dict]:
    text = io.read_bytes(io.join(run_url, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_run(run_url: str, steps: int = 6) -> dict:
    """The run's outputs are all there and its final checkpoint loads; returns latest.json."""
    latest = _latest(run_url)
    assert latest["step"] == steps
    assert latest["checkpoint"] == io.join(run_url, f"checkpoint_{steps:07d}")
    ck = load_checkpoint(latest["checkpoint"])
    assert ck.meta["step"] == steps and ck.meta["variant"] == "transformer"
    assert ck.sha256 == ck.meta["sha256"]
    for name in ("optimizer.safetensors", "optimizer.json", "rank0.safetensors", "rank1.safetensors"):
        assert io.exists(io.join(latest["checkpoint"], name)), name
    rows = [r for r in _metrics(run_url) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6]  # a report every 3 steps and at the end, never per step
    assert all(0.0 <= r["val_pck@0.2"] <= 1.0 for r in rows)
    assert "best" in latest and io.exists(io.join(latest["best"]["checkpoint"], "model.safetensors"))
    assert io.exists(io.join(run_url, "curves.png")) and io.exists(io.join(run_url, "config.yaml"))
    return latest


# ------------------------------------------------------------------------------------------------
# slow: real Ray
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_job_submit_on_loopback_head(synth, tmp_path):
    storage = tmp_path / "runs"
    with ray_head(num_cpus=2) as head:
        job_id = f"posettp-joint-{tmp_path.name[-8:]}"
        entry = ["python", "training/joint.py", *joint_args(synth, str(storage), "job")]
        submit = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard,
                                 "--working-dir", ".", "--submission-id", job_id, "--", *entry],
                                cwd=REPO, env=head.env, capture_output=True, text=True, timeout=300)
        status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", job_id, "--address", head.dashboard],
                                cwd=REPO, env=head.env, capture_output=True, text=True, timeout=60)
        out = submit.stdout + submit.stderr
        # `ray job status` prints "Job '<id>' succeeded" exactly when the status is SUCCEEDED
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, out[-6000:] + status.stdout
        assert submit.returncode == 0
    assert "[joint] step 6/6" in out and "img/s" in out and "ETA" in out  # progress reached the driver
    assert f"final checkpoint: {storage / 'job' / 'checkpoint_0000006'}" in out
    _check_run(str(storage / "job"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_storage_on_moto(synth, s3_server, tmp_path):
    import boto3

    from data.shards import copy_dataset

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="posettp")
    data = "s3://posettp/data/synth"
    copy_dataset(synth, data)
    with tagged("s3") as (tag, ray_tmp):
        res = run_joint(joint_args(data, "s3://posettp/runs", "s3run"), ray_env(tag, ray_tmp, RAY_ADDRESS="local"))
    assert res.returncode == 0, res.stderr[-6000:]
    latest = _check_run("s3://posettp/runs/s3run")
    assert b"RayTrainWorker" in io.read_bytes("s3://posettp/runs/s3run/ray.log")  # Ray's output, copied there
    assert latest["checkpoint"] == "s3://posettp/runs/s3run/checkpoint_0000006"
    assert "final checkpoint: s3://posettp/runs/s3run/checkpoint_0000006" in res.stdout


@pytest.fixture(scope="module")
def reference_run(synth, tmp_path_factory) -> dict:
    """An uninterrupted run: what fault recovery and --resume must reproduce bit for bit."""
    storage = tmp_path_factory.mktemp("ref") / "runs"
    with tagged("ref") as (tag, ray_tmp), MarkedTreeWatch(TAG_KEY, tag) as watch:
        res = run_joint(joint_args(synth, str(storage), "ref"), ray_env(tag, ray_tmp, RAY_ADDRESS="local"))
    assert res.returncode == 0, res.stderr[-6000:]
    latest = _check_run(str(storage / "ref"))
    return {"latest": latest, "sha": load_checkpoint(latest["checkpoint"]).sha256,
            "optimizer": io.read_bytes(io.join(latest["checkpoint"], "optimizer.safetensors")),
            "sockets": watch.sockets}


@pytest.mark.slow
def test_private_ray_listens_on_loopback_only(reference_run):
    """Every socket the local run's processes (driver, GCS, raylet, Train workers, agents) listened on."""
    sockets = reference_run["sockets"]
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sorted(sockets)
    assert not exposed(sockets), sorted(exposed(sockets))
    print(f"\ntrain: {len(sockets)} listening sockets seen during the run, all on loopback")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_injected_fault_recovers_from_checkpoint_exactly(synth, reference_run, tmp_path):
    storage = tmp_path / "runs"
    with tagged("fault") as (tag, ray_tmp):
        env = ray_env(tag, ray_tmp, RAY_ADDRESS="local", POSETTP_FAIL_AT_STEP="4")
        res = run_joint(joint_args(synth, str(storage), "fault") + ["--max-failures", "2"], env)
    run = str(storage / "fault")
    ray_log = io.read_bytes(io.join(run, "ray.log")).decode()
    assert res.returncode == 0, (res.stdout + res.stderr + ray_log)[-6000:]
    assert "injected fault at step 4 on rank 1" in ray_log  # Ray's report of the failure: in the log, not the terminal
    assert "resumed from" in res.stdout and "RayTrainWorker" not in res.stdout + res.stderr
    assert io.exists(io.join(run, ".fault-injected"))
    events = [r for r in _metrics(run) if r.get("event")]
    assert [e["event"] for e in events] == ["start", "resume"]
    assert events[1]["step"] == 3 and events[1]["source"].endswith("checkpoint_0000003")
    latest = _check_run(run)
    # same step count, same weights and the same Adam state as the run that never failed
    assert load_checkpoint(latest["checkpoint"]).sha256 == reference_run["sha"]
    assert io.read_bytes(io.join(latest["checkpoint"], "optimizer.safetensors")) == reference_run["optimizer"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_flag_continues_a_failed_run_exactly(synth, reference_run, tmp_path):
    storage = tmp_path / "runs"
    args = joint_args(synth, str(storage), "crash")
    with tagged("crash") as (tag, ray_tmp):
        env = ray_env(tag, ray_tmp, RAY_ADDRESS="local", POSETTP_FAIL_AT_STEP="4")
        crashed = run_joint(args + ["--max-failures", "0"], env)
    assert crashed.returncode != 0 and "joint training failed" in crashed.stderr
    assert _latest(str(storage / "crash"))["step"] == 3
    with tagged("resume") as (tag, ray_tmp):
        res = run_joint(args + ["--resume"], ray_env(tag, ray_tmp, RAY_ADDRESS="local"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert "resuming at step 3" in res.stdout
    latest = _check_run(str(storage / "crash"))
    assert load_checkpoint(latest["checkpoint"]).sha256 == reference_run["sha"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_training_and_its_ray_within_seconds(synth, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, once the first checkpoint is reported:
    the command, its workers and its private Ray are gone within seconds, the run can be resumed, and the
    terminal saw the project's lines only (Ray's went to ray.log)."""
    storage = tmp_path / "runs"
    args = joint_args(synth, str(storage), "sigint", ["train.max_steps=100000"])
    with tagged("sigint") as (tag, ray_tmp):
        env = ray_env(tag, ray_tmp, RAY_ADDRESS="local")
        proc = subprocess.Popen([str(VENV_BIN / "posettp"), "train", *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        lines = []
        for line in proc.stdout:  # until the first checkpoint is reported
            lines.append(line)
            if "[joint] step 3/" in line:
                break
        assert lines and "[joint] step 3/" in lines[-1], "".join(lines) + proc.stderr.read()[-4000:]
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        stopped_s = time.monotonic() - t0
        out, err = "".join(lines) + proc.stdout.read(), proc.stderr.read()
        time.sleep(1.0)
        left = pids_with_env(TAG_KEY, tag)
    print(f"\nCtrl-C: exit {rc} after {stopped_s:.1f} s; {len(left)} of its processes left")
    assert rc == 130, out + err
    assert stopped_s < 20, stopped_s
    assert not left, left
    assert "continue with --resume" in err and "its last checkpoint is step" in err, err
    assert all(line.startswith("[joint]") for line in out.splitlines()), out  # nothing of Ray's on the terminal
    ray_log = (storage / "sigint" / "ray.log").read_text()
    assert "RayTrainWorker" in ray_log and "Started a local Ray instance" in ray_log
    assert _latest(str(storage / "sigint"))["step"] >= 3


# ------------------------------------------------------------------------------------------------
# fast: bad input is refused on the driver, before any Ray
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if joint.py gets as far as launching Ray."""
    import training.joint as joint

    def refuse(*a, **k):
        raise AssertionError("Ray must not start on bad input")

    monkeypatch.setattr(joint, "run_trainer", refuse)
    monkeypatch.setattr(joint, "init_ray", refuse)
    return joint


def _refused(joint, capsys, argv: list[str], expect: str) -> str:
    rc = joint.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    return err


def _tiny_dataset(root: Path) -> str:
    from data.shards import write_shards
    from tests.fixtures_flower import random_rows

    rows = [dict(r, split="train" if r["person_id"] != "p002" else "val") for r in random_rows(3, 3, 64, 0)]
    url = str(root / "data")
    write_shards(rows, url, {"dataset": "synth", "joints": [f"j{i}" for i in range(13)]})
    return url


def test_unknown_config_key_is_refused_before_ray(no_ray, capsys, tmp_path):
    _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", "train.nope=1",
                              "--storage", str(tmp_path)], "unknown config key: train.nope")


def test_missing_data_url_is_refused_before_ray(no_ray, capsys, tmp_path):
    _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", f"data.url={tmp_path}/nothing",
                              "--storage", str(tmp_path / "runs")], "cannot be read")


def test_unwritable_storage_is_refused_before_ray(no_ray, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", f"data.url={_tiny_dataset(tmp_path)}",
                              "--storage", str(blocker / "runs")], "is not writable")


def test_resume_refuses_a_checkpoint_of_another_variant(no_ray, capsys, tmp_path):
    data = _tiny_dataset(tmp_path)
    run = tmp_path / "runs" / "other"
    cfg = load_config("configs/synth_small.yaml", ["model.variant=baseline"])
    save_checkpoint(str(run / "checkpoint_0000003"), build_model(cfg.model), cfg, step=3)
    (run / "checkpoint_0000003" / "optimizer.safetensors").write_bytes(b"")
    (run / "latest.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint_0000003"), "step": 3}))
    err = _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", f"data.url={data}",
                                    "--storage", str(tmp_path / "runs"), "--name", "other", "--resume"],
                   "model.variant=baseline")
    assert "transformer" in err
    # and without --resume an existing run is not silently overwritten (or silently resumed by Ray)
    _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", f"data.url={data}",
                              "--storage", str(tmp_path / "runs"), "--name", "other"], "pass --resume")


def test_resume_without_a_previous_run_is_refused(no_ray, capsys, tmp_path):
    _refused(no_ray, capsys, ["--config", "configs/synth_small.yaml", "--set", f"data.url={_tiny_dataset(tmp_path)}",
                              "--storage", str(tmp_path / "runs"), "--resume"], "no previous run")


def test_posettp_train_reports_one_line_and_script_exits_nonzero(tmp_path):
    """Both entries, as separate processes: exit 2, one stderr line, in seconds (no Ray)."""
    bad = ["--config", "configs/synth_small.yaml", "--set", "model.nope=1", "--storage", str(tmp_path)]
    for cmd in ([sys.executable, "training/joint.py", *bad], [str(VENV_BIN / "posettp"), "train", *bad]):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "unknown config key: model.nope" in res.stderr


def test_worker_layout_fits_the_cluster_and_never_shares_a_gpu_over_nccl():
    from training.joint import TrainInputError, worker_layout

    cpu = worker_layout(None, None, cluster_cpus=2, cluster_gpus=0, threads=1)
    assert (cpu.workers, cpu.use_gpu, cpu.per_worker, cpu.backend) == (2, False, {"CPU": 1}, "gloo")
    assert not worker_layout(None, 0, cluster_cpus=16, cluster_gpus=1, threads=1).use_gpu  # --gpus 0: CPU
    each = worker_layout(None, None, cluster_cpus=16, cluster_gpus=4, threads=1)
    assert (each.workers, each.per_worker, each.backend) == (4, {"CPU": 1, "GPU": 1.0}, "nccl")
    shared = worker_layout(2, 1, cluster_cpus=16, cluster_gpus=1, threads=1)  # two ranks on one device
    assert (shared.workers, shared.per_worker, shared.backend) == (2, {"CPU": 1, "GPU": 0.5}, "gloo")
    for gpus, cluster in ((2, 1), (1, 0)):  # Ray would wait for GPUs that are not there
        with pytest.raises(TrainInputError, match=f"--gpus {gpus}, but the Ray cluster has {cluster} GPU"):
            worker_layout(None, gpus, cluster_cpus=16, cluster_gpus=cluster, threads=1)


# ------------------------------------------------------------------------------------------------
# fast: the state that makes a resume exact
# ------------------------------------------------------------------------------------------------

def test_optimizer_and_rng_state_round_trip_without_pickles(tmp_path):
    from core.checkpoints import build_recon_loss
    from training.joint import load_optimizer_state, optimizer_state_files, rank_state_files, restore_rank_state
    from training.loop import make_optimizer

    cfg = load_config("configs/synth_small.yaml", ["model.image_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg)
    model(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))["h_sup"].sum().backward()
    opt.step()
    data, meta = optimizer_state_files(opt)
    json.dumps(meta)  # scalars are plain JSON
    opt2 = make_optimizer(model, cfg)
    load_optimizer_state(opt2, data, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][name])
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]

    recon = build_recon_loss(model, cfg)
    data, meta = rank_state_files(recon)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(5), random.seed(7)
    restore_rank_state(data, meta, recon)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_batch_stream_is_a_function_of_the_step(tmp_path):
    from data.shards import load_frames
    from training.data import batch_stream, labeled

    cfg = load_config("configs/synth_small.yaml", ["model.image_size=64", "train.batch_size=4"])
    frames = labeled(load_frames(_tiny_dataset(tmp_path), split="train"))  # 12 frames: epochs wrap mid-batch
    full = batch_stream(frames, cfg, rank=0, start_step=0)
    batches = [next(full) for _ in range(7)]
    resumed = batch_stream(frames, cfg, rank=0, start_step=4)
    for b in batches[4:]:
        r = next(resumed)
        assert all(torch.equal(b[k], r[k]) for k in b)
    other_rank = next(batch_stream(frames, cfg, rank=1, start_step=0))
    assert not torch.equal(other_rank["target"], batches[0]["target"])
